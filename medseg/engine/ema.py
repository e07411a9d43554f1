"""Exponential moving average of the model weights, as a trainer :class:`Callback`.

The average is updated after every optimizer step and is what validation scores, what the
best checkpoint keeps and what the run ends with; the raw weights keep training. Its decay
ramps up, ``decay * (1 - exp(-updates / ramp_steps))``, so the average follows the fast early
changes instead of holding on to the random initial weights for thousands of steps.
BatchNorm statistics are averaged with the weights (``use_buffers=True``).
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

import torch
from torch import nn
from torch.optim.swa_utils import AveragedModel

from medseg.engine.trainer import Callback, Trainer


class ModelEMA(Callback):
    def __init__(self, model: nn.Module, *, decay: float = 0.9999,
                 ramp_steps: float = 2000) -> None:
        if not 0 < decay < 1:
            raise ValueError(f"decay must be between 0 and 1 (exclusive), got {decay!r}")
        if ramp_steps < 0:
            raise ValueError(f"ramp_steps must be >= 0, got {ramp_steps!r}")
        self.decay = decay
        self.ramp_steps = ramp_steps
        self._step_decay = decay
        self.averaged = AveragedModel(model, avg_fn=self._average, use_buffers=True)
        self.averaged.update_parameters(model)  # start from the initial weights

    def current_decay(self, updates: int) -> float:
        if self.ramp_steps == 0:
            return self.decay
        return self.decay * (1 - math.exp(-updates / self.ramp_steps))

    def _average(self, averaged: torch.Tensor, current: torch.Tensor,
                 num_averaged: torch.Tensor) -> torch.Tensor:
        if not averaged.is_floating_point():  # BatchNorm's step counter
            return current
        return torch.lerp(averaged, current, 1 - self._step_decay)

    @property
    def module(self) -> nn.Module:
        return self.averaged.module

    def on_fit_start(self, trainer: Trainer) -> None:
        self.averaged.to(trainer.device)

    def on_optimizer_step(self, trainer: Trainer) -> None:
        # One decay per update, read here once rather than per tensor (a device sync each).
        self._step_decay = self.current_decay(int(self.averaged.n_averaged))
        self.averaged.update_parameters(trainer.model)

    def model_for_validation(self, trainer: Trainer, model: nn.Module) -> nn.Module:
        return self.averaged.module

    def state_dict(self) -> dict[str, Any]:
        return {"averaged": self.averaged.state_dict()}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        self.averaged.load_state_dict(state["averaged"])
