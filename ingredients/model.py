"""``model`` ingredients: one per architecture, with the entries that architecture has."""

from __future__ import annotations

import inspect
import logging
import math
from typing import Any

import torch
from monai.networks.nets import DynUNet, UNet
from torch import nn

from ingredients.fields import Field, FieldIngredient
from medseg import config as c
from medseg.errors import ConfigError, DataError
from medseg.models.attention_unet import AttentionUNet
from medseg.models.sadaan import SADAAN

SADAAN_FIELDS = {
    "in_channels": Field(1, c.integer(minimum=1), "Image channels (1 for CT/MRI)"),
    "presence_threshold": Field(0.5, c.number(minimum=0, maximum=1),
                                "Presence probability above which a structure counts as present"),
    "base_channels": Field(8, c.integer(minimum=2), "Feature channels of the first level (doubling per level)"),
}


def trained_model_config(ingredient: FieldIngredient, given: dict, trained: dict | None,
                         path: str, key: str) -> dict:
    """The model entries a checkpoint was trained with, for rebuilding its network; refuses a
    checkpoint of another pipeline (other model entries) and says so when a ``model.*`` set
    to another value than the checkpoint's is replaced by the checkpoint's."""
    if not trained:
        return dict(given)
    fields = set(ingredient.fields)
    if set(trained) != fields:
        raise DataError(f"{key}: checkpoint {path} was written by another pipeline: its model "
                        f"entries are {', '.join(sorted(trained))}, this pipeline's "
                        f"{', '.join(sorted(fields))}")
    changed = [name for name in sorted(fields) if given[name] != trained[name]
               and given[name] != ingredient.defaults[name]]
    if changed:
        shown = ", ".join(f"model.{n}={given[n]!r} is replaced by the checkpoint's "
                          f"{trained[n]!r}" for n in changed)
        logging.getLogger("medseg").warning(
            "%s: the network is rebuilt as the checkpoint %s was trained", shown, path)
    return dict(trained)


def make_sadaan(num_structures: int, in_channels: int, base_channels: int) -> SADAAN:
    """SADAAN for ``num_structures`` structures (from the data); the rest from ``model.*``."""
    return SADAAN(in_channels=in_channels, num_structures=num_structures,
                  base_channels=base_channels)


class SADAANModelIngredient(FieldIngredient):
    def __init__(self, **defaults: Any) -> None:
        super().__init__("model", SADAAN_FIELDS, defaults)
        #: ``make_model(num_structures=N)``: :func:`make_sadaan` with ``model.*`` filled in.
        self.make_model = self.captured(make_sadaan)

    @staticmethod
    def input_multiple() -> int:
        """Input sizes must be multiples of this: the encoder's levels halve each axis."""
        return 2 ** (inspect.signature(SADAAN).parameters["num_levels"].default - 1)


DYNUNET_FIELDS = {
    "filters": Field([32, 64, 128, 256], c.sequence(c.integer(minimum=1), min_length=2),
                     "Feature channels per level"),
    "kernel_size": Field(3, c.integer(minimum=1), "Convolution kernel size (every level)"),
    "strides": Field([1, 2, 2, 2], c.sequence(c.integer(minimum=1), min_length=2),
                     "Stride of each level's first convolution (downsampling)"),
    "dropout": Field(0.1, c.number(minimum=0, maximum=0.99), "Dropout probability"),
    "norm_name": Field("instance", c.choice("instance", "batch", "group"),
                       "Normalisation layer ('group': 16 groups, or fewer for narrow levels)"),
    "res_block": Field(False, c.boolean(), "Residual blocks instead of plain convolution pairs"),
    "initial_foreground_probability": Field(
        0.01, c.optional(c.number(above=0, maximum=0.5)),
        "Output bias starts at this probability's logit (null: MONAI's zero bias)"),
}


def build_dynunet(filters, kernel_size: int, strides, dropout: float, norm_name: str,
                  res_block: bool, initial_foreground_probability: float | None = None) -> DynUNet:
    """MONAI's DynUNet for one-channel volumes and one-channel logits.

    With ``initial_foreground_probability`` the output bias starts at its logit (the prior
    of RetinaNet's focal-loss paper): aneurysm voxels are well under 1 % of a cube, and from
    MONAI's zero bias (every voxel 0.5) Adam at lr 1e-4 needs thousands of steps just to move
    the bias to the background, during which the Dice term has almost no gradient.
    """
    norm = norm_name
    if norm_name == "group":
        norm = ("group", {"num_groups": math.gcd(16, min(filters))})
    model = DynUNet(spatial_dims=3, in_channels=1, out_channels=1,
                    kernel_size=[kernel_size] * len(filters), strides=list(strides),
                    upsample_kernel_size=list(strides[1:]), filters=list(filters),
                    dropout=dropout or None, norm_name=norm, res_block=res_block)
    if initial_foreground_probability is not None:
        with torch.no_grad():
            model.output_block.conv.conv.bias.fill_(
                math.log(initial_foreground_probability / (1 - initial_foreground_probability)))
    return model


class DynUNetModelIngredient(FieldIngredient):
    def __init__(self, **defaults: Any) -> None:
        super().__init__("model", DYNUNET_FIELDS, defaults)
        #: ``make_model()``: :func:`build_dynunet` with every ``model.*`` entry filled in.
        self.make_model = self.captured(build_dynunet)

    @staticmethod
    def from_config(model_config: dict) -> DynUNet:
        """The model a checkpoint's stored ``model`` config describes."""
        return build_dynunet(**{name: model_config[name] for name in DYNUNET_FIELDS
                                if name in model_config})

    def validate(self, config) -> None:
        super().validate(config)
        model = config[self.path]
        if len(model["filters"]) != len(model["strides"]):
            raise ConfigError(f"model.filters has {len(model['filters'])} levels but "
                              f"model.strides has {len(model['strides'])}; give one stride per "
                              "level")

    def downsampling(self, config) -> int:
        """How many times the model halves each axis (inputs must be multiples of 2**this)."""
        return math.prod(config[self.path]["strides"])


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


def build_lung_network(architecture: str, channels: list[int], dropout: float,
                       deep_supervision: bool, in_channels: int = 1) -> nn.Module:
    """A 2D (background, tumour) network on ``in_channels`` grey channels (the slice, or
    the slice and its neighbours: ``dataset.context_slices``)."""
    if architecture == "unet":
        return UNet(spatial_dims=2, in_channels=in_channels, out_channels=2, channels=channels,
                    strides=[2] * (len(channels) - 1), num_res_units=0, dropout=dropout)
    return AttentionUNet(spatial_dims=2, in_channels=in_channels, num_classes=2,
                         channels=channels,
                         dropout=dropout, deep_supervision=deep_supervision)


class AttentionUNetModelIngredient(FieldIngredient):
    """2D (background, tumour) segmentation networks on grey slices (``make_model(in_channels=
    2 * dataset.context_slices + 1)``)."""

    def __init__(self, **defaults: Any) -> None:
        super().__init__("model", ATTENTION_UNET_FIELDS, defaults)
        #: ``make_model()``: :func:`build_lung_network` with every ``model.*`` entry filled in.
        self.make_model = self.captured(build_lung_network)

    def validate(self, config) -> None:
        super().validate(config)
        model = config[self.path]
        if model["deep_supervision"] and model["architecture"] != "attention_unet":
            raise ConfigError("model.deep_supervision=True needs "
                              "model.architecture='attention_unet'")

    def input_multiple(self, config) -> int:
        """Input sizes must be multiples of this (one halving per level below the top)."""
        return 2 ** (len(config[self.path]["channels"]) - 1)
