"""The SADAAN transforms: resampling, each augmentation parameter, normalisation, collation."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from monai.data import MetaTensor, list_data_collate

from medseg.data.transforms import sadaan_transforms
from medseg.errors import ConfigError

SIZE = (16, 12, 8)
NEUTRAL = {"noise_std": 0.0, "intensity_scale_range": (1.0, 1.0), "rotation_degrees": 0.0,
           "flip_probability": 0.0}


def make_sample(size=SIZE, index: int = 0) -> dict:
    """A bright box and a dimmer ball on a gradient, with their masks."""
    rng = np.random.default_rng(index)
    grid = np.stack(np.meshgrid(*[np.arange(n) for n in size], indexing="ij"))
    box = np.ones(size, bool)
    for axis, n in enumerate(size):
        box &= (grid[axis] >= n // 4) & (grid[axis] < n // 2)
    centre = np.array(size)[:, None, None, None] * 0.7
    ball = ((grid - centre) ** 2).sum(axis=0) < (min(size) / 5) ** 2
    image = 40 + 3 * grid[0] + 120 * box + 60 * ball + rng.normal(0, 1, size)
    return {"image": image[None].astype(np.float32),
            "mask": np.stack([box, ball]).astype(np.float32),
            "presence": np.ones(2, np.float32), "scenario": "normal", "index": index}


def run(transform, sample: dict, seed: int = 0) -> dict:
    transform.set_random_state(seed)
    return transform({key: value.copy() if isinstance(value, np.ndarray) else value
                      for key, value in sample.items()})


def augmented(seed: int = 0, **settings) -> dict:
    transform = sadaan_transforms(image_size=SIZE, train=True, augment=True,
                                  **{**NEUTRAL, **settings})
    return run(transform, make_sample(), seed)


@pytest.fixture
def plain() -> dict:
    return run(sadaan_transforms(image_size=SIZE, train=False, augment=True), make_sample())


def test_evaluation_output_is_a_z_scored_plain_tensor(plain):
    sample = make_sample()
    for key in ("image", "mask", "presence"):
        assert type(plain[key]) is torch.Tensor and not isinstance(plain[key], MetaTensor)
        assert plain[key].dtype == torch.float32
    assert plain["image"].mean().item() == pytest.approx(0.0, abs=1e-5)
    assert plain["image"].std(unbiased=False).item() == pytest.approx(1.0, abs=1e-4)
    expected = (sample["image"] - sample["image"].mean()) / sample["image"].std()
    np.testing.assert_allclose(plain["image"].numpy(), expected, atol=1e-4)
    np.testing.assert_array_equal(plain["mask"].numpy(), sample["mask"])
    assert plain["scenario"] == "normal" and plain["index"] == 0


@pytest.mark.parametrize("train, augment", [(False, True), (False, False), (True, False)])
def test_without_augmentation_the_output_is_deterministic(plain, train, augment):
    transform = sadaan_transforms(image_size=SIZE, train=train, augment=augment,
                                  noise_std=5.0, rotation_degrees=20.0, flip_probability=0.9,
                                  intensity_scale_range=(0.5, 2.0))
    for seed in (0, 1):
        out = run(transform, make_sample(), seed)
        torch.testing.assert_close(out["image"], plain["image"], rtol=0, atol=0)
        torch.testing.assert_close(out["mask"], plain["mask"], rtol=0, atol=0)


def test_neutral_augmentation_settings_change_nothing(plain):
    out = augmented()
    torch.testing.assert_close(out["image"], plain["image"], rtol=0, atol=0)
    torch.testing.assert_close(out["mask"], plain["mask"], rtol=0, atol=0)


def test_augmentation_is_reproducible_from_its_seed():
    settings = {"noise_std": 3.0, "rotation_degrees": 10.0, "flip_probability": 0.5,
                "intensity_scale_range": (0.9, 1.1)}
    first, again = augmented(4, **settings), augmented(4, **settings)
    other = augmented(5, **settings)
    torch.testing.assert_close(first["image"], again["image"], rtol=0, atol=0)
    assert not torch.equal(first["image"], other["image"])


def test_noise_std_is_in_raw_intensity_units(plain):
    raw = make_sample()["image"].ravel()
    design = np.stack([raw, np.ones_like(raw)], axis=1)
    for noise_std in (2.0, 20.0):
        out = augmented(noise_std=noise_std)
        # The output is z-score(raw + noise) = a * raw + b + noise * a: the residual of a fit
        # on the raw image, divided by the slope, is the noise in raw units.
        (slope, _), residuals, *_ = np.linalg.lstsq(design, out["image"].numpy().ravel(),
                                                    rcond=None)
        measured = np.sqrt(residuals[0] / raw.size) / slope
        assert measured == pytest.approx(noise_std, rel=0.1)
        torch.testing.assert_close(out["mask"], plain["mask"], rtol=0, atol=0)


def test_intensity_scale_range_multiplies_the_normalised_image(plain):
    torch.testing.assert_close(augmented(intensity_scale_range=(2.0, 2.0))["image"],
                               2.0 * plain["image"])
    factors = {round(augmented(seed, intensity_scale_range=(0.5, 1.5))["image"].std().item()
                     / plain["image"].std().item(), 4) for seed in range(6)}
    assert len(factors) == 6 and all(0.5 <= f <= 1.5 for f in factors)


def test_flip_probability_flips_each_axis(plain):
    out = augmented(flip_probability=1.0)
    torch.testing.assert_close(out["image"], torch.flip(plain["image"], dims=(1, 2, 3)))
    torch.testing.assert_close(out["mask"], torch.flip(plain["mask"], dims=(1, 2, 3)))
    flipped_axes = set()
    for seed in range(20):
        out = augmented(seed, flip_probability=0.5)
        for axis in (1, 2, 3):
            if torch.equal(out["mask"], torch.flip(plain["mask"], dims=(axis,))):
                flipped_axes.add(axis)
    assert flipped_axes == {1, 2, 3}


def test_rotation_degrees_rotates_image_and_mask_together():
    size = (32, 32, 16)  # large enough for a few degrees to move mask boundaries
    sample = make_sample(size)
    plain = run(sadaan_transforms(image_size=size, train=False, augment=False), sample)
    changed = {}
    for degrees in (5.0, 30.0):
        transform = sadaan_transforms(image_size=size, train=True, augment=True,
                                      **{**NEUTRAL, "rotation_degrees": degrees})
        fractions = []
        for seed in range(4):
            out = run(transform, sample, seed)
            assert set(out["mask"].unique().tolist()) <= {0.0, 1.0}
            box = out["mask"][0].bool()
            # The bright box moves with its mask.
            assert out["image"][0][box].mean() > out["image"][0][~box].mean() + 1.0
            fractions.append((out["mask"] != plain["mask"]).float().mean().item())
        changed[degrees] = np.mean(fractions)
    assert 0 < changed[5.0] < changed[30.0]


@pytest.mark.parametrize("size", [(20, 10, 12), (8, 8, 4)])
def test_resampling_to_another_size_keeps_masks_binary(size):
    transform = sadaan_transforms(image_size=size, train=False, augment=False)
    out = run(transform, make_sample())
    assert out["image"].shape == (1, *size)
    assert out["mask"].shape == (2, *size)
    assert set(out["mask"].unique().tolist()) == {0.0, 1.0}
    fraction_before = make_sample()["mask"].mean(axis=(1, 2, 3))
    np.testing.assert_allclose(out["mask"].mean(dim=(1, 2, 3)).numpy(), fraction_before,
                               atol=0.05)
    torch.testing.assert_close(out["presence"], torch.ones(2))


def test_a_multichannel_image_is_normalised_per_channel():
    sample = make_sample()
    sample["image"] = np.concatenate([sample["image"], 3 * sample["image"] + 50])
    out = run(sadaan_transforms(image_size=SIZE, train=False, augment=False), sample)
    assert out["image"].shape == (2, *SIZE)
    torch.testing.assert_close(out["image"][0], out["image"][1], atol=1e-4, rtol=1e-4)


def test_batches_collate_with_scenarios_and_indices():
    transform = sadaan_transforms(image_size=SIZE, train=True, augment=True)
    batch = list_data_collate([run(transform, make_sample(index=i), i) for i in range(3)])
    assert type(batch["image"]) is torch.Tensor
    assert batch["image"].shape == (3, 1, *SIZE) and batch["mask"].shape == (3, 2, *SIZE)
    assert batch["presence"].shape == (3, 2)
    assert batch["scenario"] == ["normal"] * 3
    assert batch["index"].tolist() == [0, 1, 2]


@pytest.mark.parametrize("key, value", [
    ("noise_std", -1.0),
    ("intensity_scale_range", (1.1, 0.9)),
    ("intensity_scale_range", (-0.5, 1.0)),
    ("rotation_degrees", -5.0),
    ("flip_probability", 1.5),
    ("flip_probability", -0.1),
])
def test_invalid_settings_name_their_argument(key, value):
    with pytest.raises(ConfigError, match=rf"^{key} must be"):
        sadaan_transforms(image_size=SIZE, train=True, augment=True, **{key: value})


def test_invalid_image_size():
    with pytest.raises(ConfigError, match=r"^image_size must be a list of 3 values"):
        sadaan_transforms(image_size=(16, 16), train=False, augment=False)
