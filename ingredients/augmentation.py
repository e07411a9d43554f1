"""``augmentation`` ingredients: each pipeline's random transforms, built from MONAI."""

from __future__ import annotations

from typing import Any

from ingredients.fields import Field, FieldIngredient
from medseg import config as c
from medseg.data.batch_augmentation import SADAANBatchAugmentation
from medseg.data.cube_transforms import cube_transforms
from medseg.data.slice_transforms import SliceAugmentation, slice_transforms
from medseg.data.transforms import sadaan_transforms
from medseg.errors import ConfigError

SADAAN_FIELDS = {
    "enabled": Field(True, c.boolean(), "Enable data augmentation"),
    "noise_std": Field(2.0, c.number(minimum=0), "Gaussian noise standard deviation (image units)"),
    "intensity_scale_range": Field([0.95, 1.05], c.number_range(minimum=0),
                                   "Random intensity scaling range"),
    "rotation_degrees": Field(5, c.number(minimum=0, maximum=180), "Random rotation range (degrees)"),
    "flip_probability": Field(0.3, c.number(minimum=0, maximum=1), "Random flip probability per axis"),
    "on_device": Field(False, c.boolean(),
                       "Augment each training batch on the training device (GPU) instead of "
                       "each sample in the loader workers: the same transforms, for a GPU that "
                       "the workers cannot keep fed"),
}


def make_sadaan_transform(image_size, train: bool, enabled: bool, noise_std: float,
                          intensity_scale_range, rotation_degrees: float,
                          flip_probability: float, on_device: bool):
    """:func:`medseg.data.transforms.sadaan_transforms` at ``image_size`` (the caller's
    ``training.image_size``) for training or evaluation; the rest from ``augmentation.*``."""
    return sadaan_transforms(image_size=tuple(image_size), train=train, augment=enabled,
                             noise_std=noise_std,
                             intensity_scale_range=tuple(intensity_scale_range),
                             rotation_degrees=rotation_degrees, flip_probability=flip_probability,
                             on_device=on_device)


def make_sadaan_batch_augmentation(num_structures: int, enabled: bool, noise_std: float,
                                   intensity_scale_range, rotation_degrees: float,
                                   flip_probability: float, on_device: bool):
    """The training batches' augmentation on the device
    (:class:`~medseg.data.batch_augmentation.SADAANBatchAugmentation`) when
    ``augmentation.on_device`` (and ``enabled``), else None: the loader augments."""
    if not (enabled and on_device):
        return None
    return SADAANBatchAugmentation(num_structures=num_structures, noise_std=noise_std,
                                   intensity_scale_range=tuple(intensity_scale_range),
                                   rotation_degrees=rotation_degrees,
                                   flip_probability=flip_probability)


class SADAANAugmentationIngredient(FieldIngredient):
    def __init__(self, **defaults: Any) -> None:
        super().__init__("augmentation", SADAAN_FIELDS, defaults)
        #: ``make_transform(image_size, train=...)``: :func:`make_sadaan_transform`.
        self.make_transform = self.captured(make_sadaan_transform)
        #: ``make_batch_augmentation(num_structures)``: :func:`make_sadaan_batch_augmentation`.
        self.make_batch_augmentation = self.captured(make_sadaan_batch_augmentation)


CUBES_FIELDS = {
    "enabled": Field(True, c.boolean(), "Random axial 90-degree rotations and flips along z and y"),
    "crop_size": Field([16, 64, 64], c.sequence(c.integer(minimum=1), length=3),
                       "Random training crop D, H, W (also the sliding-window size)"),
    "rotate_probability": Field(0.5, c.number(minimum=0, maximum=1),
                                "Probability of a random 90/180/270-degree axial rotation"),
    "flip_probability": Field(0.5, c.number(minimum=0, maximum=1),
                              "Probability of a flip, for each of the z and y axes"),
    "foreground_fraction": Field(0.0, c.number(minimum=0, maximum=1),
                                 "Share of training crops centred on an aneurysm voxel "
                                 "(MONAI RandCropByPosNegLabeld; nnU-Net: 0.33); 0: the seed's "
                                 "random crop"),
}


def make_cube_transform(train: bool, enabled: bool, crop_size, rotate_probability: float,
                        flip_probability: float, foreground_fraction: float):
    """:func:`medseg.data.cube_transforms.cube_transforms` for training or evaluation, from
    ``augmentation.*``."""
    return cube_transforms(train=train, crop_size=crop_size, augment=enabled,
                           rotate_probability=rotate_probability,
                           flip_probability=flip_probability,
                           foreground_fraction=foreground_fraction)


