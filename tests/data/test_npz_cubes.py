"""The aneurysm-cubes NPZ format: layout and file checks, fold selection, the dataset."""

from __future__ import annotations

import os
import re

import numpy as np
import pytest

from medseg.data import npz_cubes
from medseg.data.cube_transforms import cube_transforms
from medseg.data.npz_cubes import (
    cube_dataset,
    TEST_FOLD,
    NpzCubeDataset,
    cube_statistics,
    inspect_cube,
    scan_cubes,
    select_records,
)
from medseg.errors import DataError
from tests.cube_factory import SHAPE, cube_arrays, write_cube, write_cubes_dir


@pytest.fixture
def cubes(tmp_path):
    return write_cubes_dir(tmp_path / "cubes", per_fold=(2, 3), test=(1, 1))


def one_cube(tmp_path, name="pos_1.2.3_0.npz", fold=0, positive=True, **options):
    volume, mask = cube_arrays(np.random.default_rng(0), positive)
    return write_cube(tmp_path / f"fold_{fold}" / name, volume, mask, label=int(positive),
                      fold=fold, **options)


def test_scan_reads_every_fold_and_the_test_folder(cubes):
    index = scan_cubes(cubes, cube_shape=SHAPE)
    assert sorted(index.folds) == [TEST_FOLD, 0, 1, 2, 3, 4]
    for fold in range(5):
        labels = sorted(r.label for r in index.folds[fold])
        assert labels == [0, 0, 0, 1, 1]
    assert index.folds[TEST_FOLD]
    record = index.folds[0][-1]
    assert record.series_id.startswith("1.2.840.") and record.shape == SHAPE
    assert 0.5 < record.mask_max <= 1.0


def test_series_ids_with_dots_and_underscores_are_parsed(tmp_path):
    path = one_cube(tmp_path, name="pos_1.2.826_a_b_7.npz")
    record = inspect_cube(path, fold=0)
    assert (record.series_id, record.index, record.label) == ("1.2.826_a_b", 7, 1)


@pytest.mark.parametrize("layout, message", [
    ("missing", r"cubes folder .*nowhere does not exist"),
    ("empty", r"has no fold_k folders; expected fold_0 \.\.\. fold_4"),
    ("four_folds", r"is missing fold_4"),
])
def test_a_cubes_folder_without_its_folds_is_named(tmp_path, layout, message):
    root = tmp_path / "nowhere"
    if layout != "missing":
        root.mkdir()
    if layout == "four_folds":
        for fold in range(4):
            (root / f"fold_{fold}").mkdir()
    with pytest.raises(DataError, match=message):
        scan_cubes(root)


def test_a_fold_without_positive_cubes_is_named(cubes):
    for path in (cubes / "fold_3").glob("pos_*.npz"):
        path.unlink()
    with pytest.raises(DataError, match=r"fold_3 has no positive cubes \(pos_\*\.npz\)"):
        scan_cubes(cubes)


@pytest.mark.parametrize("key", ["volume", "mask", "label", "fold"])
def test_an_npz_missing_a_key_is_named(tmp_path, key):
    path = one_cube(tmp_path, drop=key)
    with pytest.raises(DataError, match=rf"{re.escape(str(path))} has no '{key}'; expected keys "
                                        r"volume, mask, label, fold"):
        inspect_cube(path, fold=0)


def test_a_cube_of_another_shape_than_configured_is_named(tmp_path):
    path = one_cube(tmp_path)
    with pytest.raises(DataError, match=r"'volume' has shape \[8, 32, 32\] but "
                                        r"dataset\.cube_shape is \[32, 128, 128\]"):
        inspect_cube(path, fold=0, cube_shape=(32, 128, 128))
    assert inspect_cube(path, fold=0).shape == SHAPE  # no shape configured: any 3D shape


@pytest.mark.parametrize("scale, shown", [(255.0, r"\[0, 24\d\.\d+\]"),
                                          (-1.0, r"\[-0\.9\d+, 0\]")])
