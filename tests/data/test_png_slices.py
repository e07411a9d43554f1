"""The PNG slice dataset: layout checks with clear messages, the volume-based split, items."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from monai.data import DataLoader
from PIL import Image

from medseg.data.png_slices import (
    PNGSliceDataset,
    context_indices,
    slice_images,
    scan_slices,
    scan_left_out,
    slice_statistics,
    split_by_volume,
    split_whole_volumes,
)
from medseg.errors import DataError


def write_slice(root: Path, name: str, *, size=(16, 12), tumour=True, label_values=(0, 255),
                label_size=None, label_mode="L") -> None:
    (root / "images").mkdir(parents=True, exist_ok=True)
    (root / "labels").mkdir(exist_ok=True)
    height, width = size
    image = (np.arange(height * width).reshape(height, width) % 256).astype(np.uint8)
    Image.fromarray(image).save(root / "images" / name)
    lh, lw = label_size or size
    label = np.full((lh, lw), label_values[0], dtype=np.uint8)
    if tumour:
        label[2:5, 3:6] = label_values[1]
    Image.fromarray(label).convert(label_mode).save(root / "labels" / name)


@pytest.fixture
def dataset_dir(tmp_path):
    root = tmp_path / "dataset"
    for volume in ("lung_001", "lung_002", "lung_003", "lung_004", "lung_005"):
        for k in (3, 4, 9):
            write_slice(root, f"{volume}_slice_{k:04d}.png", tumour=k != 9)
    return root


def test_scan_reads_volume_index_size_and_tumour_area(dataset_dir):
    records = scan_slices(dataset_dir)
    assert len(records) == 15
    first = records[0]
    assert (first.volume, first.index, first.size) == ("lung_001", 3, (16, 12))
    assert first.tumor_pixels == 9
    assert records[2].tumor_pixels == 0


def test_split_is_by_volume_and_reproducible(dataset_dir):
    records = scan_slices(dataset_dir)
    train, val = split_by_volume(records, 0.4, seed=1)
    train_volumes, val_volumes = {r.volume for r in train}, {r.volume for r in val}
    assert not train_volumes & val_volumes
    assert len(val_volumes) == 2 and len(train) + len(val) == 15
    reordered = split_by_volume(list(reversed(records)), 0.4, seed=1)[1]
    assert {r.volume for r in reordered} == val_volumes
    others = [{r.volume for r in split_by_volume(records, 0.4, seed=s)[1]} for s in range(2, 8)]
    assert any(o != val_volumes for o in others)


def test_validation_gets_every_slice_of_its_volumes_training_only_the_kept(dataset_dir):
    assert scan_left_out(dataset_dir) == []
    for volume in ("lung_001", "lung_002", "lung_003", "lung_004", "lung_005", "lung_006"):
        for k in (0, 1, 2):
            write_slice(dataset_dir / "left_out", f"{volume}_slice_{k:04d}.png", tumour=False)
    left_out = scan_left_out(dataset_dir)
    assert len(left_out) == 18
    train, val = split_whole_volumes(scan_slices(dataset_dir), left_out, 0.4, seed=1)
    assert not {r.volume for r in train} & {r.volume for r in val}
    assert not set(train) & set(left_out)
    for volume in {r.volume for r in val}:   # whole volumes, in slice order
        slices = [r.index for r in val if r.volume == volume]
        assert slices == ([0, 1, 2, 3, 4, 9] if volume != "lung_006" else [0, 1, 2])
    assert len(train) == 3 * len({r.volume for r in train} - {"lung_006"})
    # The volumes are drawn as split_by_volume draws them from all slices.
    assert {r.volume for r in val} == {r.volume for r in split_by_volume(
        [*scan_slices(dataset_dir), *left_out], 0.4, seed=1)[1]}


def test_split_needs_two_volumes(tmp_path):
    write_slice(tmp_path / "d", "only_slice_0001.png")
    with pytest.raises(DataError, match="holds 1 volume .*needs at least 2 volumes"):
        split_by_volume(scan_slices(tmp_path / "d"), 0.2, seed=0)


def test_items_are_scaled_images_and_binary_masks_that_collate(dataset_dir):
    dataset = PNGSliceDataset(scan_slices(dataset_dir))
    item = dataset[0]
    assert item["image"].shape == (1, 16, 12) and item["image"].dtype == np.float32
    assert 0 <= item["image"].min() and item["image"].max() <= 1
    assert set(np.unique(item["mask"])) == {0.0, 1.0} and item["mask"].sum() == 9
    batch = next(iter(DataLoader(dataset, batch_size=4)))
    assert batch["volume"] == ["lung_001"] * 3 + ["lung_002"]
    assert torch.equal(batch["slice"], torch.tensor([3, 4, 9, 3]))


def test_context_slices_stack_the_neighbours_by_name_edge_slices_repeated(tmp_path):
    root = tmp_path / "dataset"
    for k in range(4):   # slice 1 was left out by convert; each slice is grey 10 * (k + 1)
        folder = root / "left_out" if k == 1 else root
        write_slice(folder, f"vol_slice_{k:04d}.png")
        Image.fromarray(np.full((16, 12), 10 * (k + 1), dtype=np.uint8)).save(
            folder / "images" / f"vol_slice_{k:04d}.png")
    records = scan_slices(root)
    assert [r.index for r in records] == [0, 2, 3]

    def channels(dataset):
        return [[round(float(c.mean()) * 255) for c in item["image"]] for item in dataset]

    assert channels(PNGSliceDataset(records)) == [[10], [30], [40]]
    whole = PNGSliceDataset(records, context_slices=1, neighbours=slice_images(root))
    assert channels(whole) == [[10, 10, 20], [20, 30, 40], [30, 40, 40]]
    assert whole[0]["mask"].shape == (1, 16, 12)
    # Without left_out/, the missing neighbour is replaced by the nearest slice towards the centre.
    assert channels(PNGSliceDataset(records, context_slices=2)) == [
        [10, 10, 10, 10, 30], [10, 30, 30, 40, 40], [30, 30, 40, 40, 40]]
    assert context_indices(5, lambda k: 0 <= k < 7, 2) == [3, 4, 5, 6, 6]
    Image.fromarray(np.zeros((8, 8), dtype=np.uint8)).save(
        root / "left_out" / "images" / "vol_slice_0001.png")
    with pytest.raises(DataError, match="vol_slice_0001.png is 8x8 .* context_slices"):
        whole[1]


def test_statistics_describe_both_splits(dataset_dir):
    train, val = split_by_volume(scan_slices(dataset_dir), 0.4, seed=1)
    stats = slice_statistics(train, val)
    assert stats["splits"]["train"]["slices"] == 9 and stats["splits"]["val"]["volumes"] == 2
    assert stats["splits"]["train"]["tumour_slices"] == 6
    fraction = stats["splits"]["val"]["tumour_pixel_fraction_in_tumour_slices"]
    assert fraction == pytest.approx(9 / 192, abs=1e-5)
    assert stats["image_sizes"] == ["12x16"]


# ----------------------------------------------------------------------------- bad input
def test_label_with_other_values(dataset_dir):
    write_slice(dataset_dir, "lung_002_slice_0004.png", label_values=(0, 1))
    with pytest.raises(DataError, match=r"lung_002_slice_0004.png has values 0, 1; expected only "
                                        r"0 \(background\) and 255 \(tumour\)"):
        scan_slices(dataset_dir)


def test_image_and_label_of_different_sizes(dataset_dir):
    write_slice(dataset_dir, "lung_003_slice_0009.png", label_size=(16, 14))
    with pytest.raises(DataError, match=r"labels/lung_003_slice_0009.png is 14x16 \(width x "
                                        r"height\) but its image .* is 12x16"):
        scan_slices(dataset_dir)


def test_missing_label(dataset_dir):
    (dataset_dir / "labels" / "lung_004_slice_0003.png").unlink()
    with pytest.raises(DataError, match=r"images/lung_004_slice_0003.png has no label; expected "
                                        r".*labels/lung_004_slice_0003.png"):
        scan_slices(dataset_dir)


def test_empty_images_folder(tmp_path):
    (tmp_path / "d" / "images").mkdir(parents=True)
    (tmp_path / "d" / "images" / ".DS_Store").write_text("")
    with pytest.raises(DataError, match=r"images holds no PNG files"):
        scan_slices(tmp_path / "d")


def test_missing_images_folder(tmp_path):
    with pytest.raises(DataError, match=r"nowhere/images does not exist; expected a dataset"):
        scan_slices(tmp_path / "nowhere")


def test_name_without_volume(dataset_dir):
    write_slice(dataset_dir, "scan42.png")
    with pytest.raises(DataError, match=r"scan42.png: the name does not follow "
                                        r"<volume>_slice_<k>.png"):
        scan_slices(dataset_dir)


def test_colour_label(dataset_dir):
    write_slice(dataset_dir, "lung_001_slice_0004.png", label_mode="RGB")
    with pytest.raises(DataError, match=r"is a 'RGB' image; expected a single-channel 8-bit mask"):
        scan_slices(dataset_dir)


def test_file_that_is_no_image(dataset_dir):
    (dataset_dir / "images" / "lung_001_slice_0004.png").write_text("oops")
    with pytest.raises(DataError, match=r"lung_001_slice_0004.png could not be read as an image"):
        scan_slices(dataset_dir)
