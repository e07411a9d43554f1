"""The MONAI dictionary pipeline for single-channel MRI volumes with a binary label.

Deterministic part (cached): load, channel first, RAS orientation, resampling to ``spacing``
(bilinear image, nearest label), image min-max scaled to [0, 1], label as float32, and a
finite check. Training part (random, run each epoch): foreground-aware crops and the
augmentation list of the SMALabeller original (flips, affine, elastic, 90-degree rotation,
bias field, intensity scale and shift, contrast, histogram shift, noise).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path

import torch
from monai.data import CacheDataset, Dataset, PersistentDataset, pad_list_data_collate
from monai.transforms import (
    CastToTyped,
    Compose,
    EnsureChannelFirstd,
    EnsureTyped,
    LoadImaged,
    Orientationd,
    RandAdjustContrastd,
    RandAffined,
    RandBiasFieldd,
    RandCropByPosNegLabeld,
    RandFlipd,
    RandGaussianNoised,
    RandHistogramShiftd,
    RandRotate90d,
    RandScaleIntensityd,
    RandShiftIntensityd,
    ScaleIntensityd,
    Spacingd,
)
from monai.transforms.utility.dictionary import Lambdad

from medseg.data.fast_transforms import FastRand3DElasticd, UntrackedCompose
from medseg.data.loaders import EpochLoader

KEYS = ("image", "label")
CACHE_MODES = ("memory", "disk", "none")
#: RandBiasFieldd's coefficient range. The original's (0, 0.7) is not used: MONAI's field is
#: exp of a degree-3 polynomial with 20 coefficients drawn from the range, which at 0.7
#: multiplies a [0, 1] image by up to about 1000 near the corners (median of the maxima over
#: 20 draws at 48 x 48 x 24: 1060), so one augmented volume swamps the BatchNorm statistics
#: and the model's evaluation-mode output collapses (measured: validation Dice 0 while the
#: same weights in train mode score 0.6-0.8). MONAI's default (0, 0.1) gives a smooth field
#: of +-16 % over the brain and at most about 3x at the corners.
BIAS_FIELD_COEFFICIENTS = (0.0, 0.1)


def _finite(name: str):
    def check(value):
        if not torch.isfinite(torch.as_tensor(value)).all():
            raise ValueError(f"{name} holds NaN or infinite values after preprocessing")
        return value
    return check


def preprocessing(spacing: Sequence[float]) -> Compose:
    """The deterministic transforms every case goes through (what a cache keeps)."""
    return Compose([
        LoadImaged(keys=KEYS, image_only=True),
        EnsureChannelFirstd(keys=KEYS),
        Orientationd(keys=KEYS, axcodes="RAS", labels=(("L", "R"), ("P", "A"), ("I", "S"))),
        Spacingd(keys=KEYS, pixdim=tuple(spacing), mode=("bilinear", "nearest")),
        ScaleIntensityd(keys="image", minv=0.0, maxv=1.0),
        CastToTyped(keys="label", dtype=torch.float32),
        # MONAI has no dictionary finite check of its own; the original's AssertFiniteD.
        Lambdad(keys="image", func=_finite("image")),
        Lambdad(keys="label", func=_finite("label")),
    ])


def augmentation(crop_size: Sequence[int], crops_per_volume: int) -> Compose:
    """The random training transforms (probabilities and ranges of the original, apart from
    the bias field's: :data:`BIAS_FIELD_COEFFICIENTS`)."""
    return Compose([
        RandCropByPosNegLabeld(keys=KEYS, label_key="label", spatial_size=tuple(crop_size),
                               pos=1, neg=1, num_samples=crops_per_volume, allow_smaller=True),
        RandFlipd(keys=KEYS, prob=0.5, spatial_axis=0),
        RandFlipd(keys=KEYS, prob=0.5, spatial_axis=1),
        RandFlipd(keys=KEYS, prob=0.2, spatial_axis=2),
        RandAffined(keys=KEYS, prob=0.7, rotate_range=(math.pi / 18, math.pi / 18, math.pi / 36),
                    scale_range=(0.1, 0.1, 0.05), shear_range=(0.1, 0.1, 0.05),
                    mode=("bilinear", "nearest"), padding_mode="border"),
        FastRand3DElasticd(keys=KEYS, prob=0.15, sigma_range=(5, 8), magnitude_range=(30, 60),
                           mode=("bilinear", "nearest"), padding_mode="border"),
        RandRotate90d(keys=KEYS, prob=0.2, max_k=1, spatial_axes=(0, 1)),
        RandBiasFieldd(keys="image", prob=0.25, coeff_range=BIAS_FIELD_COEFFICIENTS),
        RandScaleIntensityd(keys="image", factors=0.1, prob=0.9),
        RandShiftIntensityd(keys="image", offsets=0.1, prob=0.9),
        RandAdjustContrastd(keys="image", prob=0.3, gamma=(0.7, 1.5)),
        RandHistogramShiftd(keys="image", prob=0.2, num_control_points=(3, 5)),
        RandGaussianNoised(keys="image", prob=0.2, std=0.01),
        EnsureTyped(keys=KEYS, track_meta=False),
    ])


def make_dataset(data: Sequence[dict], spacing: Sequence[float], *, train: bool,
                 augment: bool, crop_size: Sequence[int], crops_per_volume: int,
                 cache: str = "memory", cache_dir: str | Path | None = None,
                 cache_workers: int = 0) -> Dataset:
    """A MONAI dataset of ``data`` (dicts of ``image``/``label`` paths): the deterministic
    part cached (``cache``: ``memory`` = CacheDataset, ``disk`` = PersistentDataset in
    ``cache_dir``, ``none``), the augmentation applied on top for training when ``augment``."""
    if cache not in CACHE_MODES:
        raise ValueError(f"cache must be one of {', '.join(CACHE_MODES)}, got {cache!r}")
    steps = list(preprocessing(spacing).transforms)
    head = len(steps)
    if train and augment:
        steps += list(augmentation(crop_size, crops_per_volume).transforms)
    else:
        steps.append(EnsureTyped(keys=KEYS, track_meta=False))
    # Loading, orientation and resampling read the affine; the random part after them does not
    # and its last step drops the metadata, so it runs without MONAI's tracking.
    transform = UntrackedCompose(steps, tracked_head=head)
    data = list(data)
    if cache == "memory":
        return CacheDataset(data, transform, cache_rate=1.0, num_workers=cache_workers or None,
                            progress=False)
    if cache == "disk":
        if cache_dir is None:
            raise ValueError("cache='disk' needs a cache_dir")
        return PersistentDataset(data, transform, cache_dir=cache_dir)
    return Dataset(data, transform)


def flatten_and_pad(batch: list) -> dict:
    """``pad_list_data_collate`` of the batch's crops: MONAI's pads only the top level, so
    the lists of crops of different sizes (volumes smaller than ``crop_size``, cropped to
    their own size) failed to stack; flattened first, every crop is padded to the largest."""
    items = [item for sample in batch for item in (sample if isinstance(sample, list)
                                                    else [sample])]
    return pad_list_data_collate(items)


def make_loader(dataset: Dataset, *, batch_size: int, shuffle: bool, num_workers: int,
                seed: int, pin_memory: bool = False) -> EpochLoader:
    """Batches padded to the largest case (:func:`flatten_and_pad`), the crops of each
    volume flattened into the batch (``batch_size`` volumes x crops); every epoch's order and
    augmentation reproducible from ``(seed, epoch)`` (resumable)."""
    return EpochLoader(dataset, batch_size=batch_size, shuffle=shuffle, num_workers=num_workers,
                       seed=seed, pin_memory=pin_memory, collate_fn=flatten_and_pad)