class CubeAugmentationIngredient(FieldIngredient):
    def __init__(self, **defaults: Any) -> None:
        super().__init__("augmentation", CUBES_FIELDS, defaults)
        #: ``make_transform(train=...)``: :func:`make_cube_transform`.
        self.make_transform = self.captured(make_cube_transform)

    def validate(self, config) -> None:
        super().validate(config)
        augmentation = config[self.path]
        crop = augmentation["crop_size"]
        rotating = augmentation["enabled"] and augmentation["rotate_probability"] > 0
        if rotating and crop[1] != crop[2]:
            raise ConfigError(f"augmentation.crop_size {crop} must have H == W for axial 90-degree "
                              "rotations (or set augmentation.rotate_probability=0)")


# ----------------------------------------------------------------------------- lung tumour
PROBABILITY = c.number(minimum=0, maximum=1)
FRACTION = c.number(minimum=0, maximum=0.5)

LUNG_FIELDS = {
    "enabled": Field(True, c.boolean(), "Augment training slices"),
    "flip_probability": Field(0.5, PROBABILITY,
                              "HorizontalFlip: probability of a left-right flip"),
    "affine_probability": Field(0.5, PROBABILITY, "Affine: probability"),
    "rotate_degrees": Field(15.0, c.number(minimum=0, maximum=180),
                            "Affine: rotation range (degrees)"),
    "scale_range": Field([0.9, 1.1], c.number_range(minimum=0.1), "Affine: zoom factor range"),
    "translate": Field(0.0625, FRACTION, "Affine: shift range (fraction of the image size)"),
    "elastic_probability": Field(0.2, PROBABILITY, "ElasticTransform: probability"),
    "elastic_spacing": Field(0.1, c.number(above=0, maximum=1),
                             "ElasticTransform: control-point spacing (fraction of the size)"),
    "elastic_magnitude": Field([0.005, 0.01], c.number_range(minimum=0),
                               "ElasticTransform: control-point shift (fraction of the size)"),
    "grid_distortion_probability": Field(0.2, PROBABILITY, "GridDistortion: probability"),
    "grid_distortion_limit": Field(0.3, c.number(minimum=0, maximum=0.9),
                                   "GridDistortion: largest relative stretch of a grid cell"),
    "brightness_contrast_probability": Field(0.5, PROBABILITY,
                                             "RandomBrightnessContrast: probability"),
    "brightness_limit": Field(0.2, c.number(minimum=0, maximum=1),
                              "RandomBrightnessContrast: largest brightness shift (image 0-1)"),
    "contrast_limit": Field(0.2, c.number(minimum=0, maximum=1),
                            "RandomBrightnessContrast: largest relative contrast change"),
    "noise_probability": Field(0.3, PROBABILITY, "GaussNoise: probability"),
    "noise_std": Field(0.03, c.number(minimum=0),
                       "GaussNoise: largest standard deviation (image in [0, 1])"),
    "coarse_dropout_probability": Field(0.2, PROBABILITY, "CoarseDropout: probability"),
    "coarse_dropout_holes": Field(8, c.integer(minimum=1),
                                  "CoarseDropout: most rectangles dropped"),
    "coarse_dropout_size": Field(0.0625, FRACTION,
                                 "CoarseDropout: largest rectangle side (fraction of the size)"),
}


def make_slice_transform(image_size, train: bool, _config):
    """:func:`medseg.data.slice_transforms.slice_transforms` at ``image_size`` (the caller's
    ``training.image_size``); every ``augmentation.*`` entry but ``enabled`` is the
    :class:`~medseg.data.slice_transforms.SliceAugmentation` field of the same name."""
    settings = dict(_config)
    enabled = settings.pop("enabled")
    for name in ("scale_range", "elastic_magnitude"):
        settings[name] = tuple(settings[name])
    augmentation = SliceAugmentation(**settings) if enabled else None
    return slice_transforms(image_size, train=train, augmentation=augmentation)


class LungAugmentationIngredient(FieldIngredient):
    def __init__(self, **defaults: Any) -> None:
        super().__init__("augmentation", LUNG_FIELDS, defaults)
        #: ``make_transform(image_size, train=...)``: :func:`make_slice_transform`.
        self.make_transform = self.captured(make_slice_transform)
