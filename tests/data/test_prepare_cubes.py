"""Cutting cubes from NIfTI volumes: placement, reorientation, masks, folds and bad input."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from medseg.data.npz_cubes import TEST_FOLD, scan_cubes
from medseg.data.prepare_cubes import prepare_cubes, to_uint8
from medseg.errors import ConfigError, DataError

CUBE = (8, 16, 16)
SHAPE_XYZ = (40, 36, 20)
SPACING_XYZ = (1.0, 1.0, 2.0)
BALL_IJK = (12, 20, 9)
LPS = np.array([[0, -1], [1, -1], [2, 1]])


def ras_image(ball=BALL_IJK, seed=0) -> nib.Nifti1Image:
    """Brain-like noise (about 30 HU) with one contrast-filled ball of 300 HU at ``ball``."""
    rng = np.random.default_rng(seed)
    data = rng.normal(30, 5, SHAPE_XYZ)
    if ball is not None:
        i, j, k = np.meshgrid(*[np.arange(n) for n in SHAPE_XYZ], indexing="ij")
        distance2 = sum(((a - b) * s) ** 2 for a, b, s in zip((i, j, k), ball, SPACING_XYZ))
        data[distance2 <= 9] = 300
    affine = np.diag([*SPACING_XYZ, 1.0])
    affine[:3, 3] = [-20, -18, -20]
    return nib.Nifti1Image(data.astype(np.int16), affine)


def write_inputs(folder: Path, *, positives: int = 6, negatives: int = 4, space: str = "voxel",
                 lps: bool = False) -> Path:
    """``positives`` series with a ball (listed in the CSV), ``negatives`` without."""
    folder.mkdir(parents=True, exist_ok=True)
    columns = (("voxel_x", "voxel_y", "voxel_z") if space == "voxel"
               else ("world_x", "world_y", "world_z"))
    rows = []
    for index in range(positives + negatives):
        series = f"1.2.3.{index}"
        image = ras_image(BALL_IJK if index < positives else None, seed=index)
        if index < positives:
            point = BALL_IJK if space == "voxel" else tuple((image.affine @ [*BALL_IJK, 1])[:3])
            if lps and space == "voxel":
                point = (SHAPE_XYZ[0] - 1 - BALL_IJK[0], SHAPE_XYZ[1] - 1 - BALL_IJK[1],
                         BALL_IJK[2])
            rows.append((series, *point))
        nib.save(image.as_reoriented(LPS) if lps else image, folder / f"{series}.nii.gz")
    with open(folder / "aneurysm_centres.csv", "w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(("series_id", *columns, "location"))
        writer.writerows([(*row, "somewhere") for row in rows])
    return folder


def prepare(tmp_path, volumes, name="cubes", **options):
    settings = dict(cube_shape=CUBE, positive_jitter=0.0, test_fraction=0.0,
                    intensity_window=[-100, 700], negatives_per_series=1)
    settings.update(options)
    return prepare_cubes(volumes, tmp_path / name, **settings)


def cubes_of(folder: Path) -> dict[str, dict]:
    return {path.name: dict(np.load(path)) for path in sorted(folder.rglob("*.npz"))}


def test_positive_cubes_hold_the_aneurysm_at_the_mask_peak(tmp_path):
    summary = prepare(tmp_path, write_inputs(tmp_path / "volumes"))
    cubes = cubes_of(summary.output_dir)
    positives = {n: c for n, c in cubes.items() if n.startswith("pos_")}
    assert len(positives) == 6
    for cube in positives.values():
        assert cube["volume"].dtype == np.uint8 and cube["volume"].shape == CUBE
        assert cube["mask"].dtype == np.float16 and int(cube["label"]) == 1
        peak = np.unravel_index(np.argmax(cube["mask"]), CUBE)
        assert cube["mask"][peak] == pytest.approx(1.0, abs=1e-3)
        # The ball (300 HU) sits at the peak, centred.
        assert cube["volume"][peak] == to_uint8(np.float32([300]), [-100, 700])[0]
        assert peak == tuple(n // 2 for n in CUBE)


def test_the_mask_is_a_gaussian_in_millimetres(tmp_path):
    summary = prepare(tmp_path, write_inputs(tmp_path / "volumes"), mask_sigma_mm=2.0)
    cube = cubes_of(summary.output_dir)["pos_1.2.3.0_0.npz"]
    z, y, x = (n // 2 for n in CUBE)
    # One voxel is 2 mm along z and 1 mm along y and x.
    assert float(cube["mask"][z + 1, y, x]) == pytest.approx(np.exp(-4 / 8), abs=2e-3)
    assert float(cube["mask"][z, y + 1, x]) == pytest.approx(np.exp(-1 / 8), abs=2e-3)
    wider = prepare(tmp_path, write_inputs(tmp_path / "volumes"), name="wider", mask_sigma_mm=4.0)
    assert (cubes_of(wider.output_dir)["pos_1.2.3.0_0.npz"]["mask"] > 0.1).sum() > \
        (cube["mask"] > 0.1).sum()


@pytest.mark.parametrize("space, lps", [("world", False), ("voxel", True), ("world", True)])
def test_voxel_or_world_centres_and_any_orientation_give_the_same_cubes(tmp_path, space, lps):
    reference = cubes_of(prepare(tmp_path, write_inputs(tmp_path / "ras"), name="a").output_dir)
    other = cubes_of(prepare(tmp_path, write_inputs(tmp_path / "other", space=space, lps=lps),
                             name="b").output_dir)
    assert reference.keys() == other.keys()
    for name in reference:
        for key in ("volume", "mask", "label", "fold"):
            np.testing.assert_array_equal(reference[name][key], other[name][key], err_msg=name)


def test_negative_cubes_stay_clear_of_every_aneurysm(tmp_path):
    summary = prepare(tmp_path, write_inputs(tmp_path / "volumes"), negatives_per_series=2)
    negatives = {n: c for n, c in cubes_of(summary.output_dir).items() if n.startswith("neg_")}
    assert len(negatives) + summary.negatives_not_placed == 20
    assert len(negatives) >= 12
    for cube in negatives.values():
        assert int(cube["label"]) == 0 and float(cube["mask"].max()) < 0.01


def test_folds_split_by_series_with_positives_in_each_and_a_test_share(tmp_path):
    volumes = write_inputs(tmp_path / "volumes", positives=7, negatives=6)
    summary = prepare(tmp_path, volumes, test_fraction=0.3, negatives_per_series=1)
    index = scan_cubes(summary.output_dir, cube_shape=CUBE)
    assert sum(r.label for r in index.folds[TEST_FOLD]) == 2  # 30 % of 7 positive series
    for fold in range(5):
        assert any(r.label == 1 for r in index.folds[fold])
    rows = list(csv.DictReader(open(summary.output_dir / "series_folds.csv")))
    assert len(rows) == 13 and {int(r["fold"]) for r in rows} == {-1, 0, 1, 2, 3, 4}
    record = json.loads((summary.output_dir / "preparation.json").read_text())
    assert record["settings"]["cube_shape"] == list(CUBE)
    seeded = prepare(tmp_path, volumes, name="again", test_fraction=0.3, seed=5)
    reseeded = list(csv.DictReader(open(seeded.output_dir / "series_folds.csv")))
    assert [r["fold"] for r in reseeded] != [r["fold"] for r in rows]


def test_intensities_map_a_window_or_the_percentiles_to_uint8():
    data = np.array([-200.0, -100, 340, 700, 900])
    assert to_uint8(data, [-100, 700]).tolist() == [0, 0, 140, 255, 255]
    spread = np.linspace(0, 1000, 1001)
    mapped = to_uint8(spread, None)
    assert mapped[5] == 0 and mapped[995] == 255 and mapped[500] == 128


def test_target_spacing_resamples_before_cutting(tmp_path):
    summary = prepare(tmp_path, write_inputs(tmp_path / "volumes"), target_spacing=[1.0, 1.0, 1.0])
    cube = cubes_of(summary.output_dir)["pos_1.2.3.0_0.npz"]
    # At 1 mm slices the ball (radius 3 mm) spans about 7 slices instead of 3.
    bright_slices = (cube["volume"] > 100).any(axis=(1, 2)).sum()
    assert 5 <= bright_slices <= 8


def test_compressed_cubes_are_smaller_and_identical(tmp_path):
    volumes = write_inputs(tmp_path / "volumes")
    plain = prepare(tmp_path, volumes, name="plain")
    packed = prepare(tmp_path, volumes, name="packed", compress=True)
    size = lambda folder: sum(p.stat().st_size for p in folder.rglob("*.npz"))  # noqa: E731
    assert size(packed.output_dir) < size(plain.output_dir)
    a, b = cubes_of(plain.output_dir), cubes_of(packed.output_dir)
    for name in a:
        np.testing.assert_array_equal(a[name]["mask"], b[name]["mask"])


@pytest.mark.parametrize("csv_text, message", [
    (None, r"aneurysm centres file .* does not exist"),
    ("series,voxel_x,voxel_y,voxel_z\n1.2.3.0,1,2,3\n",
     r"has columns series, voxel_x, voxel_y, voxel_z; expected series_id and either voxel_x"),
    ("series_id,x,y,z\n1.2.3.0,1,2,3\n", r"columns x, y, z do not say whether they are voxel "
                                         r"indices or millimetres; name them voxel_x"),
    ("series_id,voxel_x,voxel_y,voxel_z\n9.9.9,1,2,3\n",
     r"aneurysm_centres\.csv:2: series '9\.9\.9' has no volume"),
    ("series_id,voxel_x,voxel_y,voxel_z\n1.2.3.0,1,two,3\n",
     r"aneurysm_centres\.csv:2: voxel_y='two' is not a number"),
    ("+1.2.3.7,1,2,300\n", r"centres CSV line 8: voxel coordinates \[1\.0, 2\.0, 300\.0\] "
                           r"lie outside 1\.2\.3\.7\.nii\.gz"),
])
def test_bad_centre_tables_are_named(tmp_path, csv_text, message):
    volumes = write_inputs(tmp_path / "volumes")
    table = volumes / "aneurysm_centres.csv"
    if csv_text is None:
        table.unlink()
    elif csv_text.startswith("+"):  # one more row
        table.write_text(table.read_text() + csv_text[1:].rstrip("\n") + ",somewhere\n")
    else:
        table.write_text(csv_text)
    with pytest.raises(DataError, match=message):
        prepare(tmp_path, volumes)
    assert not (tmp_path / "cubes").exists()


def test_too_few_series_with_aneurysms_for_five_folds(tmp_path):
    with pytest.raises(DataError, match=r"only 3 series with aneurysms remain for the 5 folds"):
        prepare(tmp_path, write_inputs(tmp_path / "volumes", positives=3))


def test_an_unreadable_volume_leaves_no_half_written_folder(tmp_path):
    volumes = write_inputs(tmp_path / "volumes")
    (volumes / "1.2.3.9.nii.gz").write_bytes(b"garbage")
    with pytest.raises(DataError, match=r"1\.2\.3\.9\.nii\.gz could not be read as a NIfTI"):
        prepare(tmp_path, volumes)
    assert not (tmp_path / "cubes").exists()
    assert not list(tmp_path.glob(".cubes.*"))


def test_existing_output_is_replaced_only_with_overwrite(tmp_path):
    volumes = write_inputs(tmp_path / "volumes")
    prepare(tmp_path, volumes)
    with pytest.raises(DataError, match=r"already contains files.*overwrite=True"):
        prepare(tmp_path, volumes)
    prepare(tmp_path, volumes, overwrite=True, negatives_per_series=0)
    assert not list((tmp_path / "cubes").rglob("neg_*.npz"))


def test_an_empty_volumes_folder_and_bad_settings_are_named(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match=r"holds no NIfTI volumes"):
        prepare(tmp_path, tmp_path / "empty")
    with pytest.raises(ConfigError, match=r"^intensity_window must be \[low, high\] "
                                          r"with low < high"):
        prepare(tmp_path, write_inputs(tmp_path / "volumes"), intensity_window=[5, 5])


def test_the_config_check_names_the_prepare_entry(tmp_path):
    # The library names its argument; an `aneurysm_cubes.py prepare` user is told the entry.
    from support import load_experiment

    ex = load_experiment("aneurysm_cubes").ex
    with pytest.raises(ConfigError, match=r"^prepare\.intensity_window must be \[low, high\] "
                                          r"with low < high, got \[5, 5\]"):
        ex.run("prepare", config_updates={"volumes_dir": str(tmp_path),
                                          "prepare": {"intensity_window": [5, 5]},
                                          "tracking": {"observer": "none"}})
