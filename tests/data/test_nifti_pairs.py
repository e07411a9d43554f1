"""Image/label pairs of the SMALabeller layout: finding, splitting, checking, preprocessing."""

from __future__ import annotations

import nibabel as nib
import numpy as np
import pytest
import torch
from sklearn.model_selection import train_test_split

from monai.transforms import RandBiasFieldd

from medseg.data.mri_transforms import BIAS_FIELD_COEFFICIENTS, make_dataset, make_loader
from medseg.data.nifti_pairs import check_pairs, find_pairs, split_pairs
from medseg.data.synthetic.smalabeller import BrainSettings, generate_brain_dataset
from medseg.errors import DataError

SETTINGS = BrainSettings((24, 24), (12, 20), (1.0, 2.0), 0.02, seed=3)


@pytest.fixture(scope="module")
def brains(tmp_path_factory):
    return generate_brain_dataset(tmp_path_factory.mktemp("sma") / "data", num_cases=6,
                                  settings=SETTINGS)


def folders(root):
    return root / "imagesTr_resampled", root / "labelsTr_resampled"


def test_pairs_are_found_from_the_labels(brains):
    pairs = find_pairs(*folders(brains))
    assert [p.case for p in pairs] == [f"sma_{i:03d}" for i in range(1, 7)]
    assert all(p.image.name == f"{p.case}_0000.nii.gz" for p in pairs)


@pytest.mark.parametrize("size", [0.2, 0.34, 0.5])
def test_split_has_the_validation_cases_of_train_test_split(brains, size):
    pairs = find_pairs(*folders(brains))
    train, val = split_pairs(pairs, size, seed=42)
    expected_train, expected_val = train_test_split(pairs, test_size=size, random_state=42)
    assert (train, val) == (expected_train, expected_val)


@pytest.mark.parametrize("size", [0.0, 1.0, 1.5])
def test_split_fraction_outside_0_1_is_refused(brains, size):
    with pytest.raises(ValueError, match="val_set_size must be in"):
        split_pairs(find_pairs(*folders(brains)), size)


def test_split_leaving_no_training_case_is_refused(brains):
    with pytest.raises(DataError, match="leaves 0 for training"):
        split_pairs(find_pairs(*folders(brains))[:2], 0.9)


def copy_of(brains, tmp_path):
    images, labels = folders(tmp_path)
    images.mkdir()
    labels.mkdir()
    for source, target in zip(folders(brains), (images, labels)):
        for path in source.iterdir():
            (target / path.name).write_bytes(path.read_bytes())
    return images, labels


def test_label_without_image_is_named(brains, tmp_path):
    images, labels = copy_of(brains, tmp_path)
    (images / "sma_002_0000.nii.gz").unlink()
    with pytest.raises(DataError, match=r"label .*sma_002.nii.gz has no image .*sma_002_0000"):
        find_pairs(images, labels)


def test_image_without_label_is_named(brains, tmp_path):
    images, labels = copy_of(brains, tmp_path)
    (labels / "sma_003.nii.gz").unlink()
    with pytest.raises(DataError, match=r"image .*sma_003_0000.nii.gz has no label"):
        find_pairs(images, labels)


def test_no_pairs_at_all(tmp_path):
    (tmp_path / "i").mkdir()
    (tmp_path / "l").mkdir()
    with pytest.raises(DataError, match="no image/label pairs"):
        find_pairs(tmp_path / "i", tmp_path / "l")


def rewrite(path, array):
    nib.save(nib.Nifti1Image(array, np.eye(4)), path)


def test_bad_label_values_shapes_and_4d_images_are_named(brains, tmp_path):
    images, labels = copy_of(brains, tmp_path)
    pairs = find_pairs(images, labels)
    label = np.asarray(nib.load(pairs[0].label).dataobj).copy()
    label[0, 0, 0] = 2
    rewrite(pairs[0].label, label)
    with pytest.raises(DataError, match=r"sma_001.nii.gz holds values \[2.0\]; expected a binary"):
        check_pairs(pairs)
    rewrite(pairs[0].label, label[:-1].clip(0, 1))
    with pytest.raises(DataError, match="sma_001_0000.nii.gz has shape .* but its label"):
        check_pairs(pairs)
    rewrite(pairs[0].image, np.zeros((*label.shape, 2), np.float32))
    with pytest.raises(DataError, match="has shape .*; expected a 3D single-channel"):
        check_pairs(pairs)


