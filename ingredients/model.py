"""``model`` ingredients: one per architecture, with the entries that architecture has."""

from __future__ import annotations

from typing import Any

from monai.networks.nets import UNet
from torch import nn

from ingredients.fields import Field, FieldIngredient
from medseg import config as c
from medseg.errors import ConfigError
from medseg.models.attention_unet import AttentionUNet
from medseg.models.sadaan import SADAAN

SADAAN_FIELDS = {
    "in_channels": Field(1, c.integer(minimum=1), "Image channels (1 for CT/MRI)"),
    "presence_threshold": Field(0.5, c.number(minimum=0, maximum=1),
                                "Presence probability above which a structure counts as present"),
    "base_channels": Field(8, c.integer(minimum=2), "Feature channels of the first level (doubling per level)"),
}


class SADAANModelIngredient(FieldIngredient):
    def __init__(self, **defaults: Any) -> None:
        super().__init__("model", SADAAN_FIELDS, defaults)

        @self.capture
        def make_model(num_structures: int, in_channels: int, base_channels: int) -> SADAAN:
            return SADAAN(in_channels=in_channels, num_structures=num_structures,
                          base_channels=base_channels)

        self.make_model = make_model


# ----------------------------------------------------------------------------- lung tumour
ARCHITECTURES = ("attention_unet", "unet")

ATTENTION_UNET_FIELDS = {
    "architecture": Field("attention_unet", c.choice(*ARCHITECTURES),
                          "'attention_unet' (attention-gated skips) or 'unet' (plain skips)"),
    "channels": Field([64, 128, 256, 512, 512], c.sequence(c.integer(minimum=1), min_length=2),
                      "Feature channels per level, top first; the last is the bottleneck"),
    "dropout": Field(0.0, c.number(minimum=0, maximum=0.9), "Dropout ratio in the conv blocks"),
    "deep_supervision": Field(False, c.boolean(),
                              "attention_unet: extra loss on each lower decoder level"),
}


class AttentionUNetModelIngredient(FieldIngredient):
    """2D (background, tumour) segmentation networks on one grey channel."""

    def __init__(self, **defaults: Any) -> None:
        super().__init__("model", ATTENTION_UNET_FIELDS, defaults)

        @self.capture
        def make_model(architecture: str, channels: list[int], dropout: float,
                       deep_supervision: bool) -> nn.Module:
            if architecture == "unet":
                return UNet(spatial_dims=2, in_channels=1, out_channels=2, channels=channels,
                            strides=[2] * (len(channels) - 1), num_res_units=0, dropout=dropout)
            return AttentionUNet(spatial_dims=2, in_channels=1, num_classes=2, channels=channels,
                                 dropout=dropout, deep_supervision=deep_supervision)

        self.make_model = make_model

    def validate(self, config) -> None:
        super().validate(config)
        model = config[self.path]
        if model["deep_supervision"] and model["architecture"] != "attention_unet":
            raise ConfigError("model.deep_supervision=True needs "
                              "model.architecture='attention_unet'")

    def input_multiple(self, config) -> int:
        """Input sizes must be multiples of this (one halving per level below the top)."""
        return 2 ** (len(config[self.path]["channels"]) - 1)
