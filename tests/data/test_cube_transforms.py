"""Cube preprocessing and augmentation: z-score, random crop, axial rotations, z/y flips."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from medseg.data.cube_transforms import cube_transforms
from medseg.errors import ConfigError

SHAPE = (8, 16, 16)


def ramp_sample():
    """An image whose voxel values encode their position, and a mask equal to one corner."""
    image = np.arange(np.prod(SHAPE), dtype=np.float32).reshape(1, *SHAPE)
    mask = np.zeros((1, *SHAPE), np.float32)
    mask[0, :2, :3, :4] = 1
    return {"image": image, "mask": mask, "label": np.float32(1), "name": "pos_a_0.npz"}


def positions(image: torch.Tensor) -> np.ndarray:
    """Undo the z-score of the ramp: the original flat index of every voxel."""
    values = image.numpy()[0]
    ramp = np.arange(np.prod(SHAPE), dtype=np.float64)
    return np.rint(values * ramp.std() + ramp.mean()).astype(int)


def test_validation_only_zscores_whole_cubes():
    out = cube_transforms(train=False, crop_size=(4, 8, 8))(ramp_sample())
    assert out["image"].shape == (1, *SHAPE) and out["image"].dtype == torch.float32
    assert float(out["image"].mean()) == pytest.approx(0, abs=1e-5)
    assert float(out["image"].std(unbiased=False)) == pytest.approx(1, abs=1e-4)
    assert torch.equal(out["mask"], torch.from_numpy(ramp_sample()["mask"]))
    assert out["name"] == "pos_a_0.npz"


def test_training_crops_a_contiguous_block_at_random_places():
    transform = cube_transforms(train=True, crop_size=(4, 8, 8), augment=False)
    corners = set()
    for seed in range(12):
        transform.set_random_state(seed)
        out = transform(ramp_sample())
        assert out["image"].shape == (1, 4, 8, 8) and out["mask"].shape == (1, 4, 8, 8)
        index = positions(out["image"])
        z, y, x = np.unravel_index(index, SHAPE)
        # Unaugmented: axes keep their order and direction, one voxel per step.
        assert np.all(np.diff(z, axis=0) == 1) and np.all(np.diff(y, axis=1) == 1)
        assert np.all(np.diff(x, axis=2) == 1)
        corners.add((z[0, 0, 0], y[0, 0, 0], x[0, 0, 0]))
    assert len(corners) > 6


def test_augmentation_keeps_image_and_mask_aligned_and_z_ordered():
    transform = cube_transforms(train=True, crop_size=(8, 16, 16), augment=True,
                                rotate_probability=1.0, flip_probability=0.5)
    seen = set()
    for seed in range(20):
        transform.set_random_state(seed)
        sample = ramp_sample()
        out = transform(sample)
        index = positions(out["image"])
        z, y, x = np.unravel_index(index, SHAPE)
        mask = sample["mask"][0].reshape(-1)[index]
        np.testing.assert_array_equal(out["mask"].numpy()[0], mask)
        # Rotations stay in the axial plane: each output slice is one input slice.
        assert all(len(np.unique(z[k])) == 1 for k in range(SHAPE[0]))
        seen.add((z[0, 0, 0], y[0, 0, 0], x[0, 0, 0]))
    assert len(seen) > 4  # several orientations were drawn


@pytest.mark.parametrize("rotate, flip", [(0.0, 0.0), (1.0, 0.0), (0.0, 1.0)])
def test_probabilities_switch_rotations_and_flips(rotate, flip):
    transform = cube_transforms(train=True, crop_size=SHAPE, rotate_probability=rotate,
                                flip_probability=flip)
    transform.set_random_state(3)
    index = positions(transform(ramp_sample())["image"])
    identity = np.arange(np.prod(SHAPE)).reshape(SHAPE)
    z, y, x = np.unravel_index(index, SHAPE)
    if rotate == 0 and flip == 0:
        np.testing.assert_array_equal(index, identity)
    if flip == 1:  # both z and y flipped, x kept
        assert z[0, 0, 0] == SHAPE[0] - 1 and y[0, 0, 0] == SHAPE[1] - 1 and x[0, 0, 0] == 0
    if rotate == 1:
        assert not np.array_equal(index, identity)
        np.testing.assert_array_equal(z[:, 0, 0], np.arange(SHAPE[0]))


def test_bad_settings_are_named():
    with pytest.raises(ConfigError, match=r"^crop_size must be a list of 3"):
        cube_transforms(train=True, crop_size=(8, 8))
    with pytest.raises(ConfigError, match=r"^flip_probability must be a number"):
        cube_transforms(train=True, crop_size=(8, 8, 8), flip_probability=2)


def small_blob_sample():
    """A 8x32x32 cube with a 2x2x2 aneurysm in one corner: a random 4x8x8 crop rarely holds it."""
    image = np.random.default_rng(0).normal(100, 10, (1, 8, 32, 32)).astype(np.float32)
    mask = np.zeros((1, 8, 32, 32), np.float32)
    mask[0, 1:3, 2:4, 27:29] = 1
    return {"image": image, "mask": mask, "label": np.float32(1), "name": "pos_a_0.npz"}


def foreground_share(foreground_fraction: float, crops: int = 60) -> float:
    transform = cube_transforms(train=True, crop_size=(4, 8, 8), augment=False,
                                foreground_fraction=foreground_fraction)
    transform.set_random_state(0)
    hits = 0
    for _ in range(crops):
        out = transform(small_blob_sample())
        assert isinstance(out, dict) and out["image"].shape == (1, 4, 8, 8)
        assert out["name"] == "pos_a_0.npz"
        hits += bool(out["mask"].sum() > 0)
    return hits / crops


def test_foreground_fraction_centres_that_share_of_crops_on_the_aneurysm():
    random_share = foreground_share(0.0)
    assert random_share < 0.2  # the seed's random crop: the blob is a small corner
    assert foreground_share(1.0) == 1.0
    third = foreground_share(1 / 3)
    assert 0.2 < third < 0.6 and third > random_share + 0.1


def test_foreground_crops_of_a_negative_cube_are_background_crops_without_warnings(recwarn):
    sample = small_blob_sample()
    sample["mask"][:] = 0
    transform = cube_transforms(train=True, crop_size=(4, 8, 8), foreground_fraction=0.5)
    transform.set_random_state(1)
    out = transform(sample)
    assert out["image"].shape == (1, 4, 8, 8) and float(out["mask"].sum()) == 0
    assert not [w for w in recwarn if "foreground" in str(w.message)]
