"""One run of a pipeline: the ingredients' factories wired into the engine for a Sacred run.

Every experiment's main function is: build the model, the task and the datasets, then
``PipelineRun.fit`` and ``PipelineRun.evaluate``. What is recorded (device, parameter
count, dataset statistics, curves, checkpoints, evaluation figures) is decided here once
for all pipelines.
"""

from __future__ import annotations

import contextlib
import json
import math
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ingredients.checkpoint import CheckpointIngredient
from ingredients.optimizer import OptimizerIngredient
from ingredients.tracking import SacredReporter, link_checkpoint_directory, read_run_link
from ingredients.training import TrainingIngredient
from medseg.engine.checkpoint import model_weights
from medseg.engine.evaluation import EvaluationReport
from medseg.engine.memory import device_info
from medseg.engine.trainer import Callback, Trainer
from medseg.errors import ConfigError, DataError
from medseg.files import reporting_full_disk
from medseg.viz.curves import plot_training_curves

_MB = 1024 * 1024


class PredictionSnapshots(Callback):
    """``logging.visualize_predictions``: after each validation, draw the first validation
    case with the task's ``render_prediction`` and attach the PNG to the run."""

    def __init__(self, task, batch, directory: Path, reporter) -> None:
        self.task, self.batch, self.directory, self.reporter = task, batch, directory, reporter

    def on_epoch_end(self, trainer: Trainer, epoch: int, metrics) -> None:
        trainer.model.eval()
        with torch.no_grad():
            path = self.task.render_prediction(trainer.model, self.batch, trainer.device,
                                               self.directory / f"predictions_epoch_{epoch:03d}.png")
        trainer.model.train()
        self.reporter.add_artifact(path)


