"""The training loop shared by every pipeline.

What differs between pipelines (how a batch becomes a loss, how validation is scored) is a
:class:`Task`; extras that hook into the loop (EMA weights, BatchNorm calibration, figures)
are :class:`Callback` objects. The loop itself owns mixed precision, gradient accumulation
and clipping, the learning-rate schedule, early stopping with best-weight restore,
checkpoints, NaN detection, memory metrics and progress bars.
"""

from __future__ import annotations

import contextlib
import logging
import math
import sys
import time
import warnings
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import torch
from torch import nn
from tqdm.auto import tqdm
from tqdm.contrib.logging import logging_redirect_tqdm

from medseg.engine import distributed
from medseg.engine.checkpoint import CheckpointManager, load_checkpoint, plain
from medseg.files import remove_leftovers
from medseg.engine.memory import MemoryMonitor, cleanup_memory, cleanup_window
from medseg.engine.precision import Precision
from medseg.engine.reporting import Reporter
from medseg.engine.schedulers import LRSchedule
from medseg.engine.seeding import capture_rng_state, restore_rng_state
from medseg.errors import DataError, Interrupted, TrainingDivergedError

log = logging.getLogger(__name__)


@dataclass
class StepOutput:
    """One micro-batch: the loss to back-propagate, its named terms (unweighted,
    detached, for logging) and how many samples it covered."""

    loss: torch.Tensor
    terms: dict[str, torch.Tensor]
    batch_size: int


class Task(Protocol):
    """What a pipeline tells the loop: how to train on a batch and how to validate."""

    def metric_names(self) -> Sequence[str]:
        """Names of the validation metrics :meth:`validate` returns (without ``val_``)."""

    def training_step(self, model: nn.Module, batch: Any, device: torch.device) -> StepOutput:
        """Forward one batch (already under autocast) and return its loss."""

    def validate(self, model: nn.Module, loader: Iterable, device: torch.device,
                 precision: Precision) -> dict[str, float]:
        """Score the model on ``loader``; the model is in eval mode and gradients are off."""


def image_mask_step(loss: nn.Module, model: nn.Module, batch: Mapping[str, torch.Tensor],
                    device: torch.device) -> StepOutput:
    """:meth:`Task.training_step` of a task whose batches hold ``image`` and ``mask`` and whose
    loss maps (model output, mask) to (total, terms)."""
    image = batch["image"].to(device, non_blocking=True)
    mask = batch["mask"].to(device, non_blocking=True)
    total, terms = loss(model(image), mask)
    return StepOutput(total, terms, image.shape[0])


def monitor_choices(task: Task) -> list[str]:
    """The metric names a run can monitor: the task's validation metrics, ``val_`` prefixed."""
    return [f"val_{name}" for name in task.metric_names()]


class Callback:
    """Hooks into the loop; every method is optional."""

    def on_fit_start(self, trainer: Trainer) -> None:
        pass

    def on_before_optimizer_step(self, trainer: Trainer) -> None:
        """The gradients of this step are in ``.grad`` (unscaled when they are logged)."""

    def on_optimizer_step(self, trainer: Trainer) -> None:
        pass

    def model_for_validation(self, trainer: Trainer, model: nn.Module) -> nn.Module:
        return model

    def on_epoch_end(self, trainer: Trainer, epoch: int, metrics: Mapping[str, float]) -> None:
        pass

    def state_dict(self) -> dict[str, Any]:
        return {}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        pass


@dataclass
class TrainerSettings:
    num_epochs: int
    gradient_accumulation_steps: int = 1
    gradient_clip_norm: float = 0.0
    early_stopping_patience: int = 0
    monitor: str = "val_loss"
    monitor_mode: str = "min"
    memory_cleanup_frequency: int = 0
    log_frequency: int = 10
    progress_bar: bool = True
    #: Log the gradients' global L2 norm every step even when clipping is off.
    log_grad_norm: bool = False


@dataclass
class FitResult:
    best_epoch: int | None
    best_metric: float | None
    epochs_run: int
    stopped_early: bool
    history: list[dict[str, float]] = field(default_factory=list)
    #: ``{path, epoch[, learning_rate]}`` of the checkpoint a resumed run continued.
    resumed_from: dict[str, Any] | None = None


