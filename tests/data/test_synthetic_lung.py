"""The synthetic Task006_Lung: MSD layout, chest-like HU, varied tumours, tumour-free cases."""

from __future__ import annotations

import json

import nibabel as nib
import numpy as np
import pytest
from scipy import ndimage

from medseg.data.synthetic.lung import LungGeneratorSettings, generate_lung_task, render_volume
from medseg.errors import ConfigError, DataError

SIZE = (48, 48, 16)


@pytest.fixture(scope="module")
def task(tmp_path_factory):
    return generate_lung_task(tmp_path_factory.mktemp("msd") / "Task006_Lung", num_volumes=8,
                              volume_size=SIZE, tumor_free_fraction=0.3, seed=2)


def load(path):
    image = nib.load(path)
    return np.asarray(image.dataobj), image


def test_writes_the_msd_layout(task):
    description = json.loads((task / "dataset.json").read_text())
    assert description["modality"] == {"0": "CT"}
    assert description["labels"] == {"0": "background", "1": "cancer"}
    assert description["numTraining"] == 8 == len(description["training"])
    for entry in description["training"]:
        image, image_nifti = load(task / entry["image"])
        label, label_nifti = load(task / entry["label"])
        assert image.dtype == np.int16 and image.shape == SIZE
        assert label.dtype == np.uint8 and label.shape == SIZE
        assert set(np.unique(label)) <= {0, 1}
        assert np.allclose(image_nifti.affine, label_nifti.affine)
        # The voxel size keeps the chest's physical size: 380 mm across, 260 mm high.
        assert image_nifti.header.get_zooms()[0] * SIZE[0] == pytest.approx(380, rel=1e-3)


def test_intensities_are_chest_ct_in_hounsfield_units(task):
    image, _ = load(task / "imagesTr" / "lung_001.nii.gz")
    middle = image[:, :, SIZE[2] // 2].astype(float)
    corner = middle[:4, :4]
    assert abs(corner.mean() + 1000) < 60                       # air outside the body
    assert ((middle > -950) & (middle < -700)).mean() > 0.08    # lung parenchyma
    assert ((middle > -150) & (middle < 100)).mean() > 0.08     # fat, muscle, mediastinum
    assert (middle > 300).sum() > 5                             # ribs and spine


def test_tumours_vary_and_some_volumes_have_none(task):
    sizes, centres, empty = [], [], 0
    for path in sorted((task / "labelsTr").glob("*.nii.gz")):
        label, _ = load(path)
        components, count = ndimage.label(label)
        empty += count == 0
        for index in range(1, count + 1):
            voxels = np.argwhere(components == index)
            sizes.append(len(voxels))
            centres.append(voxels.mean(0))
    assert empty >= 1 and len(sizes) >= 4
    assert max(sizes) > 3 * min(sizes)
    assert np.ptp(np.array(centres), axis=0)[:2].min() > 8  # spread over the chest


def test_tumours_sit_in_the_lungs_and_are_denser_than_lung(task):
    for path in sorted((task / "labelsTr").glob("*.nii.gz")):
        label, _ = load(path)
        if not label.any():
            continue
        image, _ = load(task / "imagesTr" / path.name)
        tumour = image[label > 0].astype(float)
        ring = ndimage.binary_dilation(label > 0, iterations=2) & (label == 0)
        assert tumour.mean() > -200                      # solid soft tissue
        assert (image[ring] < -500).mean() > 0.3         # mostly surrounded by lung


def test_each_volume_depends_only_on_seed_and_index():
    settings = LungGeneratorSettings((32, 32, 16), 0.2, 3, 20.0, 5)
    first, label_first = render_volume(np.random.default_rng([5, 3]), settings)
    again, label_again = render_volume(np.random.default_rng([5, 3]), settings)
    other, _ = render_volume(np.random.default_rng([5, 4]), settings)
    assert np.array_equal(first, again) and np.array_equal(label_first, label_again)
    assert not np.array_equal(first, other)


def test_refuses_to_overwrite_without_permission(task, tmp_path):
    with pytest.raises(DataError, match="already contains files.*set overwrite=True"):
        generate_lung_task(task, num_volumes=1, volume_size=(32, 32, 16))
    target = tmp_path / "T"
    generate_lung_task(target, num_volumes=1, volume_size=(32, 32, 16), seed=1)
    generate_lung_task(target, num_volumes=2, volume_size=(32, 32, 16), overwrite=True)
    assert len(list((target / "imagesTr").iterdir())) == 2
    assert [p.name for p in tmp_path.iterdir()] == ["T"]  # no staging folder left behind


@pytest.mark.parametrize("name, value", [("num_volumes", 0), ("volume_size", (8, 8, 8)),
                                         ("tumor_free_fraction", 1.5), ("noise_std", -1)])
def test_bad_settings_name_the_argument(tmp_path, name, value):
    with pytest.raises(ConfigError, match=f"^{name} must"):
        generate_lung_task(tmp_path / "T", **{name: value})
    assert not (tmp_path / "T").exists()