class PipelineRun:
    def __init__(self, run, training: TrainingIngredient, optimizer: OptimizerIngredient,
                 checkpoint: CheckpointIngredient) -> None:
        self.run = run
        self.config = run.config
        self.training = training
        self.optimizer = optimizer
        self.reporter = SacredReporter(run)
        self.device, self.precision = training.device_and_precision()
        self.checkpoints = checkpoint.make_manager()
        self.output_dir = self.checkpoints.directory
        link_checkpoint_directory(run, self.output_dir)
        self.reporter.set_info("device", device_info(self.device))
        self.reporter.set_info("precision", self.precision.name)
        self.reporter.set_info("output_dir", str(self.output_dir))

    def record_dataset(self, dataset_path: str, statistics: dict[str, Any]) -> None:
        self.reporter.set_info("dataset", {"path": str(dataset_path), **statistics})

    def record_model(self, model: nn.Module) -> None:
        count = sum(p.numel() for p in model.parameters())
        self.reporter.set_info("model", {"class": type(model).__name__, "parameters": count,
                                         "trainable_parameters": sum(
                                             p.numel() for p in model.parameters() if p.requires_grad)})

    def fit(self, model: nn.Module, task, train_set, val_set, *,
            callbacks: Sequence[Callback] = (),
            curve_metrics: Sequence[str] = ()) -> dict[str, Any]:
        """Train with every ingredient's settings; return the run's result summary.
        ``training_curves.png`` shows ``curve_metrics`` beside the monitored metric."""
        training, logging_ = self.config["training"], self.config["logging"]
        train_loader = self.training.make_loader(train_set, train=True)
        val_loader = self.training.make_loader(val_set, train=False)
        if len(train_loader) == 0:
            raise DataError("the training split has no cases")
        optimizer = self.optimizer.make_optimizer(model.parameters(),
                                                  learning_rate=training["learning_rate"])
        steps = math.ceil(len(train_loader) / training["gradient_accumulation_steps"])
        schedule = self.optimizer.make_schedule(
            optimizer, num_epochs=training["num_epochs"], steps_per_epoch=steps,
            warmup_epochs=training["warmup_epochs"], monitor_mode=training["monitor_mode"])
        callbacks = list(callbacks)
        if logging_["visualize_predictions"]:
            callbacks.append(PredictionSnapshots(task, next(iter(val_loader)), self.output_dir,
                                                 self.reporter))
        self.record_model(model)
        trainer = Trainer(
            model, task, optimizer, schedule, train_loader, val_loader, device=self.device,
            precision=self.precision,
            settings=self.training.settings(log_frequency=logging_["log_frequency"],
                                            progress_bar=logging_["progress_bar"]),
            reporter=self.reporter, checkpoints=self.checkpoints, callbacks=callbacks,
            config=self.config)
        resume = self.config["checkpoint"]["resume"]
        if resume:
            trainer.resume(resume)
            resumed = {"path": str(resume), "epoch": trainer.epoch, "run": read_run_link(resume)}
            if trainer.learning_rate_change is not None:
                before, after = trainer.learning_rate_change
                resumed["learning_rate"] = {"checkpoint": before[0], "now": after[0]}
            self.reporter.set_info("resumed_from", resumed)
        try:
            result = trainer.fit()
        except BaseException:
            # The curves so far are still worth having, but a full disk (or a second
            # Ctrl-C) while drawing them must not hide why training stopped.
            with contextlib.suppress(Exception):
                self._record_curves(trainer, curve_metrics)
            raise
        self._record_curves(trainer, curve_metrics)
        self._record_checkpoints()
        return {"best_epoch": result.best_epoch, "best_metric": result.best_metric,
                "monitor": training["monitor"], "epochs_run": result.epochs_run,
                "stopped_early": result.stopped_early}

    def _record_curves(self, trainer: Trainer, metrics: Sequence[str]) -> None:
        if trainer.history:
            target = self.output_dir / "training_curves.png"
            with reporting_full_disk(target):
                path = plot_training_curves(trainer.history, target,
                                            monitor=trainer.settings.monitor, metrics=metrics)
            self.reporter.add_artifact(path)

    def _record_checkpoints(self) -> None:
        limit = self.config["tracking"]["max_artifact_mb"] * _MB
        too_large = {}
        for path in (self.checkpoints.best_path, self.checkpoints.last_path):
            if not path.is_file():
                continue
            if path.stat().st_size <= limit:
                self.reporter.add_artifact(path)
            else:
                too_large[path.stem] = str(path.resolve())
        self.reporter.set_info("checkpoint_dir", str(self.checkpoints.directory.resolve()))
        if too_large:
            self.reporter.set_info("checkpoint_paths", too_large)

    def load_weights(self, model: nn.Module, path: str | None, key: str) -> None:
        """Load a checkpoint's model weights for evaluation or prediction."""
        if path is None:
            raise ConfigError(f"{key} is not set; give the checkpoint to use, "
                              f"e.g. with {key}=checkpoints/.../best_model.pth")
        try:
            model.load_state_dict(model_weights(path, map_location=self.device))
        except RuntimeError as error:
            raise DataError(f"{key}: checkpoint {path} does not fit this model "
                            f"({str(error).splitlines()[0]})") from None
        model.to(self.device)
        self.reporter.set_info("evaluated_checkpoint", str(path))

    def evaluate(self, evaluate_fn: Callable[..., EvaluationReport], model: nn.Module, task,
                 loader, split: str) -> dict[str, float]:
        """Run a pipeline's evaluation; log its metrics as ``<split>_<name>``, attach its files."""
        model.to(self.device).eval()
        directory = self.output_dir / f"evaluation_{split}"
        with torch.no_grad(), reporting_full_disk(directory):
            report = evaluate_fn(model, loader, task=task, device=self.device,
                                 precision=self.precision, output_dir=directory, split=split)
        metrics = {f"{split}_{name}": float(value) for name, value in report.metrics.items()}
        for name, value in metrics.items():
            if math.isfinite(value):
                self.reporter.log_scalar(name, value, 0)
        # Not "metrics.json": the file observer keeps its own file of that name.
        summary_path = directory / f"{split}_metrics.json"
        with reporting_full_disk(summary_path):
            summary_path.write_text(json.dumps(metrics, indent=2, allow_nan=True))
        for path in [summary_path, *report.artifacts]:
            self.reporter.add_artifact(path)
        self.reporter.set_info(f"evaluation_{split}", report.info)
        return {f"{split}_{name}": metrics[f"{split}_{name}"] for name in report.headline}
