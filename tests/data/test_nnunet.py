"""nnU-Net data for Neuroverse3D: prepare, v1/v2 dataset.json, one or many datasets, geometry."""

import json

import nibabel as nib
import numpy as np
import pytest
import torch

from medseg.data.nnunet import (
    NnunetDataset,
    find_datasets,
    load_image,
    load_labels,
    parse_labels,
    prepare_nnunet,
    read_dataset_json,
    restore_geometry,
    write_labels,
)
from medseg.data.synthetic.neuroverse3d import generate_neuroverse3d_data
from medseg.errors import DataError


def _pair(folder, case, shape=(10, 12, 8), mask_shape=None, mask_dtype=np.uint8, labels=(0, 1, 2)):
    folder.mkdir(parents=True, exist_ok=True)
    affine = np.diag([1.5, 1.5, 2.0, 1.0])
    affine[:3, 3] = [-10, 5, 3]
    rng = np.random.default_rng(0)
    nib.save(nib.Nifti1Image(rng.random(shape).astype(np.float32), affine), folder / f"{case}_img.nii.gz")
    mask = rng.choice(labels, size=mask_shape or shape).astype(mask_dtype)
    nib.save(nib.Nifti1Image(mask, affine), folder / f"{case}_gt.nii.gz")


def test_prepare_writes_the_v2_layout(tmp_path):
    for case in ("case_001", "case_002"):
        _pair(tmp_path / "raw", case)
    prepare_nnunet(tmp_path / "raw", tmp_path / "out", dataset_name="MyDataset", modality="MRI")
    out = tmp_path / "out"
    assert sorted(p.name for p in (out / "imagesTr").iterdir()) == ["case_001_0000.nii.gz",
                                                                   "case_002_0000.nii.gz"]
    assert sorted(p.name for p in (out / "labelsTr").iterdir()) == ["case_001.nii.gz", "case_002.nii.gz"]
    meta = json.loads((out / "dataset.json").read_text())
    assert meta == {"name": "MyDataset", "channel_names": {"0": "MRI"},
                    "labels": {"background": 0, "label_1": 1, "label_2": 2},
                    "numTraining": 2, "file_ending": ".nii.gz"}
    dataset = find_datasets(out)[0]  # the seed's layout: dataset.json in data_dir itself
    assert dataset.cases == ["case_001", "case_002"]
    assert dataset.info.labels == {0: "background", 1: "label_1", 2: "label_2"}


def test_custom_patterns(tmp_path):
    raw = tmp_path / "raw"
    _pair(raw, "a")
    (raw / "a_img.nii.gz").rename(raw / "a-t1.nii.gz")
    (raw / "a_gt.nii.gz").rename(raw / "a-seg.nii.gz")
    prepare_nnunet(raw, tmp_path / "out", dataset_name="X", modality="CT",
                   image_pattern="*-t1.nii.gz", mask_pattern="*-seg.nii.gz")
    assert (tmp_path / "out" / "imagesTr" / "a_0000.nii.gz").is_file()


def test_v1_and_v2_labels_and_neither():
    assert parse_labels({"background": 0, "gm": 1}, "x") == {0: "background", 1: "gm"}
    assert parse_labels({"0": "background", "1": "gm"}, "x") == {0: "background", 1: "gm"}
    with pytest.raises(DataError, match="neither nnU-Net v2"):
        parse_labels({"background": "zero"}, "dataset.json")


def test_dataset_json_without_labels(tmp_path):
    (tmp_path / "dataset.json").write_text(json.dumps({"name": "x", "modality": {"0": "MRI"}}))
    with pytest.raises(DataError, match="no 'labels' entry"):
        read_dataset_json(tmp_path / "dataset.json")


