"""The ``optimizer`` ingredient: optimizer type and decay, and the learning-rate schedule."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from ingredients.fields import Field, FieldIngredient
from medseg import config as c
from medseg.engine.fit import OptimizerSettings
from medseg.engine.optim import OPTIMIZERS
from medseg.engine.schedulers import SCHEDULERS

FIELDS = {
    "type": Field("adam", c.choice(*OPTIMIZERS), "Optimizer: 'adam', 'adamw' or 'sgd'"),
    "weight_decay": Field(1e-4, c.number(minimum=0), "Weight decay"),
    "momentum": Field(0.9, c.number(minimum=0, maximum=1), "SGD momentum (Nesterov when > 0)"),
    "lr_scheduler": Field("reduce_on_plateau", c.choice(*SCHEDULERS),
                          "'cosine_annealing', 'reduce_on_plateau', 'onecycle' or 'none' "
                          "(after training.warmup_epochs)"),
    "min_lr": Field(1e-6, c.number(minimum=0), "Floor of cosine annealing and plateau reduction"),
    "plateau_factor": Field(0.5, c.number(above=0, maximum=0.999),
                            "reduce_on_plateau: factor applied to the learning rate"),
    "plateau_patience": Field(5, c.integer(minimum=0),
                              "reduce_on_plateau: epochs without improvement before reducing"),
    "max_lr": Field(None, c.optional(c.number(above=0)),
                    "onecycle: peak learning rate (default 10x training.learning_rate)"),
}


class OptimizerIngredient(FieldIngredient):
    def __init__(self, **defaults: Any) -> None:
        super().__init__("optimizer", FIELDS, defaults)


def optimizer_settings(config: Mapping[str, Any]) -> OptimizerSettings:
    """The library's optimizer settings from a run's ``optimizer`` entries and the
    ``training`` entries they depend on (``learning_rate``, ``warmup_epochs``)."""
    optimizer, training = config["optimizer"], config["training"]
    return OptimizerSettings(
        name=optimizer["type"], learning_rate=training["learning_rate"],
        weight_decay=optimizer["weight_decay"], momentum=optimizer["momentum"],
        lr_scheduler=optimizer["lr_scheduler"], warmup_epochs=training["warmup_epochs"],
        min_lr=optimizer["min_lr"], plateau_factor=optimizer["plateau_factor"],
        plateau_patience=optimizer["plateau_patience"], max_lr=optimizer["max_lr"])
