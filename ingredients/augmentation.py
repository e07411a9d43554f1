"""``augmentation`` ingredients: each pipeline's random transforms, built from MONAI."""

from __future__ import annotations

from typing import Any

from ingredients.fields import Field, FieldIngredient
from medseg import config as c
from medseg.data.transforms import sadaan_transforms

SADAAN_FIELDS = {
    "enabled": Field(True, c.boolean(), "Enable data augmentation"),
    "noise_std": Field(2.0, c.number(minimum=0), "Gaussian noise standard deviation (image units)"),
    "intensity_scale_range": Field([0.95, 1.05], c.number_range(minimum=0),
                                   "Random intensity scaling range"),
    "rotation_degrees": Field(5, c.number(minimum=0, maximum=180), "Random rotation range (degrees)"),
    "flip_probability": Field(0.3, c.number(minimum=0, maximum=1), "Random flip probability per axis"),
}


class SADAANAugmentationIngredient(FieldIngredient):
    def __init__(self, **defaults: Any) -> None:
        super().__init__("augmentation", SADAAN_FIELDS, defaults)

        @self.capture
        def make_transform(image_size, train: bool, enabled: bool, noise_std: float,
                           intensity_scale_range, rotation_degrees: float,
                           flip_probability: float):
            return sadaan_transforms(image_size=tuple(image_size), train=train, augment=enabled,
                                     noise_std=noise_std,
                                     intensity_scale_range=tuple(intensity_scale_range),
                                     rotation_degrees=rotation_degrees,
                                     flip_probability=flip_probability)

        self.make_transform = make_transform