class EarlyStopping:
    """Tracks the best value of the monitored metric and the epochs since it improved."""

    def __init__(self, mode: str, patience: int) -> None:
        if mode not in ("min", "max"):
            raise ValueError(f"mode must be 'min' or 'max', got {mode!r}")
        self.mode = mode
        self.patience = patience
        self.best: float | None = None
        self.best_epoch: int | None = None
        self.bad_epochs = 0

    def update(self, value: float, epoch: int) -> bool:
        improved = self.best is None or (value < self.best if self.mode == "min" else value > self.best)
        if improved:
            self.best, self.best_epoch, self.bad_epochs = value, epoch, 0
        else:
            self.bad_epochs += 1
        return improved

    @property
    def should_stop(self) -> bool:
        return self.patience > 0 and self.bad_epochs >= self.patience

    def state_dict(self) -> dict[str, Any]:
        return {"best": self.best, "best_epoch": self.best_epoch, "bad_epochs": self.bad_epochs}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        self.best, self.best_epoch, self.bad_epochs = state["best"], state["best_epoch"], state["bad_epochs"]


class Trainer:
    def __init__(
        self,
        model: nn.Module,
        task: Task,
        optimizer: torch.optim.Optimizer,
        schedule: LRSchedule,
        train_loader,
        val_loader,
        *,
        device: torch.device,
        precision: Precision,
        settings: TrainerSettings,
        reporter: Reporter,
        checkpoints: CheckpointManager | None = None,
        callbacks: Sequence[Callback] = (),
        config: Mapping[str, Any] | None = None,
    ) -> None:
        self.model = model.to(device)
        self.task = task
        self.optimizer = optimizer
        self.schedule = schedule
        self.train_loader = train_loader
        self.val_loader = val_loader
        self.device = device
        self.precision = precision
        self.settings = settings
        self.reporter = reporter
        self.checkpoints = checkpoints
        self.callbacks = list(callbacks)
        self.config = plain(dict(config or {}))
        self.scaler = precision.grad_scaler()
        self.early_stopping = EarlyStopping(settings.monitor_mode, settings.early_stopping_patience)
        self.memory = MemoryMonitor(device)
        self.epoch = 0
        self.global_step = 0
        self.history: list[dict[str, float]] = []
        #: Set by a callback (a sweep's scheduler) to end training after this epoch.
        self.stop_reason: str | None = None
        self._best_weights: dict[str, torch.Tensor] | None = None
        # The initial rate of each group (the schedulers built before may have moved "lr").
        self.initial_lrs = [float(g.get("initial_lr", g["lr"])) for g in optimizer.param_groups]
        #: ``(checkpoint's initial rates, this run's)`` when a resume changed them.
        self.learning_rate_change: tuple[list[float], list[float]] | None = None
        self._check_monitor()
        self.world_size = distributed.world_size() if distributed.is_initialized() else 1
        #: What trains: the model in DistributedDataParallel under torchrun, else the model.
        self.training_model = self._distribute()

    def _distribute(self) -> nn.Module:
        """Under a process group: each rank trains on its share of every batch (the batch
        size is the whole step's), gradients are averaged by DDP; recorded in ``info``."""
        batch = getattr(self.train_loader, "batch_size", None)
        accumulation = self.settings.gradient_accumulation_steps
        per_rank = batch
        if distributed.is_initialized():
            if not hasattr(self.train_loader, "distribute"):
                raise TypeError("training under torchrun needs an EpochLoader (its distribute() "
                                "shares the batches among the ranks)")
            per_rank = distributed.per_rank_batch(batch, self.world_size)
            self.train_loader.distribute(distributed.rank(), self.world_size, per_rank)
        if batch is not None:
            self.reporter.set_info("distributed", {
                "world_size": self.world_size, "backend": distributed.backend_name(),
                "per_rank_batch_size": per_rank, "gradient_accumulation_steps": accumulation,
                "effective_batch_size": per_rank * self.world_size * accumulation})
        return distributed.wrap_model(self.model, self.device)

    def _check_monitor(self) -> None:
        available = monitor_choices(self.task)
        if self.settings.monitor not in available:
            raise ValueError(f"settings.monitor={self.settings.monitor!r} is not a metric the "
                             f"task reports; choose one of {', '.join(available)}")

    # ------------------------------------------------------------------ resume
    def resume(self, path: str | Path) -> None:
        """Continue from a checkpoint: weights, optimizer, schedule, scaler, early-stopping
        state, callbacks, epoch and step counters, and the random generators."""
        state = load_checkpoint(path, map_location=self.device)
        remove_leftovers(Path(path).parent)  # of the run it continues, if that was killed
        try:
            self.model.load_state_dict(state.get("training_model", state["model"]))
        except RuntimeError as error:
            raise DataError(f"checkpoint {path} does not fit this model "
                            f"({str(error).splitlines()[0]}); was it written with another "
                            "model config?") from None
        self.optimizer.load_state_dict(state["optimizer"])
        self.schedule.load_state_dict(state["scheduler"])
        self._apply_new_learning_rate(state)
        self.scaler.load_state_dict(state["scaler"])
        self.early_stopping.load_state_dict(state["early_stopping"])
        for callback, callback_state in zip(self.callbacks, state.get("callbacks", [])):
            callback.load_state_dict(callback_state)
        self.epoch = int(state["epoch"])
        self.global_step = int(state["global_step"])
        self.history = list(state.get("history", []))
        restore_rng_state(state["rng"])
        # The data order of every later epoch derives from this seed, not from the new run's.
        if state.get("data_seed") is not None and hasattr(self.train_loader, "seed"):
            self.train_loader.seed = state["data_seed"]
        self._best_weights = self._best_weights_beside(Path(path))
        if self.checkpoints is not None:  # until this run writes its own
            self.checkpoints.latest, self.checkpoints.latest_epoch = Path(path), self.epoch
        log.info("resumed from %s at epoch %d (step %d)", path, self.epoch, self.global_step)

    def _apply_new_learning_rate(self, state: Mapping[str, Any]) -> None:
        """The optimizer and schedule state continue the checkpoint's rates; a trainer built
        with another initial rate scales them to it (and says so)."""
        saved = state.get("initial_lrs")
        if saved is None:  # written before initial rates were stored
            saved = [float(g.get("initial_lr", g["lr"]))
                     for g in state["optimizer"]["param_groups"]]
        wanted = list(self.initial_lrs)
        if len(saved) != len(wanted) or all(math.isclose(a, b) for a, b in zip(saved, wanted)):
            return
        self.schedule.scale([b / a for a, b in zip(saved, wanted)])
        self.learning_rate_change = (list(saved), wanted)
        log.info("initial learning rate %s on resume (the checkpoint's was %s): the continued "
                 "schedule is scaled to it, now at %.4g", _rates(wanted), _rates(saved),
                 self.schedule.current_lr())

    def _best_weights_beside(self, path: Path) -> dict[str, torch.Tensor] | None:
        """The best checkpoint of the run ``path`` belongs to: its folder is the one the file
        names are relative to (``best_name`` may have a subfolder, ``weights/best.pt``)."""
        if self.checkpoints is None:
            return None
        depth = len(Path(self.checkpoints.best_name).parts) - 1
        if depth >= len(path.parents):
            return None
        best_file = path.parents[depth] / self.checkpoints.best_name
        if not best_file.is_file():
            return None
        best = load_checkpoint(best_file, map_location="cpu")
        return best["model"] if best.get("epoch") == self.early_stopping.best_epoch else None

    # ------------------------------------------------------------------ fit
    def fit(self) -> FitResult:
        for callback in self.callbacks:
            callback.on_fit_start(self)
        stopped_early = False
        try:
            for epoch in range(self.epoch + 1, self.settings.num_epochs + 1):
                metrics = self._run_epoch(epoch)
                for callback in self.callbacks:
                    callback.on_epoch_end(self, epoch, metrics)
                if self.stop_reason is not None:
                    log.info("training stopped after epoch %d: %s", epoch, self.stop_reason)
                    stopped_early = True
                    break
                if self.early_stopping.should_stop:
                    log.info("early stopping at epoch %d: %s did not improve for %d epochs "
                             "(best %.4f at epoch %s)", epoch, self.settings.monitor,
                             self.early_stopping.bad_epochs, self.early_stopping.best,
                             self.early_stopping.best_epoch)
                    stopped_early = True
                    break
        except KeyboardInterrupt as error:  # Ctrl-C, or SIGTERM turned into one
            latest = self.checkpoints.latest if self.checkpoints is not None else None
            raise Interrupted(getattr(error, "signal_name", "SIGINT"), checkpoint=latest,
                              epoch=self.checkpoints.latest_epoch if latest else None,
                              training=True) from None
        finally:
            self.reporter.set_info("best_epoch", self.early_stopping.best_epoch)
            self.reporter.set_info("best_metric", self.early_stopping.best)
            self.reporter.set_info("monitor", self.settings.monitor)
        self._restore_best_weights()
        return FitResult(self.early_stopping.best_epoch, self.early_stopping.best,
                         self.epoch, stopped_early, list(self.history))

    def _restore_best_weights(self) -> None:
        if self._best_weights is None:
            log.warning("best weights are not available (resumed without the best checkpoint); "
                        "keeping the weights of the last epoch")
            return
        self.model.load_state_dict(self._best_weights)
        log.info("restored the weights of epoch %s (%s=%.4f)", self.early_stopping.best_epoch,
                 self.settings.monitor, self.early_stopping.best)

    def _run_epoch(self, epoch: int) -> dict[str, float]:
        self.epoch = epoch
        self.memory.start_epoch()
        started = time.perf_counter()
        train_metrics = self._train_epoch(epoch)
        samples = train_metrics.pop("samples")
        trained = time.perf_counter()
        validated, val_metrics = self._validate()
        finished = time.perf_counter()

        monitored = val_metrics[self.settings.monitor]
        improved = self.early_stopping.update(monitored, epoch)
        if improved:
            self._best_weights = {k: v.detach().to("cpu", copy=True)
                                  for k, v in validated.state_dict().items()}
        metrics = {
            **train_metrics,
            **val_metrics,
            "lr": self.schedule.current_lr(),
            "epoch_time_s": finished - started,
            "train_time_s": trained - started,
            "val_time_s": finished - trained,
            "samples_per_s": samples / max(trained - started, 1e-9),
            **self.memory.epoch_metrics(),
        }
        self.schedule.after_epoch(monitored)
        for name, value in metrics.items():
            self.reporter.log_scalar(name, value, epoch)
        self.history.append({"epoch": epoch, **metrics})
        self._save_checkpoints(epoch, improved, monitored, validated)
        distributed.barrier()  # every rank sees the checkpoints rank 0 has just written
        log.info("epoch %d/%d  %s", epoch, self.settings.num_epochs,
                 _summary(metrics, self.settings.monitor))
        return metrics

    def _save_checkpoints(self, epoch: int, improved: bool, monitored: float,
                          validated: nn.Module) -> None:
        """``model`` holds the weights that were validated (what evaluation and prediction
        load); when a callback validates other weights than it trains (EMA), the trained
        ones go to ``training_model`` for resuming."""
        if self.checkpoints is None or not distributed.is_main():
            return
        trained = {} if validated is self.model else {"training_model": self.model.state_dict()}
        weights, optimizer_state = validated.state_dict(), self.optimizer.state_dict()
        state = {
            "model": weights,
            # The names of PyTorch's own resume recipe, which the seeds use
            # (checkpoint['model_state_dict']); the same objects, so saved once.
            "model_state_dict": weights,
            "optimizer_state_dict": optimizer_state,
            **trained,
            "optimizer": optimizer_state,
            "scheduler": self.schedule.state_dict(),
            "scaler": self.scaler.state_dict(),
            "epoch": epoch,
            "global_step": self.global_step,
            "monitor": self.settings.monitor,
            "monitor_value": monitored,
            "early_stopping": self.early_stopping.state_dict(),
            "callbacks": [callback.state_dict() for callback in self.callbacks],
            "history": plain(self.history),
            "rng": capture_rng_state(),
            "data_seed": getattr(self.train_loader, "seed", None),
            "initial_lrs": list(self.initial_lrs),
            "config": self.config,
        }
        self.checkpoints.save(state, epoch=epoch, is_best=improved)

    # ------------------------------------------------------------------ training
    def _train_epoch(self, epoch: int) -> dict[str, float]:
        settings = self.settings
        self.model.train()
        if hasattr(self.train_loader, "set_epoch"):
            self.train_loader.set_epoch(epoch)
        accumulation = settings.gradient_accumulation_steps
        num_batches = len(self.train_loader)
        window = _LossWindow(self.device)
        epoch_totals = _LossWindow(self.device)
        samples = 0
        bar = tqdm(self.train_loader, total=num_batches, desc=f"epoch {epoch}/{settings.num_epochs}",
                   disable=not settings.progress_bar, leave=True, mininterval=2.0,
                   file=sys.stderr, dynamic_ncols=False, ncols=100)
        self.optimizer.zero_grad(set_to_none=True)
        cleanups = (cleanup_window() if settings.memory_cleanup_frequency
                    else contextlib.nullcontext())
        with _messages_above_bars(), cleanups:
            for index, batch in enumerate(bar):
                group_start = index - index % accumulation
                group_size = min(accumulation, num_batches - group_start)
                last_of_group = index - group_start + 1 == group_size
                # DDP averages the gradients once per optimizer step, not per micro-batch.
                syncing = (contextlib.nullcontext() if last_of_group
                           or not hasattr(self.training_model, "no_sync")
                           else self.training_model.no_sync())
                with syncing:
                    with self.precision.autocast():
                        output = self.task.training_step(self.training_model, batch, self.device)
                    self.scaler.scale(output.loss / group_size).backward()
                window.add(output)
                epoch_totals.add(output)
                samples += output.batch_size
                if index - group_start + 1 < group_size:
                    continue
                grad_norm = self._optimizer_step()
                if grad_norm is not None:
                    window.add_value("grad_norm", grad_norm)
                if self.global_step % settings.log_frequency == 0:
                    means = window.drain(epoch, self.global_step)
                    for name, value in means.items():
                        self.reporter.log_scalar(f"train_{name}", value, self.global_step)
                    bar.set_postfix(loss=f"{means['loss']:.4f}", refresh=False)
                if settings.memory_cleanup_frequency and self.global_step % settings.memory_cleanup_frequency == 0:
                    cleanup_memory(self.device)
        bar.close()
        totals = epoch_totals.drain(epoch, self.global_step)
        samples = int(distributed.sum_across_ranks(torch.tensor([samples])).item())
        return {"train_loss_epoch": totals.pop("loss"),
                **{f"train_{name}_epoch": value for name, value in totals.items()},
                "samples": samples}

    def _optimizer_step(self) -> torch.Tensor | None:
        grad_norm = None
        if self.settings.gradient_clip_norm > 0 or self.settings.log_grad_norm:
            self.scaler.unscale_(self.optimizer)
        if self.settings.gradient_clip_norm > 0:
            grad_norm = torch.nn.utils.clip_grad_norm_(self.model.parameters(),
                                                       self.settings.gradient_clip_norm)
        elif self.settings.log_grad_norm:
            grad_norm = torch.nn.utils.get_total_norm(
                [p.grad for p in self.model.parameters() if p.grad is not None])
        for callback in self.callbacks:
            callback.on_before_optimizer_step(self)
        self.scaler.step(self.optimizer)
        self.scaler.update()
        self.optimizer.zero_grad(set_to_none=True)
        self.schedule.after_optimizer_step()
        self.global_step += 1
        for callback in self.callbacks:
            callback.on_optimizer_step(self)
        return grad_norm

    # ------------------------------------------------------------------ validation
    def _validate(self) -> tuple[nn.Module, dict[str, float]]:
        """The model validated (the trained one, or a callback's substitute such as its EMA
        weights) and its metrics."""
        model = self.model
        for callback in self.callbacks:
            model = callback.model_for_validation(self, model)
        model.eval()
        with torch.no_grad():
            metrics = self._validation_metrics(model)
        self.model.train()
        monitored = self.settings.monitor.removeprefix("val_")
        if not math.isfinite(float(metrics[monitored])):
            raise TrainingDivergedError(
                f"validation after epoch {self.epoch} gave {self.settings.monitor}="
                f"{metrics[monitored]}; the model has diverged")
        # Metrics undefined for this epoch (a structure absent from every case) are left out.
        return model, {f"val_{name}": float(value) for name, value in metrics.items()
                       if math.isfinite(float(value))}

    def _validation_metrics(self, model: nn.Module) -> dict[str, float]:
        """The task's validation metrics. Under torchrun a task with ``validation_state``
        and ``summarise_validation`` scores each rank's share of the batches and summarises
        every rank's state (sums and per-case records, not means), so the figures are one
        process's; any other task is validated whole on rank 0, which hands its metrics to
        the others."""
        if not distributed.is_initialized() or self.world_size == 1:
            return self.task.validate(model, self.val_loader, self.device, self.precision)
        distributed.broadcast_buffers(model)  # BatchNorm statistics as rank 0 has them
        if hasattr(self.task, "validation_state") and hasattr(self.val_loader,
                                                              "validation_shard"):
            shard = self.val_loader.validation_shard(distributed.rank(), self.world_size)
            state = self.task.validation_state(model, shard, self.device, self.precision)
            return self.task.summarise_validation(distributed.gather(state))
        metrics = None
        if distributed.is_main():
            metrics = self.task.validate(model, self.val_loader, self.device, self.precision)
        return distributed.from_main(metrics)


