"""The ``optimizer`` ingredient: optimizer type and decay, and the learning-rate schedule."""

from __future__ import annotations

from typing import Any

from ingredients.fields import Field, FieldIngredient
from medseg import config as c
from medseg.engine.optim import OPTIMIZERS, build_optimizer
from medseg.engine.schedulers import SCHEDULERS, LRSchedule

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

        @self.capture
        def make_optimizer(parameters, learning_rate: float, type: str, weight_decay: float,
                           momentum: float):
            return build_optimizer(parameters, type, learning_rate=learning_rate,
                                   weight_decay=weight_decay, momentum=momentum)

        @self.capture
        def make_schedule(optimizer, num_epochs: int, steps_per_epoch: int, warmup_epochs: float,
                          monitor_mode: str, lr_scheduler: str, min_lr: float,
                          plateau_factor: float, plateau_patience: int, max_lr) -> LRSchedule:
            return LRSchedule(optimizer, lr_scheduler, num_epochs=num_epochs,
                              steps_per_epoch=steps_per_epoch, warmup_epochs=warmup_epochs,
                              min_lr=min_lr, plateau_factor=plateau_factor,
                              plateau_patience=plateau_patience, monitor_mode=monitor_mode,
                              max_lr=max_lr)

        self.make_optimizer = make_optimizer
        self.make_schedule = make_schedule