def test_folder_of_datasets_v1_and_v2(tmp_path):
    generate_neuroverse3d_data(tmp_path / "raw", num_datasets=2, cases_per_dataset=2,
                               volume_shape=(8, 8, 8))
    prepare_nnunet(tmp_path / "raw", tmp_path / "nn", dataset_name="unused", modality="MRI")
    v1 = tmp_path / "nn" / "Dataset001_SynBrainA" / "dataset.json"
    meta = json.loads(v1.read_text())
    meta["labels"] = {str(v): k for k, v in meta.pop("labels").items()}
    meta["modality"] = meta.pop("channel_names")
    v1.write_text(json.dumps(meta))
    found = find_datasets(tmp_path / "nn")
    assert [d.name for d in found] == ["Dataset001_SynBrainA", "Dataset002_HeldOut"]
    v2_labels = json.loads((tmp_path / "nn" / "Dataset002_HeldOut" / "dataset.json").read_text())["labels"]
    assert found[0].info.labels == {int(k): v for k, v in meta["labels"].items()}
    assert found[1].info.labels == {v: k for k, v in v2_labels.items()}
    assert found[0].info.channels == {0: "MRI"}


@pytest.mark.parametrize("missing", ["_gt", "_img"])
def test_unpaired_file_is_named_and_nothing_written(tmp_path, missing):
    _pair(tmp_path / "raw", "case_001")
    _pair(tmp_path / "raw", "case_002")
    (tmp_path / "raw" / f"case_002{missing}.nii.gz").unlink()
    with pytest.raises(DataError, match="case_002.*has no (mask|image)"):
        prepare_nnunet(tmp_path / "raw", tmp_path / "out", dataset_name="X", modality="MRI")
    assert not (tmp_path / "out").exists()
    assert [p.name for p in tmp_path.iterdir()] == ["raw"]


def test_shape_mismatch_and_non_integer_labels(tmp_path):
    _pair(tmp_path / "a", "case_001", mask_shape=(10, 12, 9))
    with pytest.raises(DataError, match="case_001_gt.nii.gz has shape \\[10, 12, 9\\].*same size"):
        prepare_nnunet(tmp_path / "a", tmp_path / "out", dataset_name="X", modality="MRI")
    _pair(tmp_path / "b", "case_001", mask_dtype=np.float32, labels=(0.0, 0.5))
    with pytest.raises(DataError, match="not a label volume: expected non-negative integer"):
        prepare_nnunet(tmp_path / "b", tmp_path / "out", dataset_name="X", modality="MRI")
    assert not (tmp_path / "out").exists()


def test_resize_on_load_and_write_back_in_the_original_geometry(tmp_path):
    _pair(tmp_path / "raw", "case_001")
    blocks = np.zeros((10, 12, 8), np.uint8)
    blocks[5:, :, :] = 1
    blocks[:, 6:, 4:] = 2
    gt = tmp_path / "raw" / "case_001_gt.nii.gz"
    nib.save(nib.Nifti1Image(blocks, nib.load(gt).affine), gt)
    prepare_nnunet(tmp_path / "raw", tmp_path / "out", dataset_name="X", modality="MRI")
    dataset = NnunetDataset.open(tmp_path / "out")
    image, geometry = load_image(dataset.image_path("case_001"), (16, 16, 16))
    labels = load_labels(dataset.label_path("case_001"), (16, 16, 16), geometry.shape)
    assert image.shape == labels.shape == (1, 16, 16, 16)
    assert float(image.min()) >= 0 and float(image.max()) <= 1
    assert set(torch.unique(labels).tolist()) <= {0, 1, 2}
    back = restore_geometry(labels[0], geometry)
    assert back.shape == (10, 12, 8)
    path = write_labels(back, geometry, tmp_path / "pred.nii.gz")
    written = nib.load(path)
    source = nib.load(dataset.image_path("case_001"))
    assert written.shape == source.shape
    np.testing.assert_allclose(written.affine, source.affine)
    # Nearest-neighbour there and back keeps the labels of blocks, but for their edges.
    original = np.asarray(nib.load(dataset.label_path("case_001")).dataobj)
    assert (np.asarray(written.dataobj) == original).mean() > 0.9
