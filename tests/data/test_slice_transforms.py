"""2D slice transforms: resizing, and the seed's augmentation list built from MONAI."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch
from monai.data.utils import set_rnd

from medseg.data.slice_transforms import SliceAugmentation, image_transform, slice_transforms

PROBABILITIES = [f.name for f in dataclasses.fields(SliceAugmentation)
                 if f.name.endswith("probability")]
NONE = SliceAugmentation(**{name: 0.0 for name in PROBABILITIES})


def sample(size=(48, 40)):
    """A bright disc (the 'tumour') on a gradient; the mask is the disc."""
    yy, xx = np.mgrid[:size[0], :size[1]]
    mask = ((yy - 20) ** 2 + (xx - 14) ** 2 <= 36).astype(np.float32)
    image = (0.2 + 0.3 * xx / size[1] + 0.5 * mask).astype(np.float32)
    return {"image": image[None], "mask": mask[None]}


def apply(transform, seed=0):
    set_rnd(transform, seed)
    return transform(sample())


def only(**settings) -> SliceAugmentation:
    return dataclasses.replace(NONE, **settings)


def test_validation_resizes_and_keeps_the_mask_binary():
    out = apply(slice_transforms((32, 32), train=False, augmentation=SliceAugmentation()))
    assert out["image"].shape == (1, 32, 32) and out["image"].dtype == torch.float32
    assert set(out["mask"].unique().tolist()) == {0.0, 1.0}
    assert type(out["image"]) is torch.Tensor  # no MetaTensor bookkeeping
    again = apply(slice_transforms((32, 32), train=False, augmentation=SliceAugmentation()), seed=5)
    assert torch.equal(out["image"], again["image"])


def test_without_augmentation_training_equals_validation():
    plain = apply(slice_transforms((32, 32), train=False))
    assert torch.equal(apply(slice_transforms((32, 32), train=True, augmentation=None))["image"],
                       plain["image"])
    assert torch.equal(apply(slice_transforms((32, 32), train=True, augmentation=NONE))["image"],
                       plain["image"])


@pytest.mark.parametrize("settings", [
    {"flip_probability": 1.0}, {"affine_probability": 1.0}, {"elastic_probability": 1.0,
                                                               "elastic_magnitude": (0.05, 0.1)},
    {"grid_distortion_probability": 1.0}])
def test_spatial_transforms_move_image_and_mask_together(settings):
    out = apply(slice_transforms((48, 40), train=True, augmentation=only(**settings)), seed=3)
    plain = sample()
    assert not np.array_equal(out["mask"].numpy(), plain["mask"])
    assert set(out["mask"].unique().tolist()) <= {0.0, 1.0}
    # The disc's pixels stay bright wherever the mask moved to.
    inside = out["image"][out["mask"] > 0.5]
    assert inside.numel() > 0 and inside.mean() > 0.6


@pytest.mark.parametrize("settings", [
    {"brightness_contrast_probability": 1.0, "contrast_limit": 0.0},
    {"brightness_contrast_probability": 1.0, "brightness_limit": 0.0},
    {"noise_probability": 1.0}, {"coarse_dropout_probability": 1.0}])
def test_intensity_transforms_change_the_image_only(settings):
    out = apply(slice_transforms((48, 40), train=True, augmentation=only(**settings)), seed=3)
    plain = sample()
    assert not np.allclose(out["image"].numpy(), plain["image"])
    assert np.array_equal(out["mask"].numpy(), plain["mask"])


@pytest.mark.parametrize("settings", [
    {"brightness_contrast_probability": 1.0, "brightness_limit": 0.5, "contrast_limit": 0.0},
    {"brightness_contrast_probability": 1.0, "brightness_limit": 0.0, "contrast_limit": 0.9},
    {"noise_probability": 1.0, "noise_std": 0.5}])
def test_brightness_contrast_and_noise_stay_within_0_and_1(settings):
    """Strong settings on a slice spanning [0, 1]: without clipping each pushes values out."""
    yy, xx = np.mgrid[:48, :40]
    image = (xx / 39.0).astype(np.float32)[None]   # 0 at the left edge, 1 at the right
    transform = slice_transforms((48, 40), train=True, augmentation=only(**settings))
    outside = 0
    for seed in range(6):
        set_rnd(transform, seed)
        out = transform({"image": image.copy(), "mask": np.zeros_like(image)})["image"]
        assert float(out.min()) >= 0.0 and float(out.max()) <= 1.0
        outside += int(((out == 0) | (out == 1)).sum())
        assert not np.allclose(out.numpy(), image)   # augmented, not left alone
    # Values were clipped, not rescaled: many pixels sit exactly on a bound.
    assert outside > 48


def test_coarse_dropout_zeroes_rectangles_within_the_size_limit():
    aug = only(coarse_dropout_probability=1.0, coarse_dropout_holes=3, coarse_dropout_size=0.125)
    out = apply(slice_transforms((48, 40), train=True, augmentation=aug), seed=1)
    zeroed = (out["image"][0] == 0).numpy()
    assert 0 < zeroed.sum() <= 3 * 6 * 5


def test_flip_mirrors_the_width_axis():
    out = apply(slice_transforms((48, 40), train=True, augmentation=only(flip_probability=1.0)))
    assert np.array_equal(out["mask"][0].numpy(), sample()["mask"][0][:, ::-1])


def test_probability_is_the_share_of_augmented_samples():
    transform = slice_transforms((48, 40), train=True, augmentation=only(flip_probability=0.3))
    set_rnd(transform, 0)
    flipped = sum(not np.array_equal(transform(sample())["mask"].numpy(), sample()["mask"])
                  for _ in range(200))
    assert 40 <= flipped <= 80


def test_image_transform_resizes_a_single_image():
    out = image_transform((32, 32))({"image": sample()["image"]})
    assert out["image"].shape == (1, 32, 32)