def test_a_mask_outside_zero_one_is_named(tmp_path, scale, shown):
    volume, mask = cube_arrays(np.random.default_rng(0), True)
    path = write_cube(tmp_path / "fold_0" / "pos_s_0.npz", volume,
                      (mask.astype(np.float32) * scale).astype(np.float32), label=1, fold=0)
    with pytest.raises(DataError, match=rf"pos_s_0\.npz: 'mask' values lie in {shown}; "
                                        r"expected a Gaussian mask with values in \[0, 1\]"):
        inspect_cube(path, fold=0)


def test_a_mask_with_nan_is_named(tmp_path):
    volume, mask = cube_arrays(np.random.default_rng(0), True)
    mask[0, 0, 0] = np.nan
    path = write_cube(tmp_path / "fold_0" / "pos_s_0.npz", volume, mask, label=1, fold=0)
    with pytest.raises(DataError, match="'mask' contains NaN"):
        inspect_cube(path, fold=0)


@pytest.mark.parametrize("replace, message", [
    ({"volume": np.zeros(SHAPE, np.float32)}, r"'volume' must be uint8 \[D, H, W\].*float32"),
    ({"mask": np.zeros((4, 4, 4), np.float16)}, r"'mask' must be a numeric array of the "
                                                r"volume's shape \[8, 32, 32\]"),
    ({"label": np.int64(0)}, r"'label' is 0 but the file name says pos"),
    ({"fold": np.int64(2)}, r"'fold' is 2 but the file lies in folder fold_0"),
    ({"label": np.array([1, 0])}, r"'label' must be one integer"),
])
def test_wrong_contents_are_named(tmp_path, replace, message):
    path = one_cube(tmp_path, replace=replace)
    with pytest.raises(DataError, match=message):
        inspect_cube(path, fold=0)


def test_a_file_that_is_not_an_npz_is_named(tmp_path):
    path = tmp_path / "fold_0" / "pos_s_0.npz"
    path.parent.mkdir()
    path.write_bytes(b"not a zip file")
    with pytest.raises(DataError, match=r"pos_s_0\.npz could not be read as an NPZ cube"):
        inspect_cube(path, fold=0)


def test_a_stray_file_name_is_named(cubes):
    (cubes / "fold_1" / "cube_7.npz").write_bytes(b"")
    with pytest.raises(DataError, match=r"cube_7\.npz: file name does not follow "
                                        r"pos_<series_id>_<i>\.npz"):
        scan_cubes(cubes)


def test_a_series_in_two_folds_is_refused(cubes):
    volume, mask = cube_arrays(np.random.default_rng(1), False)
    series = next((cubes / "fold_0").glob("pos_*.npz")).name.removeprefix("pos_")[:-6]
    write_cube(cubes / "fold_2" / f"neg_{series}_5.npz", volume, mask, label=0, fold=2)
    with pytest.raises(DataError, match=rf"series {re.escape(series)} appears in two folds"):
        scan_cubes(cubes)


def test_a_positive_mask_that_binarises_to_nothing_is_named(cubes):
    with pytest.raises(DataError, match=r"positive cube's mask peaks at 0\.\d+, not above "
                                        r"dataset\.label_threshold=0\.99"):
        scan_cubes(cubes, label_threshold=0.99)


def test_a_rewritten_file_is_checked_again(tmp_path):
    path = one_cube(tmp_path)
    inspect_cube(path, fold=0)
    volume, mask = cube_arrays(np.random.default_rng(0), True)
    write_cube(path, volume, mask * 2, label=1, fold=0)
    os.utime(path, ns=(1, 1))  # a new mtime even on coarse-clock file systems
    with pytest.raises(DataError, match="'mask' values lie in"):
        inspect_cube(path, fold=0)


def test_compressed_and_plain_cubes_read_alike(tmp_path):
    volume, mask = cube_arrays(np.random.default_rng(3), True)
    plain = write_cube(tmp_path / "fold_0" / "pos_a_0.npz", volume, mask, label=1, fold=0)
    packed = write_cube(tmp_path / "fold_0" / "pos_b_0.npz", volume, mask, label=1, fold=0,
                        compress=True)
    items = NpzCubeDataset([inspect_cube(plain, fold=0), inspect_cube(packed, fold=0)])
    np.testing.assert_array_equal(items[0]["image"], items[1]["image"])
    assert packed.stat().st_size < plain.stat().st_size


