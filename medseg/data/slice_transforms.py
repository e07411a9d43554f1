"""Transforms of 2D slices (the lung-tumour pipeline), built from MONAI dictionary transforms.

Samples are the dicts of :class:`medseg.data.png_slices.PNGSliceDataset`: ``image`` [1, H, W]
in [0, 1] and ``mask`` [1, H, W] in {0, 1}; other keys pass through. The augmentation list is
the seed's Albumentations pipeline expressed with MONAI:

====================  =================================================================
seed (Albumentations)  here (MONAI), each with its own probability
====================  =================================================================
HorizontalFlip        ``RandFlipd`` on the width axis
Affine                ``RandAffined``: rotation, isotropic scale, translation
ElasticTransform      ``Rand2DElasticd``: a random control grid, smoothly interpolated
                      (:class:`~medseg.data.fast_transforms.FastRand2DElasticd`)
GridDistortion        ``RandGridDistortiond``: independent stretches of grid cells
RandomBrightness-     ``RandShiftIntensityd`` (brightness) then
Contrast              ``RandScaleIntensityFixedMeand`` (contrast about the mean)
GaussNoise            ``RandGaussianNoised`` with a standard deviation drawn per sample
CoarseDropout         ``RandCoarseDropoutd``: rectangles of the image set to 0
====================  =================================================================

Brightness, contrast and noise can push values out of the [0, 1] of the slices (a bright
tumour shifted up, dark air scaled below zero); the image is clipped back to [0, 1] after them,
as Albumentations clips its results, so training never sees intensities that no converted
slice holds.

Spatial transforms move image and mask together (the mask with nearest neighbours so it stays
binary); intensity transforms and dropout touch the image only, as in the seed, where the
dropped rectangles keep their tumour label.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from monai.transforms import (
    AsDiscreted,
    EnsureTyped,
    RandAffined,
    RandCoarseDropoutd,
    RandFlipd,
    RandGaussianNoised,
    RandGridDistortiond,
    RandScaleIntensityFixedMeand,
    RandShiftIntensityd,
    Resized,
    ThresholdIntensityd,
)

from medseg.data.fast_transforms import FastRand2DElasticd, UntrackedCompose

KEYS = ("image", "mask")


@dataclass(frozen=True)
class SliceAugmentation:
    """Probabilities and strengths; a probability of 0 leaves that transform out.

    Sizes (``translate``, ``elastic_spacing``, ``elastic_magnitude``, ``coarse_dropout_size``)
    are fractions of the model's input size, so a setting means the same at 128 and at 512
    pixels. ``elastic_magnitude`` bounds the random shift of each elastic control point.
    """

    flip_probability: float = 0.5
    affine_probability: float = 0.5
    rotate_degrees: float = 15.0
    scale_range: tuple[float, float] = (0.9, 1.1)
    translate: float = 0.0625
    elastic_probability: float = 0.2
    elastic_spacing: float = 0.1
    elastic_magnitude: tuple[float, float] = (0.005, 0.01)
    grid_distortion_probability: float = 0.2
    grid_distortion_limit: float = 0.3
    brightness_contrast_probability: float = 0.5
    brightness_limit: float = 0.2
    contrast_limit: float = 0.2
    noise_probability: float = 0.3
    noise_std: float = 0.03
    coarse_dropout_probability: float = 0.2
    coarse_dropout_holes: int = 8
    coarse_dropout_size: float = 0.0625


def slice_transforms(image_size: Sequence[int], *, train: bool,
                     augmentation: SliceAugmentation | None = None) -> UntrackedCompose:
    """Resize to ``image_size`` (H, W), then, for training with ``augmentation``, augment.

    Outputs are float32 tensors without MONAI's metadata bookkeeping: nothing here reads it,
    so the steps run without it (:class:`~medseg.data.fast_transforms.UntrackedCompose`).
    """
    size = tuple(int(s) for s in image_size)
    steps = [EnsureTyped(keys=KEYS, dtype=torch.float32, track_meta=False),
             Resized(keys=KEYS, spatial_size=size, mode=("bilinear", "nearest"),
                     anti_aliasing=(True, False))]
    if train and augmentation is not None:
        steps += _spatial(augmentation, size) + _intensity(augmentation, size)
    steps.append(EnsureTyped(keys=KEYS, dtype=torch.float32, track_meta=False))
    return UntrackedCompose(steps)


def image_transform(image_size: Sequence[int]) -> UntrackedCompose:
    """What prediction applies to a single image [1, H, W] (no mask)."""
    return UntrackedCompose([EnsureTyped(keys="image", dtype=torch.float32, track_meta=False),
                    Resized(keys="image", spatial_size=tuple(image_size), mode="bilinear",
                            anti_aliasing=True),
                    EnsureTyped(keys="image", dtype=torch.float32, track_meta=False)])


def _spatial(aug: SliceAugmentation, size: tuple[int, int]) -> list:
    nearest = ("bilinear", "nearest")
    steps = []
    if aug.flip_probability > 0:
        steps.append(RandFlipd(keys=KEYS, prob=aug.flip_probability, spatial_axis=1))
    if aug.affine_probability > 0:
        low, high = aug.scale_range
        steps.append(RandAffined(
            keys=KEYS, prob=aug.affine_probability, rotate_range=math.radians(aug.rotate_degrees),
            scale_range=(low - 1, high - 1), translate_range=[aug.translate * s for s in size],
            mode=nearest, padding_mode="zeros"))
    if aug.elastic_probability > 0:
        spacing = max(2.0, aug.elastic_spacing * min(size))
        magnitude = tuple(m * min(size) for m in aug.elastic_magnitude)
        steps.append(FastRand2DElasticd(keys=KEYS, prob=aug.elastic_probability, spacing=spacing,
                                    magnitude_range=magnitude, mode=nearest,
                                    padding_mode="zeros"))
    if aug.grid_distortion_probability > 0:
        limit = aug.grid_distortion_limit
        # MONAI's grid distortion takes one mode for all keys: the mask is interpolated like
        # the image, then thresholded back to {0, 1}.
        steps += [RandGridDistortiond(keys=KEYS, prob=aug.grid_distortion_probability,
                                      num_cells=5, distort_limit=(-limit, limit),
                                      mode="bilinear", padding_mode="zeros"),
                  AsDiscreted(keys="mask", threshold=0.5)]
    return steps


def _intensity(aug: SliceAugmentation, size: tuple[int, int]) -> list:
    steps = []
    if aug.brightness_contrast_probability > 0:
        probability = aug.brightness_contrast_probability
        if aug.brightness_limit > 0:
            steps.append(RandShiftIntensityd(keys="image", prob=probability,
                                             offsets=(-aug.brightness_limit, aug.brightness_limit)))
        if aug.contrast_limit > 0:
            steps.append(RandScaleIntensityFixedMeand(
                keys="image", prob=probability, factors=(-aug.contrast_limit, aug.contrast_limit)))
    if aug.noise_probability > 0 and aug.noise_std > 0:
        steps.append(RandGaussianNoised(keys="image", prob=aug.noise_probability,
                                        std=aug.noise_std, sample_std=True))
    if steps:  # clip to [0, 1]: values below 0 become 0, above 1 become 1
        steps += [ThresholdIntensityd(keys="image", threshold=0.0, above=True, cval=0.0),
                  ThresholdIntensityd(keys="image", threshold=1.0, above=False, cval=1.0)]
    if aug.coarse_dropout_probability > 0 and aug.coarse_dropout_holes > 0:
        largest = [max(1, round(aug.coarse_dropout_size * s)) for s in size]
        steps.append(RandCoarseDropoutd(keys="image", prob=aug.coarse_dropout_probability,
                                        holes=1, max_holes=aug.coarse_dropout_holes,
                                        spatial_size=[max(1, s // 4) for s in largest],
                                        max_spatial_size=largest, fill_value=0.0))
    return steps
