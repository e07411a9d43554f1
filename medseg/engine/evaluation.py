"""What an evaluation hands back (metrics, files written, small facts for the run's info), the
loss meter and batch loop every validation pass shares, and the recording of an evaluation's
results through a :class:`~medseg.engine.reporting.Reporter`."""

from __future__ import annotations

import json
import math
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from medseg.engine.precision import Precision
from medseg.engine.reporting import Reporter
from medseg.files import reporting_full_disk


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


class ShardedValidation:
    """``validate`` for a task that scores validation as ``validation_state`` (one rank's
    share of the cases) joined by ``summarise_validation``: one process is one share."""

    def validate(self, model: nn.Module, loader: Iterable, device: torch.device,
                 precision: Precision) -> dict[str, float]:
        return self.summarise_validation([self.validation_state(model, loader, device,
                                                                precision)])


def mean_case_score(states: Sequence[tuple[LossMeter, list[float]]], name: str = "dice"
                    ) -> dict[str, float]:
    """The validation metrics of tasks scored per case: ``states`` are each rank's (its
    ``LossMeter``, its cases' scores), one state for one process. The loss sums are added
    before the means are taken, and ``name`` is the mean over the cases where the score is
    defined (not NaN)."""
    losses, scores = LossMeter(), []
    for rank_losses, rank_scores in states:
        losses.extend(rank_losses)
        scores += rank_scores
    defined = [score for score in scores if not math.isnan(score)]
    return {**losses.summary(), name: sum(defined) / len(defined) if defined else math.nan}


def validation_pass(model: nn.Module, loader: Iterable, *, device: torch.device,
                    precision: Precision,
                    loss: Callable[[Any, dict], tuple[torch.Tensor, Mapping[str, torch.Tensor]]],
                    on_batch: Callable[..., None], keys: Sequence[str] = ("image", "mask"),
                    forward: Callable[..., Any] | None = None,
                    inputs: Sequence[str] = ("image",)) -> LossMeter:
    """One pass over ``loader`` as every task's validation makes it; the loss and its terms
    summed (a :class:`LossMeter`: its ``summary()`` gives the means, and the meters of the
    ranks of a torchrun job add up with ``extend``).

    Each batch has ``keys`` moved to ``device``; ``forward`` of the batch's ``inputs``
    (``forward(image)``; by default the model under ``precision``'s autocast) gives the
    output; ``loss(output, batch)`` gives the
    total and its terms, computed outside autocast; ``on_batch(batch, output, total, terms)``
    lets the task score the batch.
    """
    if forward is None:
        def forward(*tensors: torch.Tensor) -> Any:
            with precision.autocast():
                return model(*tensors)

    losses = LossMeter()
    for batch in loader:
        batch = {**batch, **{key: batch[key].to(device, non_blocking=True) for key in keys}}
        output = forward(*(batch[key] for key in inputs))
        total, terms = loss(output, batch)
        losses.add(total, terms)
        on_batch(batch, output, total, terms)
    return losses


def record_evaluation(evaluate_fn: Callable[..., EvaluationReport], model: nn.Module, task,
                      loader: Iterable, *, split: str, directory: str | Path,
                      device: torch.device, precision: Precision,
                      reporter: Reporter) -> dict[str, float]:
    """Run a pipeline's evaluation into ``directory``; log its metrics as
    ``<split>_<name>`` (step 0, finite values), write them to ``<split>_metrics.json``, attach
    that file and the evaluation's own, store its info as ``evaluation_<split>``; return the
    headline metrics."""
    directory = Path(directory)
    model.to(device).eval()
    with torch.no_grad(), reporting_full_disk(directory):
        report = evaluate_fn(model, loader, task=task, device=device, precision=precision,
                             output_dir=directory, split=split)
    metrics = {f"{split}_{name}": float(value) for name, value in report.metrics.items()}
    for name, value in metrics.items():
        if math.isfinite(value):
            reporter.log_scalar(name, value, 0)
    # Not "metrics.json": Sacred's file observer keeps its own file of that name.
    summary_path = directory / f"{split}_metrics.json"
    with reporting_full_disk(summary_path):
        summary_path.write_text(json.dumps(metrics, indent=2, allow_nan=True))
    for path in [summary_path, *report.artifacts]:
        reporter.add_artifact(path)
    reporter.set_info(f"evaluation_{split}", report.info)
    return {f"{split}_{name}": metrics[f"{split}_{name}"] for name in report.headline}
