"""Preprocessing and augmentation of aneurysm cubes, built from MONAI dictionary transforms.

Samples are the dicts of :class:`medseg.data.npz_cubes.NpzCubeDataset`: ``image``
[1, D, H, W] with the stored 0-255 intensities, ``mask`` [1, D, H, W] already binarised,
plus ``label``, ``index`` and ``name`` that pass through. Axes are (z, y, x): the axial
plane is (y, x).
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence

import torch
from monai.transforms import (
    EnsureTyped,
    NormalizeIntensityd,
    RandCropByPosNegLabeld,
    RandFlipd,
    RandRotate90d,
    RandSpatialCropd,
)

from medseg.config import integer, number, sequence
from medseg.data.fast_transforms import UntrackedCompose

SPATIAL_KEYS = ("image", "mask")
AXIAL_PLANE = (1, 2)
FLIP_AXES = (0, 1)  # z and y, as the seed documents; x flips arise from rotation + y flip


class ForegroundCropd(RandCropByPosNegLabeld):
    """MONAI's class-balanced crop, one crop per cube, returned as the sample itself.

    The crop is centred on a mask voxel with probability ``pos / (pos + neg)`` and on a
    background voxel otherwise. A cube without foreground (every negative cube) is cropped
    around background voxels; MONAI warns about that each time, which here is expected, so
    the warning is silenced. MONAI returns a list of ``num_samples`` crops; with one crop per
    cube the sample stays a dict, so batches collate as with the random crop.
    """

    def __call__(self, data, lazy=None):
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message="Num foregrounds 0")
            return super().__call__(data, lazy)[0]


def cube_transforms(*, train: bool, crop_size: Sequence[int], augment: bool = True,
                    rotate_probability: float = 0.5, flip_probability: float = 0.5,
                    foreground_fraction: float = 0.0) -> UntrackedCompose:
    """Z-score each cube; for training, cut a random ``crop_size`` patch and augment it.

    The seed first divides by 255 and then z-scores; the division is left out because a
    z-score is unchanged by scaling. Training patches are cropped at a random centre (the
    crop is the patch the model trains on, so it applies even with ``augment=False``), then,
    with ``augment``, rotated by a random multiple of 90 degrees in the axial plane with
    ``rotate_probability`` and flipped along z and along y, each with ``flip_probability``.
    Rotating the crop rather than the cube costs an eighth of the work and draws the same
    distribution. Validation cubes are only z-scored: they are scored whole by sliding windows.

    With ``foreground_fraction`` > 0 the crop is class-balanced instead (MONAI's
    ``RandCropByPosNegLabeld``, see :class:`ForegroundCropd`): that share of the crops is
    centred on an aneurysm voxel when the cube has one, the rest on background voxels (which
    nearly every voxel is, so those are close to the random crop); nnU-Net forces a third of
    its patches onto foreground (0.33). 0 keeps the seed's random crop.
    """
    sequence(integer(minimum=1), length=3)("crop_size", crop_size)
    number(minimum=0, maximum=1)("rotate_probability", rotate_probability)
    number(minimum=0, maximum=1)("flip_probability", flip_probability)
    number(minimum=0, maximum=1)("foreground_fraction", foreground_fraction)
    steps = [NormalizeIntensityd(keys="image")]
    if train and foreground_fraction > 0:
        steps.append(ForegroundCropd(keys=SPATIAL_KEYS, label_key="mask",
                                     spatial_size=tuple(crop_size), pos=foreground_fraction,
                                     neg=1 - foreground_fraction, num_samples=1))
    elif train:
        steps.append(RandSpatialCropd(keys=SPATIAL_KEYS, roi_size=tuple(crop_size),
                                      random_center=True, random_size=False))
        if augment and rotate_probability > 0:
            steps.append(RandRotate90d(keys=SPATIAL_KEYS, prob=rotate_probability, max_k=3,
                                       spatial_axes=AXIAL_PLANE))
        if augment and flip_probability > 0:
            steps += [RandFlipd(keys=SPATIAL_KEYS, prob=flip_probability, spatial_axis=axis)
                      for axis in FLIP_AXES]
    steps.append(EnsureTyped(keys=SPATIAL_KEYS, dtype=torch.float32, track_meta=False))
    # No step reads MONAI's metadata and the last one drops it: run them without it.
    return UntrackedCompose(steps)
