"""Synthetic head CT angiographies: the files `prepare` reads, realistic intensities, visible
aneurysms at the listed centres, variation between series."""

from __future__ import annotations

import csv

import nibabel as nib
import numpy as np
import pytest

from medseg.data.npz_cubes import scan_cubes
from medseg.data.prepare_cubes import prepare_cubes
from medseg.data.synthetic.aneurysm import (
    CSV_COLUMNS,
    VolumeSettings,
    generate_aneurysm_volumes,
    render_series,
)
from medseg.errors import DataError

SMALL = dict(volume_shape=(32, 96, 96), spacing=(2.0, 1.8, 1.8))


@pytest.fixture(scope="module")
def volumes(tmp_path_factory):
    return generate_aneurysm_volumes(tmp_path_factory.mktemp("synthetic") / "volumes",
                                     num_series=10, aneurysm_fraction=0.6, seed=1, **SMALL)


def rows(folder):
    with open(folder / "aneurysm_centres.csv", newline="") as handle:
        return list(csv.DictReader(handle))


def canonical_hu(path):
    image = nib.as_closest_canonical(nib.load(path))
    return image, np.asarray(image.dataobj).astype(float)


def test_writes_one_nifti_per_series_and_the_centres_table(volumes):
    files = sorted(volumes.glob("*.nii.gz"))
    assert len(files) == 10
    assert all(f.name.startswith("1.2.826.0.1.3680043.8.498.1.") for f in files)
    table = rows(volumes)
    assert list(table[0]) == list(CSV_COLUMNS)
    positive = {r["series_id"] for r in table}
    assert 3 <= len(positive) <= 9  # some series have no aneurysm at all
    image = nib.load(files[0])
    assert image.shape == (96, 96, 32) and image.get_data_dtype() == np.int16
    assert image.header.get_zooms() == pytest.approx((1.8, 1.8, 2.0))


def test_half_the_series_are_stored_in_lps_orientation(volumes):
    codes = {nib.aff2axcodes(nib.load(p).affine) for p in volumes.glob("*.nii.gz")}
    assert codes == {("R", "A", "S"), ("L", "P", "S")}


def test_intensities_are_ct_angiography_hounsfield_units(volumes):
    _, hu = canonical_hu(next(volumes.glob("*.nii.gz")))
    assert np.percentile(hu, 5) < -900  # air around the head
    brain = hu[np.abs(hu - 32) < 40]
    assert 0.2 < brain.size / hu.size and abs(np.median(brain) - 32) < 8
    assert (hu > 600).mean() > 0.02  # skull
    assert ((hu > 200) & (hu < 500)).mean() > 0.0005  # contrast-filled vessels


def test_every_listed_aneurysm_is_a_bright_sac_at_its_centre(volumes):
    for row in rows(volumes):
        image, hu = canonical_hu(volumes / f"{row['series_id']}.nii.gz")
        world = [float(row[k]) for k in ("world_x", "world_y", "world_z")]
        i, j, k = np.rint(np.linalg.inv(image.affine) @ [*world, 1])[:3].astype(int)
        assert 0 <= i < hu.shape[0] and 0 <= j < hu.shape[1] and 0 <= k < hu.shape[2]
        assert hu[i, j, k] > 150, row  # contrast inside the sac, far above brain
        assert 1.5 <= float(row["radius_mm"]) <= 7.0


def test_series_differ_and_repeat_exactly_for_a_seed():
    settings = VolumeSettings((24, 64, 64), (2.0, 2.5, 2.5), 1.0, 15.0, seed=3)
    first, second = render_series(0, settings), render_series(1, settings)
    again = render_series(0, settings)
    np.testing.assert_array_equal(first.image.dataobj, again.image.dataobj)
    centres = [[a.centre.tolist() for a in s.aneurysms] for s in (first, again)]
    assert centres[0] == centres[1]
    a = np.asarray(nib.as_closest_canonical(first.image).dataobj, dtype=float)
    b = np.asarray(nib.as_closest_canonical(second.image).dataobj, dtype=float)
    assert np.abs(a - b).mean() > 20


def test_noise_std_sets_the_noise_level():
    def brain_std(noise):
        settings = VolumeSettings((24, 64, 64), (2.0, 2.5, 2.5), 0.0, noise, seed=0)
        hu = np.asarray(nib.as_closest_canonical(render_series(0, settings).image).dataobj, float)
        return hu[np.abs(hu - 32) < 60].std()
    assert brain_std(40.0) > 2 * brain_std(0.0)


def test_an_existing_folder_is_kept_unless_overwrite(volumes):
    with pytest.raises(DataError, match=r"already contains files.*overwrite=True"):
        generate_aneurysm_volumes(volumes, num_series=1, **SMALL)


def test_prepare_reads_the_generated_volumes(volumes, tmp_path):
    summary = prepare_cubes(volumes, tmp_path / "cubes", cube_shape=(8, 32, 32), test_fraction=0.0,
                            negatives_per_series=1)
    index = scan_cubes(summary.output_dir, cube_shape=(8, 32, 32))
    positives = sum(r.label for records in index.folds.values() for r in records)
    assert positives == len(rows(volumes))
