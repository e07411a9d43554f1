"""What an evaluation hands back (metrics, files written, small facts for the run's info), and
the loss meter every validation pass shares."""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch


@dataclass
class EvaluationReport:
    metrics: dict[str, float]
    headline: list[str]
    """The few metrics that summarise the evaluation (the run's result shows these)."""
    artifacts: list[Path] = field(default_factory=list)
    info: dict[str, Any] = field(default_factory=dict)


class LossMeter:
    """The batch mean of a loss and of each of its terms over an evaluation pass.

    ``summary()`` gives ``{"loss": mean, "loss_<term>": mean, ...}``, so validation reports
    the same terms that training logs (``val_loss_dice`` beside ``train_loss_dice``).
    """

    def __init__(self) -> None:
        self._sums: dict[str, float] = {}
        self._batches = 0

    def add(self, total: torch.Tensor | float, terms: Mapping[str, torch.Tensor | float]) -> None:
        self._batches += 1
        for name, value in {"loss": total, **{f"loss_{k}": v for k, v in terms.items()}}.items():
            self._sums[name] = self._sums.get(name, 0.0) + float(value)

    def extend(self, other: LossMeter) -> None:
        """Add the batches ``other`` saw (another rank's share of a validation pass)."""
        self._batches += other._batches
        for name, total in other._sums.items():
            self._sums[name] = self._sums.get(name, 0.0) + total

    def summary(self) -> dict[str, float]:
        if not self._batches:
            return {"loss": math.nan}
        return {name: total / self._batches for name, total in self._sums.items()}
