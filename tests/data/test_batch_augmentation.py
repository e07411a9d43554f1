"""SADAAN's augmentation on the training device (``augmentation.on_device``): the same
transforms as the loader's, on a batch, one random draw per case."""

from __future__ import annotations

import pytest
import torch
from monai.data import list_data_collate
from monai.transforms import Rotate

from medseg.data.batch_augmentation import SADAANBatchAugmentation
from medseg.data.transforms import sadaan_transforms
from medseg.errors import ConfigError

from data.test_transforms import NEUTRAL, SIZE, make_sample, run


def device_batch(count: int = 2, **settings) -> dict:
    """``count`` samples as the on-device loader gives them, collated."""
    transform = sadaan_transforms(image_size=SIZE, train=True, augment=True, on_device=True,
                                  **{**NEUTRAL, **settings})
    return list_data_collate([run(transform, make_sample(index=i), seed=i)
                              for i in range(count)])


def no_draws(batch: int) -> dict:
    return {"angles": torch.zeros(batch, 3), "flips": torch.zeros(batch, 3, dtype=torch.bool),
            "factors": torch.ones(batch)}


def test_the_loader_leaves_the_image_raw_and_the_masks_packed():
    batch = device_batch()
    sample = make_sample()
    assert batch["mask"].shape == (2, 1, *SIZE)          # two structures as one channel of bits
    torch.testing.assert_close(batch["mask"][0, 0], torch.as_tensor(
        sample["mask"][0] + 2 * sample["mask"][1]))
    torch.testing.assert_close(batch["image"][0], torch.as_tensor(sample["image"]))
    assert "_packed_mask_channels" not in batch


def test_neutral_settings_give_what_the_loader_gives():
    loader = sadaan_transforms(image_size=SIZE, train=True, augment=True, **NEUTRAL)
    expected = list_data_collate([run(loader, make_sample(index=i), seed=i) for i in range(2)])
    augment = SADAANBatchAugmentation(num_structures=2, **NEUTRAL)
    batch = device_batch()
    image, mask = augment(batch["image"], batch["mask"])
    torch.testing.assert_close(image, expected["image"], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(mask, expected["mask"], atol=0, rtol=0)


def test_a_rotation_equals_monai_rotate_of_image_and_masks():
    angles = torch.tensor([[0.08, -0.05, 0.07], [-0.06, 0.04, 0.0]])
    augment = SADAANBatchAugmentation(num_structures=2, **{**NEUTRAL, "rotation_degrees": 5})
    batch = device_batch()
    image, mask = augment.apply(batch["image"], batch["mask"],
                                **{**no_draws(2), "angles": angles})
    for case, case_angles in enumerate(angles.tolist()):
        sample = make_sample(index=case)
        rotated = Rotate(angle=case_angles, keep_size=True, mode="bilinear",
                         padding_mode="zeros", align_corners=False)(torch.as_tensor(
                             sample["image"]))
        raw = torch.as_tensor(rotated)
        z_scored = (raw - raw.mean()) / raw.std(unbiased=False)
        torch.testing.assert_close(image[case], z_scored, atol=1e-4, rtol=1e-4)
        masks = torch.as_tensor(Rotate(angle=case_angles, keep_size=True, mode="nearest",
                                       padding_mode="zeros", align_corners=False)(
                                           torch.as_tensor(sample["mask"])))
        torch.testing.assert_close(mask[case], masks, atol=0, rtol=0)


def test_each_case_draws_its_own_rotation_flips_and_factor():
    torch.manual_seed(0)
    augment = SADAANBatchAugmentation(num_structures=2, noise_std=0.0, rotation_degrees=10,
                                      flip_probability=0.5, intensity_scale_range=(0.5, 1.5))
    batch = device_batch(count=1)
    twins = {key: batch[key].repeat(4, 1, 1, 1, 1) for key in ("image", "mask")}
    image, mask = augment(twins["image"], twins["mask"])
    assert mask.shape == (4, 2, *SIZE) and set(mask.unique().tolist()) <= {0.0, 1.0}
    assert len({round(float(case.abs().sum()), 3) for case in image}) == 4
    stds = image.std(dim=(1, 2, 3, 4), unbiased=False)
    assert ((stds > 0.5 - 1e-4) & (stds < 1.5 + 1e-4)).all() and stds.max() - stds.min() > 0.01


def test_flips_and_noise_as_asked():
    augment = SADAANBatchAugmentation(num_structures=2, **{**NEUTRAL, "flip_probability": 0.5})
    batch = device_batch()
    flips = torch.tensor([[False, True, False], [True, False, True]])
    image, mask = augment.apply(batch["image"], batch["mask"],
                                **{**no_draws(2), "flips": flips})
    plain, plain_mask = augment.apply(batch["image"], batch["mask"], **no_draws(2))
    torch.testing.assert_close(image[0], plain[0].flip(2))
    torch.testing.assert_close(mask[1], plain_mask[1].flip(1).flip(3))
    noisy = SADAANBatchAugmentation(num_structures=2, **{**NEUTRAL, "noise_std": 4.0})
    torch.manual_seed(1)
    image, _ = noisy(batch["image"], batch["mask"])
    raw_std = batch["image"][0].std(unbiased=False)
    # z-scored: the noise's share of the variance is 16 / (raw variance + 16)
    residual = (image[0] * (raw_std ** 2 + 16).sqrt() - plain[0] * raw_std).std()
    assert residual == pytest.approx(4.0, rel=0.1)


def test_unpacked_masks_move_alike():
    augment = SADAANBatchAugmentation(num_structures=2, **{**NEUTRAL, "rotation_degrees": 5})
    batch = device_batch()
    draws = {**no_draws(2), "angles": torch.tensor([[0.05, 0.02, -0.08], [0.0, 0.0, 0.1]])}
    packed = augment.apply(batch["image"], batch["mask"], **draws)[1]
    sample_masks = torch.stack([torch.as_tensor(make_sample(index=i)["mask"]) for i in range(2)])
    unpacked = augment.apply(batch["image"], sample_masks, **draws)[1]
    torch.testing.assert_close(packed, unpacked, atol=0, rtol=0)


@pytest.mark.parametrize("key, value", [("noise_std", -1.0), ("rotation_degrees", 200),
                                        ("flip_probability", 1.5)])
def test_bad_settings_are_refused_by_name(key, value):
    with pytest.raises(ConfigError, match=key):
        SADAANBatchAugmentation(num_structures=2, **{**NEUTRAL, key: value})
