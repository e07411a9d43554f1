"""Reading the SADAAN HDF5 format: metadata and layout checks, the lazy dataset, statistics."""

from __future__ import annotations

import json
import os
import pickle
import re
import shutil
from pathlib import Path

import h5py
import numpy as np
import pytest
import torch
from monai.data import DataLoader
from monai.data.utils import set_rnd
from monai.transforms import Compose, RandGaussianNoised

from medseg.data.hdf5 import (
    HDF5SegmentationDataset,
    SplitInfo,
    dataset_statistics,
    read_metadata,
    validate_split,
)
from medseg.data.synthetic.sadaan import generate_sadaan_dataset
from medseg.errors import DataError

NAMES = ["liver", "kidney", "spleen"]


def write_split(path: Path, *, cases: int = 3, structures: int = 3, size=(4, 5, 6),
                channels: int | None = None, skip: str | None = None,
                shapes: dict | None = None) -> Path:
    """A small split file; ``shapes`` replaces a dataset's shape, ``skip`` leaves one out."""
    image_shape = (cases, *size) if channels is None else (cases, channels, *size)
    default_shapes = {"images": image_shape, "masks": (cases, structures, *size),
                      "presence_labels": (cases, structures), "scenarios": (cases,)}
    default_shapes.update(shapes or {})
    rng = np.random.default_rng(0)
    with h5py.File(path, "w") as file:
        for name, shape in default_shapes.items():
            if name == skip:
                continue
            if name == "scenarios":
                file.create_dataset(name, data=np.array([f"case{i}" for i in range(shape[0])],
                                                        dtype=h5py.string_dtype()))
            elif name == "images":
                file.create_dataset(name, data=rng.normal(100, 20, shape).astype(np.float32))
            else:
                file.create_dataset(name, data=rng.integers(0, 2, shape).astype(np.uint8))
    return path


def write_dataset(folder: Path, **split_options) -> dict:
    folder.mkdir(parents=True, exist_ok=True)
    metadata = {"structure_names": NAMES, "num_structures": 3, "image_size": [4, 5, 6],
                "dataset_info": "test"}
    (folder / "metadata.json").write_text(json.dumps(metadata))
    write_split(folder / "train.h5", **split_options)
    return metadata


@pytest.fixture(scope="module")
def generated(tmp_path_factory) -> Path:
    return generate_sadaan_dataset(tmp_path_factory.mktemp("hdf5") / "sadaan", num_train=6,
                                   num_val=4, num_test=0, image_size=(16, 16, 8),
                                   absent_probability=0.5, seed=2)


def open_paths(path: Path) -> int:
    """How many of this process's file descriptors point at ``path``."""
    fd_dir = Path("/proc/self/fd")
    targets = []
    for fd in os.listdir(fd_dir):
        try:
            targets.append(os.readlink(fd_dir / fd))
        except OSError:
            continue
    return targets.count(str(path.resolve()))


# --- metadata ---------------------------------------------------------------------------------

def test_read_metadata_returns_the_documented_fields(generated):
    metadata = read_metadata(generated)
    assert metadata["num_structures"] == len(metadata["structure_names"]) == 13
    assert metadata["image_size"] == [16, 16, 8]


def test_missing_folder(tmp_path):
    expected = re.escape(f"dataset folder {tmp_path / 'nope'} does not exist")
    with pytest.raises(DataError, match=expected):
        read_metadata(tmp_path / "nope")


def test_missing_metadata_json(tmp_path):
    with pytest.raises(DataError, match=r"metadata.json does not exist.*structure_names"):
        read_metadata(tmp_path)


def test_metadata_that_is_not_json(tmp_path):
    (tmp_path / "metadata.json").write_text("{structure_names: [")
    with pytest.raises(DataError, match=r"metadata.json is not valid JSON"):
        read_metadata(tmp_path)


def test_metadata_without_num_structures_takes_it_from_the_names(tmp_path):
    write_dataset(tmp_path)
    metadata = json.loads((tmp_path / "metadata.json").read_text())
    expected = metadata.pop("num_structures")
    (tmp_path / "metadata.json").write_text(json.dumps(metadata))
    assert read_metadata(tmp_path)["num_structures"] == expected


@pytest.mark.parametrize("key", ["structure_names", "image_size"])
def test_metadata_missing_a_key(tmp_path, key):
    write_dataset(tmp_path)
    metadata = json.loads((tmp_path / "metadata.json").read_text())
    del metadata[key]
    (tmp_path / "metadata.json").write_text(json.dumps(metadata))
    with pytest.raises(DataError, match=rf"metadata.json is missing {key}"):
        read_metadata(tmp_path)


def test_metadata_whose_names_and_count_disagree(tmp_path):
    write_dataset(tmp_path)
    metadata = json.loads((tmp_path / "metadata.json").read_text())
    metadata["num_structures"] = 4
    (tmp_path / "metadata.json").write_text(json.dumps(metadata))
    with pytest.raises(DataError, match=r"structure_names lists 3 names but num_structures is 4"):
        read_metadata(tmp_path)


# --- split layout -----------------------------------------------------------------------------