def test_generated_cases_vary_in_depth_spacing_and_orientation(brains):
    pairs = find_pairs(*folders(brains))
    stats = check_pairs(pairs)
    assert len({tuple(s) for s in stats["shapes"]}) > 1
    assert {s[2] for s in stats["spacings"]} == {1.0, 2.0} or len(stats["spacings"]) < 3
    codes = {nib.aff2axcodes(nib.load(p.image).affine) for p in pairs}
    assert len(codes) > 1


def test_preprocessing_reorients_resamples_and_pads_the_batch(brains):
    pairs = find_pairs(*folders(brains))
    data = make_dataset([p.as_dict() for p in pairs], (1.0, 1.0, 1.0), train=False,
                        augment=False, crop_size=(16, 16, 8), crops_per_volume=2)
    depths = set()
    for index in range(len(data)):
        item = data[index]
        # Drawn 24 x 24 at 1 mm in RAS: every case comes back to that grid (in any storage
        # orientation), with the head's superior half (the ribbon) at the top of z.
        assert tuple(item["image"].shape[1:3]) == (24, 24)
        assert 0.0 <= float(item["image"].min()) and float(item["image"].max()) <= 1.0
        assert item["label"].dtype == torch.float32
        z = torch.nonzero(item["label"][0])[:, 2].float()
        assert z.mean() > item["label"].shape[-1] * 0.4
        depths.add(item["image"].shape[-1])
    assert len(depths) > 1
    batch = next(iter(make_loader(data, batch_size=3, shuffle=False, num_workers=0, seed=0)))
    assert batch["image"].shape[0] == 3 and batch["image"].shape[-1] == max(
        data[i]["image"].shape[-1] for i in range(3))


def test_training_crops_are_flattened_into_the_batch(brains):
    pairs = find_pairs(*folders(brains))
    data = make_dataset([p.as_dict() for p in pairs], (1.0, 1.0, 1.0), train=True, augment=True,
                        crop_size=(16, 16, 8), crops_per_volume=3)
    batch = next(iter(make_loader(data, batch_size=2, shuffle=True, num_workers=0, seed=0)))
    assert tuple(batch["image"].shape) == (6, 1, 16, 16, 8)
    assert tuple(batch["label"].shape) == (6, 1, 16, 16, 8)


def test_the_bias_field_augmentation_keeps_intensities_in_range(brains):
    # The original's coefficient range (0, 0.7) multiplied images by up to ~1000, which
    # collapsed the model's evaluation-mode output; the field now stays a few-fold at most.
    pairs = find_pairs(*folders(brains))
    item = make_dataset([pairs[0].as_dict()], (1.0, 1.0, 1.0), train=False, augment=False,
                        crop_size=(16, 16, 8), crops_per_volume=1)[0]
    field = RandBiasFieldd(keys="image", prob=1.0, coeff_range=BIAS_FIELD_COEFFICIENTS)
    for seed in range(10):
        field.set_random_state(seed)
        assert float(field({"image": item["image"]})["image"].max()) < 4.0


def test_crops_of_volumes_smaller_than_the_crop_size_are_padded_into_one_batch(brains):
    # Heads of 12..20 slices cropped at 32: each crop is its volume's size, so they differ.
    pairs = find_pairs(*folders(brains))
    data = make_dataset([p.as_dict() for p in pairs], (1.0, 1.0, 1.0), train=True, augment=True,
                        crop_size=(32, 32, 32), crops_per_volume=2)
    batch = next(iter(make_loader(data, batch_size=3, shuffle=False, num_workers=0, seed=0)))
    assert tuple(batch["image"].shape[:4]) == (6, 1, 24, 24)
    assert batch["image"].shape[-1] == max(data[i][0]["image"].shape[-1] for i in range(3))
