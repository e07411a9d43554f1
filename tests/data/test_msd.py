"""Reading an MSD task folder and converting it to PNG slices."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
from PIL import Image

from medseg.data.msd import (
    ConversionSettings,
    convert_task,
    partial_volumes_note,
    read_scaled_volume,
    read_task,
    slice_to_image,
    window,
)
from medseg.errors import DataError


def write_task(root: Path, volumes: dict[str, tuple[np.ndarray, np.ndarray]],
               modality: str = "CT") -> Path:
    """An MSD task folder from ``{name: (hu [X, Y, Z], label [X, Y, Z])}``, stored LPS (the
    display orientation, so slices come out in stored order)."""
    lps = np.diag([-1.0, -1.0, 1.0, 1.0])
    (root / "imagesTr").mkdir(parents=True)
    (root / "labelsTr").mkdir()
    entries = []
    for name, (hu, label) in volumes.items():
        nib.save(nib.Nifti1Image(hu.astype(np.int16), lps),
                 root / "imagesTr" / f"{name}.nii.gz")
        nib.save(nib.Nifti1Image(label.astype(np.uint8), lps),
                 root / "labelsTr" / f"{name}.nii.gz")
        entries.append({"image": f"./imagesTr/{name}.nii.gz", "label": f"./labelsTr/{name}.nii.gz"})
    # A macOS resource fork, as in the downloaded MSD archives: not listed, so not read.
    (root / "imagesTr" / f"._{next(iter(volumes))}.nii.gz").write_bytes(b"\0\5\26\7")
    (root / "dataset.json").write_text(json.dumps({
        "name": "Lung", "modality": {"0": modality}, "labels": {"0": "background", "1": "cancer"},
        "numTraining": len(entries), "training": entries, "test": []}))
    return root


def volume(slices: int, tumor_slices=(), shape=(12, 10)):
    """A ramp of HU values along X; a 2x2 tumour in the listed slices."""
    hu = np.broadcast_to(np.linspace(-1000, 400, shape[0])[:, None, None], (*shape, slices)).copy()
    label = np.zeros((*shape, slices), dtype=np.uint8)
    for k in tumor_slices:
        label[3:5, 6:8, k] = 1
    return hu, label


@pytest.fixture
def task(tmp_path):
    return write_task(tmp_path / "Task006_Lung", {"lung_001": volume(20, (4, 5, 6)),
                                                  "lung_002": volume(30, (10,))})


def test_read_task_lists_the_training_cases(task):
    read = read_task(task)
    assert [case.name for case in read.cases] == ["lung_001", "lung_002"]
    assert read.modality == "CT"


def test_conversion_keeps_tumour_slices_and_a_share_of_empty_ones(task, tmp_path):
    out = tmp_path / "dataset"
    record = convert_task(task, out, ConversionSettings(empty_slice_fraction=0.25, seed=3))
    names = sorted(p.name for p in (out / "images").iterdir())
    assert sorted(p.name for p in (out / "labels").iterdir()) == names
    for k in (4, 5, 6):
        assert f"lung_001_slice_{k:04d}.png" in names
    assert "lung_002_slice_0010.png" in names
    # round(0.25 * 17) + round(0.25 * 29) empty slices besides the 4 with tumour.
    assert len(names) == 4 + 4 + 7 == record["slices"]
    assert record["tumour_slices"] == 4
    assert json.loads((out / "conversion.json").read_text())["slices"] == len(names)
    # The empty slices not kept are written apart, so validation can score whole volumes.
    left_out = sorted(p.name for p in (out / "left_out" / "images").iterdir())
    assert sorted(p.name for p in (out / "left_out" / "labels").iterdir()) == left_out
    assert len(left_out) == 20 + 30 - len(names) == record["left_out_slices"]
    assert not set(left_out) & set(names)
    assert [v["left_out_slices"] for v in record["volumes"]] == [20 - 3 - 4, 30 - 1 - 7]


def test_a_dataset_converted_without_left_out_slices_is_named(task, tmp_path):
    out = tmp_path / "dataset"
    convert_task(task, out, ConversionSettings(empty_slice_fraction=0.25, seed=3))
    assert partial_volumes_note(out) is None
    record = json.loads((out / "conversion.json").read_text())   # as convert wrote it before
    del record["left_out_slices"]
    (out / "conversion.json").write_text(json.dumps(record))
    shutil.rmtree(out / "left_out")
    note = partial_volumes_note(out)
    assert "35 fewer slices" in note and "run `convert` again" in note
    assert partial_volumes_note(tmp_path) is None   # a folder made otherwise: nothing known


def test_conversion_windows_and_orients_each_slice(task, tmp_path):
    out = tmp_path / "dataset"
    convert_task(task, out, ConversionSettings(window_center=-300, window_width=1400))
    image = np.asarray(Image.open(out / "images" / "lung_001_slice_0005.png"))
    label = np.asarray(Image.open(out / "labels" / "lung_001_slice_0005.png"))
    hu, truth = volume(20, (4, 5, 6))
    assert image.dtype == np.uint8 and image.shape == (10, 12)  # rows Y, columns X
    assert np.array_equal(image, slice_to_image(window(hu[:, :, 5], -300, 1400)))
    assert image[0, 0] == 0 and image[0, -1] == 255  # -1000 HU and +400 HU bound the window
    assert set(np.unique(label)) == {0, 255}
    assert np.array_equal(label > 0, slice_to_image(truth[:, :, 5] > 0))


def test_empty_slice_fraction_and_seed_choose_which_empty_slices(task, tmp_path):
    kept = {}
    for name, settings in {"none": ConversionSettings(empty_slice_fraction=0.0),
                           "a": ConversionSettings(empty_slice_fraction=0.5, seed=1),
                           "b": ConversionSettings(empty_slice_fraction=0.5, seed=2)}.items():
        convert_task(task, tmp_path / name, settings)
        kept[name] = sorted(p.name for p in (tmp_path / name / "images").iterdir())
    assert len(kept["none"]) == 4
    assert len(kept["a"]) == len(kept["b"]) > 4 and kept["a"] != kept["b"]


def test_missing_dataset_json_is_named(task, tmp_path):
    (task / "dataset.json").unlink()
    with pytest.raises(DataError, match=r"dataset.json does not exist; an MSD task folder needs"):
        convert_task(task, tmp_path / "out", ConversionSettings())
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("content, message", [
    ("{not json", "is not valid JSON"),
    ('{"name": "Lung"}', "has no 'training' list"),
    ('{"training": []}', "lists no training cases"),
    ('{"training": [{"image": "./imagesTr/lung_001.nii.gz"}]}', "training entry 1 is"),
    ('{"training": [{"image": "./imagesTr/x.nii.gz", "label": "./labelsTr/x.nii.gz"}]}',
     r"names the image ./imagesTr/x.nii.gz, but .*x.nii.gz does not exist"),
])
def test_malformed_dataset_json_is_named(task, content, message):
    (task / "dataset.json").write_text(content)
    with pytest.raises(DataError, match=message):
        read_task(task)


def test_missing_task_folder(tmp_path):
    with pytest.raises(DataError, match="MSD task folder .*nowhere does not exist"):
        read_task(tmp_path / "nowhere")


def test_image_and_label_of_different_shapes_stop_before_writing(tmp_path):
    hu, _ = volume(8)
    _, label = volume(9)
    task = write_task(tmp_path / "T", {"a": volume(8, (2,)), "b": (hu, label)})
    with pytest.raises(DataError, match=r"b.nii.gz has shape \[12, 10, 9\] but its image .* has "
                                        r"\[12, 10, 8\]"):
        convert_task(task, tmp_path / "out", ConversionSettings())
    assert sorted(p.name for p in tmp_path.iterdir()) == ["T"]


def test_unreadable_volume_is_named(task, tmp_path):
    (task / "labelsTr" / "lung_002.nii.gz").write_bytes(b"not a nifti file")
    with pytest.raises(DataError, match="lung_002.nii.gz could not be read as a NIfTI volume"):
        convert_task(task, tmp_path / "out", ConversionSettings())


def test_volumes_with_more_than_three_dimensions(tmp_path):
    affine = np.eye(4)
    nib.save(nib.Nifti1Image(np.zeros((4, 5, 6, 1), np.float32), affine), tmp_path / "one.nii.gz")
    nib.save(nib.Nifti1Image(np.zeros((4, 5, 6, 2), np.float32), affine), tmp_path / "two.nii.gz")
    # a trailing 1 is dropped
    assert read_scaled_volume(tmp_path / "one.nii.gz")[0].shape == (4, 5, 6)
    with pytest.raises(DataError, match=r"two.nii.gz has shape \[4, 5, 6, 2\]; expected a 3D"):
        read_scaled_volume(tmp_path / "two.nii.gz")


def test_non_ct_task_is_refused(tmp_path):
    task = write_task(tmp_path / "T", {"a": volume(4, (1,))}, modality="MRI")
    with pytest.raises(DataError, match="modality 'MRI'; CT windowing"):
        convert_task(task, tmp_path / "out", ConversionSettings())


def test_existing_output_is_replaced_only_with_overwrite(task, tmp_path):
    out = tmp_path / "dataset"
    convert_task(task, out, ConversionSettings(empty_slice_fraction=0.0))
    with pytest.raises(DataError, match="already contains files.*set overwrite=True"):
        convert_task(task, out, ConversionSettings(empty_slice_fraction=1.0))
    assert len(list((out / "images").iterdir())) == 4
    convert_task(task, out, ConversionSettings(empty_slice_fraction=1.0), overwrite=True)
    assert len(list((out / "images").iterdir())) == 50