def test_validate_split_reports_the_shapes(tmp_path):
    metadata = write_dataset(tmp_path, channels=2)
    info = validate_split(tmp_path, "train", metadata)
    assert info == SplitInfo(path=tmp_path / "train.h5", num_cases=3, image_shape=(4, 5, 6),
                             num_channels=2, num_structures=3)


def test_validate_split_reads_shapes_only(tmp_path, monkeypatch):
    metadata = write_dataset(tmp_path)

    def no_reading(*args, **kwargs):
        raise AssertionError("validate_split read array data")

    monkeypatch.setattr(h5py.Dataset, "__getitem__", no_reading)
    monkeypatch.setattr(h5py.Dataset, "read_direct", no_reading)
    assert validate_split(tmp_path, "train", metadata).num_cases == 3


def test_missing_split_file(tmp_path):
    metadata = write_dataset(tmp_path)
    with pytest.raises(DataError, match=re.escape(f"{tmp_path / 'val.h5'} does not exist")):
        validate_split(tmp_path, "val", metadata)


def test_split_file_that_is_not_hdf5(tmp_path):
    metadata = write_dataset(tmp_path)
    (tmp_path / "train.h5").write_bytes(b"not an hdf5 file")
    with pytest.raises(DataError, match=r"train.h5 could not be opened as an HDF5 file"):
        validate_split(tmp_path, "train", metadata)


@pytest.mark.parametrize("dataset", ["images", "masks", "presence_labels", "scenarios"])
def test_split_file_missing_a_dataset(tmp_path, dataset):
    metadata = write_dataset(tmp_path, skip=dataset)
    with pytest.raises(DataError, match=rf"train.h5 has no dataset '{dataset}'; expected "
                                        r"datasets images, masks, presence_labels, scenarios"):
        validate_split(tmp_path, "train", metadata)


def test_images_and_masks_of_different_spatial_shape(tmp_path):
    metadata = write_dataset(tmp_path, shapes={"masks": (3, 3, 4, 5, 7)})
    with pytest.raises(DataError) as error:
        validate_split(tmp_path, "train", metadata)
    message = str(error.value)
    assert str(tmp_path / "train.h5") in message
    assert "'images' has spatial shape [4, 5, 6]" in message
    assert "'masks' has [4, 5, 7]" in message


def test_masks_with_a_different_number_of_structures_than_the_names(tmp_path):
    metadata = write_dataset(tmp_path, structures=2)
    with pytest.raises(DataError) as error:
        validate_split(tmp_path, "train", metadata)
    message = str(error.value)
    assert str(tmp_path / "train.h5") in message
    assert "dataset 'masks' has 2 structures (shape [3, 2, 4, 5, 6])" in message
    assert "metadata.json lists 3 structure_names" in message


def test_datasets_with_different_numbers_of_cases(tmp_path):
    metadata = write_dataset(tmp_path, shapes={"presence_labels": (2, 3)})
    with pytest.raises(DataError, match=r"train.h5: dataset 'presence_labels' has 2 cases.*"
                                        r"'images' has 3"):
        validate_split(tmp_path, "train", metadata)


def test_presence_labels_of_the_wrong_shape(tmp_path):
    metadata = write_dataset(tmp_path, shapes={"presence_labels": (3, 4)})
    with pytest.raises(DataError, match=r"train.h5: dataset 'presence_labels' must be numeric "
                                        r"\[N, S\] = \[3, 3\], found shape \[3, 4\]"):
        validate_split(tmp_path, "train", metadata)


def test_masks_that_are_not_five_dimensional(tmp_path):
    metadata = write_dataset(tmp_path, shapes={"masks": (3, 4, 5, 6)})
    with pytest.raises(DataError, match=r"train.h5: dataset 'masks' must be integer or boolean "
                                        r"\[N, S, H, W, D\], found shape \[3, 4, 5, 6\]"):
        validate_split(tmp_path, "train", metadata)


def test_image_size_that_differs_from_the_metadata(tmp_path):
    metadata = write_dataset(tmp_path)
    metadata["image_size"] = [8, 8, 8]
    with pytest.raises(DataError, match=r"train.h5: dataset 'images' has spatial shape "
                                        r"\[4, 5, 6\] but metadata.json gives image_size"):
        validate_split(tmp_path, "train", metadata)


# --- the dataset ------------------------------------------------------------------------------

def test_items_are_one_case_each_in_training_dtypes(generated):
    dataset = HDF5SegmentationDataset(generated / "train.h5")
    assert len(dataset) == 6
    with h5py.File(generated / "train.h5", "r") as file:
        for index in (0, 5):
            item = dataset[index]
            assert item["image"].dtype == np.float32 and item["image"].shape == (1, 16, 16, 8)
            assert item["mask"].dtype == np.float32 and item["mask"].shape == (13, 16, 16, 8)
            assert item["presence"].dtype == np.float32 and item["presence"].shape == (13,)
            np.testing.assert_array_equal(item["image"][0], file["images"][index])
            np.testing.assert_array_equal(item["mask"], file["masks"][index])
            np.testing.assert_array_equal(item["presence"], file["presence_labels"][index])
            assert item["scenario"] == file["scenarios"].asstr()[index]
            assert item["index"] == index
    with pytest.raises(IndexError, match="out of range"):
        dataset[6]


