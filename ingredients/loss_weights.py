"""``loss_weights`` ingredients: the weight of each loss term (0 switches a term off); and
``loss``, for pipelines whose seed chooses its loss by name."""

from __future__ import annotations

from typing import Any

from ingredients.fields import Field, FieldIngredient
from medseg import config as c
from medseg.errors import ConfigError
from medseg.losses.aneurysm import WeightedDiceCELoss
from medseg.losses.dice_bce import LOSS_TYPES, build_loss
from medseg.losses.sadaan import SADAANLoss

WEIGHT = c.number(minimum=0)

SADAAN_FIELDS = {
    "segmentation": Field(1.0, WEIGHT, "Base segmentation loss (voxel-wise BCE)"),
    "dice": Field(2.0, WEIGHT, "Dice coefficient loss"),
    "focal_seg": Field(1.0, WEIGHT, "Focal loss for hard examples"),
    "absence": Field(1.0, WEIGHT, "Absence detection loss"),
    "attention_supervision": Field(0.5, WEIGHT, "Attention map supervision"),
    "false_positive_suppression": Field(0.5, WEIGHT, "FP reduction on absent structures"),
    "confidence": Field(0.1, WEIGHT, "Confidence regularization"),
    "absence_balance": Field(False, c.boolean(),
                             "Weigh each structure's absent and present training cases alike "
                             "in the absence term (from the training split's presence rates); "
                             "false: plain BCE, the seed's"),
}


def make_sadaan_loss(_config, presence_rate=None) -> SADAANLoss:
    """Every ``loss_weights.*`` weight is the :class:`SADAANLoss` weight of the same name;
    ``presence_rate`` (the training split's, per structure) counts only with
    ``absence_balance``."""
    weights = {name: value for name, value in _config.items() if name != "absence_balance"}
    if not _config["absence_balance"]:
        presence_rate = None
    elif presence_rate is None:
        raise ConfigError("loss_weights.absence_balance=True needs the training split's "
                          "presence rates, and this command has no training split")
    return SADAANLoss(**weights, presence_rate=presence_rate)


class SADAANLossWeightsIngredient(FieldIngredient):
    def __init__(self, **defaults: Any) -> None:
        super().__init__("loss_weights", SADAAN_FIELDS, defaults)
        #: ``make_loss()``: :func:`make_sadaan_loss`.
        self.make_loss = self.captured(make_sadaan_loss)


CUBES_FIELDS = {
    "pos_weight": Field(128.0, c.number(above=0),
                        "Weight of positive (aneurysm) voxels in the cross-entropy"),
    "dice": Field(1.0, WEIGHT, "Dice loss term"),
    "ce": Field(1.0, WEIGHT, "Binary cross-entropy term"),
}


def make_cube_loss(pos_weight: float, dice: float, ce: float) -> WeightedDiceCELoss:
    """The aneurysm loss from ``loss_weights.pos_weight``, ``.dice`` and ``.ce``."""
    return WeightedDiceCELoss(pos_weight=pos_weight, dice=dice, ce=ce)


class CubeLossWeightsIngredient(FieldIngredient):
    def __init__(self, **defaults: Any) -> None:
        super().__init__("loss_weights", CUBES_FIELDS, defaults)
        #: ``make_loss()``: :func:`make_cube_loss`.
        self.make_loss = self.captured(make_cube_loss)

    def validate(self, config) -> None:
        super().validate(config)
        weights = config[self.path]
        if weights["dice"] == 0 and weights["ce"] == 0:
            raise ConfigError("loss_weights.dice and loss_weights.ce are both 0; at least one "
                              "loss term must count")


# ----------------------------------------------------------------------------- lung tumour
LOSS_FIELDS = {
    "type": Field("dice_bce", c.choice(*LOSS_TYPES),
                  "'dice_bce' (balanced CE + Dice), 'dice' (foreground Dice), 'ce', 'balanced_ce', "
                  "'tversky' (foreground Tversky: missed tumour 0.7, false alarm 0.3)"),
}


def make_lung_loss(deep_supervision: bool, type: str):
    """The lung loss named by ``loss.type``; ``deep_supervision`` from ``model.deep_supervision``
    (the caller's)."""
    return build_loss(type, deep_supervision=deep_supervision)


class LossIngredient(FieldIngredient):
    """``loss``: the loss by name (the seed's ``loss.type``) rather than term weights."""

    def __init__(self, **defaults: Any) -> None:
        super().__init__("loss", LOSS_FIELDS, defaults)
        #: ``make_loss(deep_supervision=...)``: :func:`make_lung_loss`.
        self.make_loss = self.captured(make_lung_loss)