def test_select_keeps_positives_or_an_even_share_of_each_fold_and_class(cubes):
    records = scan_cubes(cubes).records(range(5))
    positives = select_records(records, only_positive=True)
    assert len(positives) == 10 and all(r.label == 1 for r in positives)
    small = select_records(records, fraction=0.1)
    # 10 % of 2 positives and of 3 negatives rounds up to one of each, in every fold.
    expected = [(fold, label) for fold in range(5) for label in (0, 1)]
    assert sorted((r.fold, r.label) for r in small) == expected
    assert small == select_records(records, fraction=0.1)  # the same subset every time
    half = select_records(records, fraction=0.5)
    assert len(half) == 5 * (1 + 2)


def test_dataset_items_binarise_the_mask_above_the_threshold(tmp_path):
    volume = np.full(SHAPE, 7, np.uint8)
    mask = np.zeros(SHAPE, np.float16)
    mask[0, 0, :3] = [0.1, 0.1001, 0.5]
    path = write_cube(tmp_path / "fold_0" / "pos_s_0.npz", volume, mask, label=1, fold=0)
    item = NpzCubeDataset([inspect_cube(path, fold=0)], label_threshold=0.1)[0]
    assert item["image"].shape == (1, *SHAPE) and item["image"].dtype == np.float32
    assert float(item["image"].max()) == 7.0
    assert item["mask"][0, 0, 0, :3].tolist() == [0.0, 1.0, 1.0]
    assert item["label"] == 1.0 and item["name"] == "pos_s_0.npz"
    higher = NpzCubeDataset([inspect_cube(path, fold=0)], label_threshold=0.3)[0]
    assert higher["mask"].sum() == 1


def test_statistics_count_cubes_per_fold_and_class(cubes):
    stats = cube_statistics(scan_cubes(cubes), label_threshold=0.1)
    assert stats["cubes"]["fold_2"] == {"positive": 2, "negative": 3}
    assert stats["cubes"]["test"] == {"positive": 1, "negative": 1}
    assert stats["series"] == 5 * 3 + 1
    assert stats["cube_shape"] == list(SHAPE)
    assert 0 < stats["positive_foreground_fraction"] < 0.1


# ---------------------------------------------------------------------------- cached loading
def same_sample(a, b) -> bool:
    return (a.keys() == b.keys() and a["name"] == b["name"] and a["index"] == b["index"]
            and float(a["label"]) == float(b["label"])
            and all(np.array_equal(np.asarray(a[k]), np.asarray(b[k])) for k in ("image", "mask")))


@pytest.mark.parametrize("cache", ["memory", "disk"])
def test_cached_loading_gives_the_samples_of_the_plain_dataset(tmp_path, cache):
    records = scan_cubes(write_cubes_dir(tmp_path / "cubes"), cube_shape=SHAPE).records(range(5))
    for train in (False, True):
        def make(mode):
            return cube_dataset(records, label_threshold=0.1, cache=mode,
                                cache_dir=tmp_path / "cache",
                                transform=cube_transforms(train=train, crop_size=(4, 16, 16)))
        plain = make("none")
        for round_ in range(2):  # the disk cache is written, then read
            cached = make(cache)
            assert cached.records == plain.records and len(cached) == len(plain)
            for index in range(len(plain)):
                plain.transform.set_random_state(index)
                cached.transform.set_random_state(index)
                assert same_sample(plain[index], cached[index]), (train, round_, index)
    if cache == "disk":
        assert len(list((tmp_path / "cache").iterdir())) == 2 * len(records)  # train, validation


def test_memory_cache_reads_each_file_once(tmp_path, monkeypatch):
    records = scan_cubes(write_cubes_dir(tmp_path / "cubes"), cube_shape=SHAPE).records(range(5))
    reads = []
    original = npz_cubes.read_cube
    monkeypatch.setattr(npz_cubes, "read_cube", lambda path: reads.append(path) or original(path))
    dataset = npz_cubes.cube_dataset(records, cache="memory")
    for _ in range(3):
        for index in range(len(dataset)):
            dataset[index]
    assert len(reads) == len(records)
    with pytest.raises(ValueError, match="cache must be one of none, memory, disk"):
        npz_cubes.cube_dataset(records, cache="ram")