def test_multichannel_images_keep_their_channels(tmp_path):
    write_split(tmp_path / "train.h5", channels=2)
    item = HDF5SegmentationDataset(tmp_path / "train.h5")[1]
    assert item["image"].shape == (2, 4, 5, 6)


def test_the_transform_is_applied_and_exposed_for_reseeding(generated):
    transform = Compose([RandGaussianNoised(keys="image", prob=1.0, std=5.0)])
    dataset = HDF5SegmentationDataset(generated / "train.h5", transform)
    assert dataset.transform is transform
    set_rnd(dataset, 7)
    first = dataset[0]["image"]
    set_rnd(dataset, 7)
    np.testing.assert_array_equal(dataset[0]["image"], first)
    set_rnd(dataset, 8)
    assert not np.array_equal(dataset[0]["image"], first)


def test_the_file_is_opened_on_first_read_and_never_pickled(generated, tmp_path):
    path = Path(shutil.copy(generated / "train.h5", tmp_path / "train.h5"))  # no other readers
    dataset = HDF5SegmentationDataset(path)
    assert open_paths(path) == 0
    expected = dataset[2]
    assert open_paths(path) == 1
    copy = pickle.loads(pickle.dumps(dataset))
    assert open_paths(path) == 1  # the copy has not opened its own handle yet
    np.testing.assert_array_equal(copy[2]["mask"], expected["mask"])
    copy.close()
    dataset.close()
    assert open_paths(path) == 0


def test_a_new_process_opens_its_own_handle(generated, monkeypatch):
    dataset = HDF5SegmentationDataset(generated / "train.h5")
    opened = []
    real_file = h5py.File

    def counting_file(*args, **kwargs):
        opened.append(args[0])
        return real_file(*args, **kwargs)

    monkeypatch.setattr(h5py, "File", counting_file)
    dataset[0]
    dataset[1]
    assert len(opened) == 1
    parent = os.getpid()
    monkeypatch.setattr(os, "getpid", lambda: parent + 1)  # as in a forked worker
    dataset[2]
    dataset[3]
    assert len(opened) == 2
    dataset.close()


def test_workers_each_read_through_their_own_handle(generated):
    dataset = HDF5SegmentationDataset(generated / "val.h5")
    dataset[0]  # the parent holds an open handle when the workers fork
    sequential = [dataset[i] for i in range(len(dataset))]
    loader = DataLoader(dataset, batch_size=2, num_workers=2, shuffle=False)
    batches = list(loader)
    images = torch.cat([torch.as_tensor(b["image"]) for b in batches])
    np.testing.assert_array_equal(images.numpy(), np.stack([s["image"] for s in sequential]))
    assert sum((b["scenario"] for b in batches), []) == [s["scenario"] for s in sequential]
    assert torch.cat([b["index"] for b in batches]).tolist() == list(range(len(dataset)))
    dataset.close()


def test_an_invalid_file_is_refused_when_the_dataset_is_made(tmp_path):
    write_split(tmp_path / "train.h5", skip="masks")
    with pytest.raises(DataError, match=r"train.h5 has no dataset 'masks'"):
        HDF5SegmentationDataset(tmp_path / "train.h5")


# --- statistics -------------------------------------------------------------------------------

def test_statistics_describe_the_dataset_in_json(generated):
    metadata = read_metadata(generated)
    stats = dataset_statistics(generated, metadata, max_cases=4)
    json.dumps(stats)

    def keys(value):
        if isinstance(value, dict):
            for key, item in value.items():
                yield key
                yield from keys(item)
        elif isinstance(value, list):
            for item in value:
                yield from keys(item)

    assert not [key for key in keys(stats) if "." in key]
    assert stats["splits"] == {"train": 6, "val": 4}
    assert stats["image_size"] == [16, 16, 8]
    assert stats["spacing"] == "not stored (sizes are in voxels)"
    assert stats["intensity"]["cases_sampled"] == 4
    channel = stats["intensity"]["channels"][0]
    assert 0 <= channel["min"] <= channel["p0_5"] <= channel["p50"] <= channel["p99_5"]
    assert channel["p99_5"] <= channel["max"] <= 255

    presence = []
    for split in ("train", "val"):
        with h5py.File(generated / f"{split}.h5", "r") as file:
            presence.append(file["presence_labels"][()])
    presence = np.concatenate(presence)
    for k, name in enumerate(metadata["structure_names"]):
        assert stats["structures"][name]["presence_rate"] == pytest.approx(presence[:, k].mean())
        assert 0 <= stats["structures"][name]["foreground_fraction"] < 1
    assert stats["structures"]["liver"]["foreground_fraction"] > \
        stats["structures"]["right_adrenal_gland"]["foreground_fraction"]
    assert stats["cases_with_absent_structures"] == pytest.approx(
        (presence.min(axis=1) == 0).mean())
    assert sum(stats["scenario_counts"].values()) == 10
