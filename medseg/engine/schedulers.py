"""Learning-rate schedules: an optional linear warm-up, then the named scheduler.

Names follow the seeds: ``cosine_annealing`` (to ``min_lr``), ``reduce_on_plateau`` (on the
monitored metric), ``onecycle`` (OneCycleLR stepping per optimizer step; the warm-up becomes
its rising phase) and ``none``.
"""

from __future__ import annotations

import logging
from typing import Any

import torch
from torch.optim.lr_scheduler import (
    CosineAnnealingLR,
    LinearLR,
    OneCycleLR,
    ReduceLROnPlateau,
)


SCHEDULERS = ("none", "cosine_annealing", "reduce_on_plateau", "onecycle")

log = logging.getLogger(__name__)


def _leave_one_epoch(warmup_epochs: float, num_epochs: int) -> float:
    """A warm-up as long as the run (the seed's 5-epoch debug run keeps the 5-epoch default
    warm-up) is shortened so the last epoch trains at the full rate under the schedule."""
    longest = max(num_epochs - 1, 0)
    if warmup_epochs > longest:
        log.warning("warmup_epochs=%s shortened to %s: the run has %s epochs",
                    warmup_epochs, longest, num_epochs)
        return longest
    return warmup_epochs


class LRSchedule:
    """Steps a warm-up per optimizer step, then the main scheduler per step or per epoch.

    torch's ``SequentialLR`` cannot chain ``ReduceLROnPlateau``, which needs the metric, so
    the phases are switched here. ``state_dict`` covers both for resumable checkpoints.
    """

    def __init__(
        self,
        optimizer: torch.optim.Optimizer,
        name: str,
        *,
        num_epochs: int,
        steps_per_epoch: int,
        warmup_epochs: float = 0,
        min_lr: float = 0.0,
        plateau_factor: float = 0.5,
        plateau_patience: int = 5,
        monitor_mode: str = "min",
        max_lr: float | None = None,
        warmup_start_factor: float = 0.01,
        div_factor: float | None = None,
    ) -> None:
        if name not in SCHEDULERS:
            raise ValueError(f"name must be one of "
                              f"{', '.join(repr(s) for s in SCHEDULERS)}, got {name!r}")
        self.name = name
        self.optimizer = optimizer
        warmup_epochs = _leave_one_epoch(warmup_epochs, num_epochs)
        total_steps = max(1, num_epochs * steps_per_epoch)
        self.warmup_steps = 0 if name == "onecycle" else int(round(warmup_epochs * steps_per_epoch))
        self.steps_taken = 0
        self.div_factor = div_factor
        self.main = self._build_main(name, num_epochs, total_steps, warmup_epochs, min_lr,
                                     plateau_factor, plateau_patience, monitor_mode, max_lr)
        # Built after the main scheduler: a scheduler's constructor sets the learning rate,
        # and the warm-up's starting rate must be the one in force.
        self.warmup = (LinearLR(optimizer, start_factor=warmup_start_factor, end_factor=1.0,
                                total_iters=self.warmup_steps)
                       if self.warmup_steps > 0 else None)

    def _build_main(self, name, num_epochs, total_steps, warmup_epochs, min_lr,
                    plateau_factor, plateau_patience, monitor_mode, max_lr):
        if name == "cosine_annealing":
            span = max(1, num_epochs - int(warmup_epochs))
            return CosineAnnealingLR(self.optimizer, T_max=span, eta_min=min_lr)
        if name == "reduce_on_plateau":
            return ReduceLROnPlateau(self.optimizer, mode=monitor_mode, factor=plateau_factor,
                                     patience=plateau_patience, min_lr=min_lr)
        if name == "onecycle":
            peak = max_lr if max_lr is not None else self.optimizer.param_groups[0]["lr"] * 10
            rising = warmup_epochs / num_epochs if warmup_epochs else 0.3
            # div_factor: the starting rate is max_lr / div_factor (torch's default 25).
            extra = {} if self.div_factor is None else {"div_factor": self.div_factor}
            return OneCycleLR(self.optimizer, max_lr=peak, total_steps=total_steps,
                              pct_start=min(max(rising, 0.01), 0.99), **extra)
        return None

    @property
    def in_warmup(self) -> bool:
        return self.warmup is not None and self.steps_taken < self.warmup_steps

    def after_optimizer_step(self) -> None:
        if self.in_warmup:
            self.warmup.step()
        elif isinstance(self.main, OneCycleLR) and self.main.last_epoch < self.main.total_steps:
            self.main.step()
        self.steps_taken += 1

    def after_epoch(self, monitored_value: float | None) -> None:
        if self.in_warmup or self.main is None or isinstance(self.main, OneCycleLR):
            return
        if isinstance(self.main, ReduceLROnPlateau):
            if monitored_value is not None:
                self.main.step(monitored_value)
        else:
            self.main.step()

    def current_lr(self) -> float:
        return float(self.optimizer.param_groups[0]["lr"])

    def scale(self, factors: list[float]) -> None:
        """Multiply every learning rate of the schedule, at the point it has reached, by the
        factor of its parameter group: a resumed run with a new initial rate continues the
        same curve scaled to that rate."""
        for group, factor in zip(self.optimizer.param_groups, factors):
            for key in ("lr", "initial_lr", "max_lr", "min_lr"):  # the last two: OneCycleLR's
                if key in group:
                    group[key] *= factor
        for scheduler in (self.main, self.warmup):
            for name in ("base_lrs", "_last_lr"):
                values = getattr(scheduler, name, None)
                if values is not None:
                    setattr(scheduler, name, [v * f for v, f in zip(values, factors)])

    def state_dict(self) -> dict[str, Any]:
        return {
            "steps_taken": self.steps_taken,
            "main": self.main.state_dict() if self.main is not None else None,
            "warmup": self.warmup.state_dict() if self.warmup is not None else None,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.steps_taken = state["steps_taken"]
        if self.main is not None and state["main"] is not None:
            self.main.load_state_dict(state["main"])
        if self.warmup is not None and state["warmup"] is not None:
            self.warmup.load_state_dict(state["warmup"])
