"""The SADAAN augmentation pipeline, built from MONAI dictionary transforms.

Samples are the dicts of :class:`medseg.data.hdf5.HDF5SegmentationDataset`: ``image``
[C, H, W, D] in raw intensity units, ``mask`` [S, H, W, D], ``presence`` [S], plus
``scenario`` and ``index`` that pass through untouched.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from monai.transforms import (
    DeleteItemsd,
    EnsureTyped,
    NormalizeIntensityd,
    RandFlipd,
    RandGaussianNoised,
    RandRotated,
    RandScaleIntensityd,
    Resized,
)

from medseg.config import integer, number, number_range, sequence
from medseg.data.fast_transforms import (
    PACKED_CHANNELS_KEY,
    PackMasksd,
    UnpackMasksd,
    UntrackedCompose,
)

SPATIAL_KEYS = ("image", "mask")


def sadaan_transforms(
    *,
    image_size: Sequence[int],
    train: bool,
    augment: bool,
    noise_std: float = 2.0,
    intensity_scale_range: Sequence[float] = (0.95, 1.05),
    rotation_degrees: float = 5.0,
    flip_probability: float = 0.3,
    on_device: bool = False,
) -> UntrackedCompose:
    """Resample to ``image_size``, augment (training with ``augment`` only), z-score the image.

    Augmentation, in this order: a rotation of up to ``rotation_degrees`` about each axis,
    a flip of each spatial axis with ``flip_probability``, Gaussian noise of ``noise_std`` in
    raw intensity units, per-case z-score normalisation, then one intensity factor drawn from
    ``intensity_scale_range``. The factor comes after the normalisation because a z-score
    cancels any factor applied before it. Masks are resampled and rotated with nearest
    neighbours so they stay binary; ``presence`` is kept as stored even if a rotation or
    resampling hides a tiny structure. Outputs are plain float32 tensors (no MetaTensor
    bookkeeping to collate).

    With ``on_device`` (training with ``augment`` only) the samples are only resized, their
    masks left folded into one channel of bit flags and their image in raw units: the
    augmentation and the normalisation then run on the batch on the training device
    (:class:`medseg.data.batch_augmentation.SADAANBatchAugmentation`).
    """
    sequence(integer(minimum=1), length=3)("image_size", image_size)
    check_augmentation(noise_std, intensity_scale_range, rotation_degrees, flip_probability)

    augmenting = train and augment
    # The spatial steps move the masks with nearest neighbours only, so they move them folded
    # into one channel of bit flags: the same masks at the cost of one (see PackMasksd).
    steps = [PackMasksd(keys="mask"),
             Resized(keys=SPATIAL_KEYS, spatial_size=tuple(image_size),
                     mode=("trilinear", "nearest"), anti_aliasing=(True, False))]
    if augmenting and on_device:
        return UntrackedCompose([*steps,
                                 DeleteItemsd(keys=PACKED_CHANNELS_KEY),
                                 EnsureTyped(keys=(*SPATIAL_KEYS, "presence"),
                                             dtype=torch.float32, track_meta=False)])
    if augmenting:
        steps += _spatial_and_noise(noise_std, rotation_degrees, flip_probability)
    steps += [UnpackMasksd(keys="mask"), NormalizeIntensityd(keys="image", channel_wise=True)]
    if augmenting:
        steps += _intensity_scaling(tuple(intensity_scale_range))
    steps.append(EnsureTyped(keys=(*SPATIAL_KEYS, "presence"), dtype=torch.float32,
                             track_meta=False))
    # No step reads MONAI's metadata and the last one drops it: run them without it.
    return UntrackedCompose(steps)


def check_augmentation(noise_std: float, intensity_scale_range: Sequence[float],
                       rotation_degrees: float, flip_probability: float) -> None:
    """The augmentation settings' ranges, each refused by name."""
    number(minimum=0)("noise_std", noise_std)
    number_range(minimum=0)("intensity_scale_range", intensity_scale_range)
    number(minimum=0, maximum=180)("rotation_degrees", rotation_degrees)
    number(minimum=0, maximum=1)("flip_probability", flip_probability)


def _spatial_and_noise(noise_std: float, rotation_degrees: float,
                       flip_probability: float) -> list:
    """Rotation, flips and noise; one whose setting makes it the identity is left out."""
    steps = []
    if rotation_degrees > 0:
        angle = math.radians(rotation_degrees)
        # Zero padding is air in raw CT-like intensities, so rotated-in corners look like
        # the outside of the body rather than smeared edge voxels.
        steps.append(RandRotated(keys=SPATIAL_KEYS, range_x=angle, range_y=angle, range_z=angle,
                                 prob=1.0, mode=("bilinear", "nearest"), padding_mode="zeros"))
    if flip_probability > 0:
        steps += [RandFlipd(keys=SPATIAL_KEYS, prob=flip_probability, spatial_axis=axis)
                  for axis in range(3)]
    if noise_std > 0:
        # sample_std=False: the noise has exactly noise_std, not a std drawn from [0, noise_std].
        steps.append(RandGaussianNoised(keys="image", prob=1.0, std=noise_std, sample_std=False))
    return steps


def _intensity_scaling(intensity_scale_range: tuple[float, float]) -> list:
    """The intensity factor, left out when the range is exactly [1, 1]."""
    low, high = intensity_scale_range
    if (low, high) == (1, 1):
        return []
    # MONAI multiplies by (1 + factor).
    return [RandScaleIntensityd(keys="image", factors=(low - 1, high - 1), prob=1.0)]
