"""``fit()``: train a pipeline's model on its task from plain settings, without Sacred.

This is the whole training wiring: loaders, optimizer, schedule (stepped per optimizer step,
so its length is ``ceil(batches / accumulation)`` per epoch), the loop, resume, and the
training-curves figure. The Sacred experiments call it through
:class:`ingredients.pipeline.PipelineRun`, which only turns a run's config into these
arguments; a notebook calls it directly::

    from medseg.engine.fit import LoaderSettings, OptimizerSettings, fit
    from medseg.engine.trainer import TrainerSettings

    result = fit(model, task, train_set, val_set, TrainerSettings(num_epochs=5, monitor="val_dice",
                 monitor_mode="max"), optimizer=OptimizerSettings(learning_rate=1e-3),
                 loaders=LoaderSettings(batch_size=2))
    result.best_metric, result.history[-1]
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn
from torch.utils.data import Dataset

from medseg.data.loaders import EpochLoader
from medseg.engine.checkpoint import CheckpointManager
from medseg.engine.optim import build_optimizer
from medseg.engine.precision import Precision, resolve_device, resolve_precision
from medseg.engine.reporting import RecordingReporter, Reporter
from medseg.engine.schedulers import LRSchedule
from medseg.engine.trainer import Callback, FitResult, Task, Trainer, TrainerSettings
from medseg.files import reporting_full_disk
from medseg.viz.curves import plot_training_curves


@dataclass(frozen=True)
class OptimizerSettings:
    """The optimizer (``adam``, ``adamw``, ``sgd``) and its learning-rate schedule (``none``,
    ``cosine_annealing``, ``reduce_on_plateau``, ``onecycle``; see :class:`LRSchedule`)."""

    name: str = "adam"
    learning_rate: float = 1e-3
    weight_decay: float = 0.0
    momentum: float = 0.9
    lr_scheduler: str = "none"
    warmup_epochs: float = 0.0
    min_lr: float = 0.0
    plateau_factor: float = 0.5
    plateau_patience: int = 5
    max_lr: float | None = None


@dataclass(frozen=True)
class LoaderSettings:
    """Training batches are shuffled and seeded per epoch from ``seed``; validation runs in
    order, ``val_batch_size`` cases at a time."""

    batch_size: int = 4
    val_batch_size: int = 1
    num_workers: int = 0
    seed: int = 0


def build_loader(dataset: Dataset, settings: LoaderSettings, *, train: bool,
                 device: torch.device) -> EpochLoader:
    """Shuffled, seeded batches for training; for validation, in order and
    ``val_batch_size`` cases at a time (1 where cases differ in size and are scored one by
    one)."""
    return EpochLoader(dataset, batch_size=settings.batch_size if train else settings.val_batch_size,
                       shuffle=train, num_workers=settings.num_workers, seed=settings.seed,
                       pin_memory=device.type == "cuda")


def make_loaders(train_set: Dataset, val_set: Dataset, settings: LoaderSettings,
                 device: torch.device) -> tuple[EpochLoader, EpochLoader]:
    train = build_loader(train_set, settings, train=True, device=device)
    val = build_loader(val_set, settings, train=False, device=device)
    if len(train) == 0:
        raise ValueError("train_set has no cases")
    return train, val


def make_optimization(parameters, settings: OptimizerSettings, *, num_epochs: int,
                      steps_per_epoch: int,
                      monitor_mode: str = "min") -> tuple[torch.optim.Optimizer, LRSchedule]:
    """The optimizer and its schedule; ``steps_per_epoch`` counts optimizer steps."""
    optimizer = build_optimizer(parameters, settings.name, learning_rate=settings.learning_rate,
                                weight_decay=settings.weight_decay, momentum=settings.momentum)
    schedule = LRSchedule(
        optimizer, settings.lr_scheduler, num_epochs=num_epochs, steps_per_epoch=steps_per_epoch,
        warmup_epochs=settings.warmup_epochs, min_lr=settings.min_lr,
        plateau_factor=settings.plateau_factor, plateau_patience=settings.plateau_patience,
        monitor_mode=monitor_mode, max_lr=settings.max_lr)
    return optimizer, schedule


def fit(model: nn.Module, task: Task, train_set: Dataset, val_set: Dataset,
        settings: TrainerSettings, reporter: Reporter | None = None, *,
        optimizer: OptimizerSettings = OptimizerSettings(),
        loaders: LoaderSettings = LoaderSettings(),
        device: str | torch.device = "auto", precision: str | Precision = "auto",
        checkpoints: CheckpointManager | None = None, callbacks: Sequence[Callback] = (),
        resume: str | Path | None = None, curves_path: str | Path | None = None,
        curve_metrics: Sequence[str] = (), config: dict | None = None) -> FitResult:
    """Train ``model`` on ``task`` and return the best epoch, its metric and the history.

    ``reporter`` receives every metric (default: kept in memory); ``checkpoints`` writes the
    best and last states (and with ``resume`` the run continues from one); ``curves_path``
    gets the training-curves PNG of the monitored metric and ``curve_metrics``, also when
    training stops with an error. ``config`` is stored in each checkpoint.
    """
    device = resolve_device(device) if isinstance(device, str) else device
    if isinstance(precision, str):
        precision = resolve_precision(precision, device)
    reporter = reporter if reporter is not None else RecordingReporter()
    train_loader, val_loader = make_loaders(train_set, val_set, loaders, device)
    opt, schedule = make_optimization(
        model.parameters(), optimizer, num_epochs=settings.num_epochs,
        steps_per_epoch=math.ceil(len(train_loader) / settings.gradient_accumulation_steps),
        monitor_mode=settings.monitor_mode)
    trainer = Trainer(model, task, opt, schedule, train_loader, val_loader, device=device,
                      precision=precision, settings=settings, reporter=reporter,
                      checkpoints=checkpoints, callbacks=callbacks, config=config)
    resumed = None
    if resume:
        trainer.resume(resume)
        resumed = {"path": str(resume), "epoch": trainer.epoch}
        if trainer.learning_rate_change is not None:
            before, after = trainer.learning_rate_change
            resumed["learning_rate"] = {"checkpoint": before[0], "now": after[0]}
        reporter.set_info("resumed_from", resumed)
    try:
        result = trainer.fit()
    except BaseException:
        # The curves so far are still worth having, but a full disk (or a second Ctrl-C)
        # while drawing them must not hide why training stopped.
        with contextlib.suppress(Exception):
            _record_curves(trainer, reporter, curves_path, curve_metrics)
        raise
    _record_curves(trainer, reporter, curves_path, curve_metrics)
    result.resumed_from = resumed
    return result


def _record_curves(trainer: Trainer, reporter: Reporter, path: str | Path | None,
                   metrics: Sequence[str]) -> None:
    if path is None or not trainer.history:
        return
    with reporting_full_disk(Path(path)):
        figure = plot_training_curves(trainer.history, Path(path),
                                      monitor=trainer.settings.monitor, metrics=metrics)
    reporter.add_artifact(figure)
