"""One run of a pipeline: the Sacred adapter around :func:`medseg.engine.fit.fit`.

Every experiment's main function is: build the model, the task and the datasets, then
``PipelineRun.fit`` and ``PipelineRun.evaluate``. The training wiring is the library's
``fit()`` (a notebook calls it the same way); what is left here is Sacred's: the run's config
turned into ``fit()``'s settings, the reporter that logs to the run, the checkpoint folder
linked to the run id, and what is recorded in ``info`` (device, parameter count, dataset
statistics, checkpoint paths, evaluation figures).
"""

from __future__ import annotations

import logging
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ingredients.checkpoint import CheckpointIngredient
from ingredients.checks import check_monitor
from ingredients.optimizer import OptimizerIngredient, optimizer_settings
from ingredients.tracking import SacredReporter, link_checkpoint_directory, read_run_link
from ingredients.training import TrainingIngredient, loader_settings, trainer_settings
from medseg.engine import distributed
from medseg.engine.checkpoint import model_weights
from medseg.engine.evaluation import EvaluationReport, record_evaluation
from medseg.engine.fit import fit
from medseg.engine.memory import device_info
from medseg.engine.trainer import Callback, Trainer, monitor_choices
from medseg.errors import ConfigError, DataError

_MB = 1024 * 1024


class PredictionSnapshots(Callback):
    """``logging.visualize_predictions``: after each validation, draw the first validation
    case with the task's ``render_prediction`` and attach the PNG to the run."""

    def __init__(self, task, directory: Path, reporter) -> None:
        self.task, self.directory, self.reporter = task, directory, reporter
        self.batch = None

    def on_epoch_end(self, trainer: Trainer, epoch: int, metrics) -> None:
        if self.batch is None:
            self.batch = next(iter(trainer.val_loader))
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
        # torchrun: join the job (this rank's device); its output folder is rank 0's.
        engine = run.config["training"]
        self.device = distributed.setup(self.device, engine["distributed_backend"],
                                        engine["distributed_timeout"])
        self.checkpoints = checkpoint.make_manager()
        self.checkpoints.directory = Path(distributed.from_main(str(self.checkpoints.directory)))
        self.output_dir = self.checkpoints.directory
        self.main = distributed.is_main()  # the only rank that writes files
        hint = distributed.torchrun_hint(self.device, sys.argv)
        if hint is not None:
            logging.getLogger("medseg").warning(hint)
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
        """:func:`medseg.engine.fit.fit` with every ingredient's settings; return the run's
        result summary. ``training_curves.png`` shows ``curve_metrics`` beside the monitored
        metric."""
        config = self.config
        check_monitor(config, monitor_choices(task))
        callbacks = list(callbacks)
        if config["logging"]["visualize_predictions"] and self.main:
            callbacks.append(PredictionSnapshots(task, self.output_dir, self.reporter))
        self.record_model(model)
        resume = config["checkpoint"]["resume"]
        if len(train_set) == 0:
            raise DataError("the training split has no cases")
        result = fit(model, task, train_set, val_set, trainer_settings(config), self.reporter,
                     optimizer=optimizer_settings(config),
                     loaders=loader_settings(config, self._data_seed(train_set)),
                     device=self.device, precision=self.precision,
                     checkpoints=self.checkpoints, callbacks=callbacks, resume=resume,
                     curves_path=self.output_dir / "training_curves.png" if self.main else None,
                     curve_metrics=curve_metrics, config=config)
        if result.resumed_from is not None:
            self.reporter.set_info("resumed_from", {**result.resumed_from,
                                                    "run": read_run_link(resume)})
        if self.main:
            self._record_checkpoints()
        return {"best_epoch": result.best_epoch, "best_metric": result.best_metric,
                "monitor": config["training"]["monitor"], "epochs_run": result.epochs_run,
                "stopped_early": result.stopped_early}

    def _data_seed(self, train_set) -> int:
        """The seed of the training batches: the one Sacred draws (from the run's seed) for
        the training ingredient's loaders, as the evaluation commands' loaders get theirs."""
        return self.training.make_loader(train_set, train=True).seed

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
        """Run a pipeline's evaluation into ``<output_dir>/evaluation_<split>`` and record it
        (:func:`medseg.engine.evaluation.record_evaluation`). Under torchrun rank 0 evaluates
        alone (the others return no metrics)."""
        if not self.main:
            return {}
        return record_evaluation(evaluate_fn, model, task, loader, split=split,
                                 directory=self.output_dir / f"evaluation_{split}",
                                 device=self.device, precision=self.precision,
                                 reporter=self.reporter)