class _LossWindow:
    """Sums loss terms on the device and reads them back once per logging interval: one
    host-device synchronisation per interval instead of one per step."""

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.sums: dict[str, torch.Tensor] = {}
        self.counts: dict[str, int] = {}

    def add(self, output: StepOutput) -> None:
        self.add_value("loss", output.loss)
        for name, value in output.terms.items():
            self.add_value(f"loss_{name}", value)

    def add_value(self, name: str, value: torch.Tensor) -> None:
        value = value.detach().float()
        self.sums[name] = self.sums[name] + value if name in self.sums else value
        self.counts[name] = self.counts.get(name, 0) + 1

    def drain(self, epoch: int, step: int) -> dict[str, float]:
        if not self.sums:
            return {"loss": float("nan")}
        names = list(self.sums)
        # Every rank takes as many steps: the ranks' sums over as many terms, averaged.
        world = distributed.world_size() if distributed.is_initialized() else 1
        values = (distributed.sum_across_ranks(torch.stack([self.sums[n] for n in names]))
                  / world).tolist()
        means = {n: v / self.counts[n] for n, v in zip(names, values)}
        self.sums.clear()
        self.counts.clear()
        bad = {n: v for n, v in means.items() if not math.isfinite(v) and n != "grad_norm"}
        if bad:
            shown = ", ".join(f"{n}={v}" for n, v in bad.items())
            raise TrainingDivergedError(
                f"training diverged at epoch {epoch}, optimizer step {step}: {shown}. "
                "Lower training.learning_rate, raise training.gradient_clip_norm protection "
                "or check the data for NaN values")
        return means


def _rates(values: list[float]) -> str:
    return ", ".join(f"{v:g}" for v in values)


def _summary(metrics: Mapping[str, float], monitor: str) -> str:
    keys = [k for k in metrics if k.startswith("val_") and "_" not in k[4:] and k != monitor]
    keys = ["train_loss_epoch", monitor, *keys[:4], "lr", "epoch_time_s"]
    return "  ".join(f"{k}={metrics[k]:.4g}" for k in keys if k in metrics)


@contextlib.contextmanager
def _messages_above_bars():
    """Warnings and log lines written while a progress bar is drawn get a line of their own
    (tqdm clears the bar, writes the line, draws the bar again) instead of running on from the
    bar's half-drawn line, on the terminal and in the captured output."""
    shown = warnings.showwarning

    def show(message, category, filename, lineno, file=None, line=None):
        text = warnings.formatwarning(message, category, filename, lineno, line)
        tqdm.write(text.rstrip("\n"), file=file or sys.stderr)

    warnings.showwarning = show
    try:
        with logging_redirect_tqdm():
            yield
    finally:
        warnings.showwarning = shown
