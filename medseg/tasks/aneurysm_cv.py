"""Five-fold cross-validation of the aneurysm-cubes pipeline.

A cross-validation lives in one folder, ``<root>/fold_<k>/`` per fold, each holding what a
training run writes there: its checkpoints and ``evaluation_fold/`` (the validation fold
scored with the restored best weights: ``fold_metrics.json`` and ``per_cube_metrics.json``).
A fold whose folder already has both the best checkpoint and ``fold_metrics.json`` is done,
so an interrupted cross-validation continues with the folds left.

How a fold is trained is the caller's business (the experiment starts one tracked run per
fold); here the folds are run in order, read back and summarised:

- mean and spread (sample standard deviation) over folds of each ``fold_*`` metric;
- pooled out-of-fold metrics: every cube scored by the one model that did not train on it,
  all folds together (one AUC over all cubes, rather than a mean of five small-sample AUCs).
"""

from __future__ import annotations

import json
import logging
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from medseg.errors import MedsegError
from medseg.metrics.classification import BinaryClassificationScores

log = logging.getLogger(__name__)

EVALUATION_FOLDER = "evaluation_fold"
METRICS_FILE = "fold_metrics.json"
PER_CUBE_FILE = "per_cube_metrics.json"
SUMMARY_METRICS = ("dice", "auc", "accuracy", "pos_accuracy", "neg_accuracy")


@dataclass(frozen=True)
class FoldOutcome:
    fold: int
    directory: Path
    metrics: dict[str, float]  # without the "fold_" prefix
    checkpoint: Path


def fold_directory(root: str | Path, fold: int) -> Path:
    return Path(root) / f"fold_{fold}"


def read_fold(root: str | Path, fold: int, best_name: str) -> FoldOutcome | None:
    """The outcome of a finished fold, or ``None`` if it has not finished."""
    directory = fold_directory(root, fold)
    metrics_path = directory / EVALUATION_FOLDER / METRICS_FILE
    checkpoint = directory / best_name
    if not (metrics_path.is_file() and checkpoint.is_file()):
        return None
    stored = json.loads(metrics_path.read_text())
    metrics = {name.removeprefix("fold_"): float(value) for name, value in stored.items()}
    return FoldOutcome(fold=fold, directory=directory, metrics=metrics, checkpoint=checkpoint)


def run_folds(root: str | Path, folds: Sequence[int], train_fold: Callable[[int, Path], None],
              *, best_name: str) -> list[FoldOutcome]:
    """Train each fold not yet finished with ``train_fold(fold, directory)``, in order."""
    outcomes = []
    for fold in folds:
        outcome = read_fold(root, fold, best_name)
        if outcome is not None:
            log.info("fold %d already finished in %s; using it", fold, outcome.directory)
        else:
            train_fold(fold, fold_directory(root, fold))
            outcome = read_fold(root, fold, best_name)
            if outcome is None:
                raise MedsegError(f"fold {fold} finished without writing {best_name} and "
                                  f"{EVALUATION_FOLDER}/{METRICS_FILE} in "
                                  f"{fold_directory(root, fold)}")
        outcomes.append(outcome)
    return outcomes


def summarise_folds(outcomes: Sequence[FoldOutcome],
                    names: Sequence[str] = SUMMARY_METRICS) -> dict[str, float]:
    """``cv_<name>_mean`` and ``cv_<name>_std`` over folds, and ``cv_pooled_<name>``."""
    summary: dict[str, float] = {}
    for name in names:
        values = np.array([o.metrics.get(name, math.nan) for o in outcomes], dtype=float)
        values = values[np.isfinite(values)]
        summary[f"cv_{name}_mean"] = float(values.mean()) if values.size else math.nan
        summary[f"cv_{name}_std"] = float(values.std(ddof=1)) if values.size > 1 else math.nan
    summary.update({f"cv_pooled_{k}": v for k, v in pooled_out_of_fold(outcomes).items()})
    return summary


def pooled_out_of_fold(outcomes: Sequence[FoldOutcome]) -> dict[str, float]:
    """Dice and classification metrics over the cubes of all validation folds together."""
    classification = BinaryClassificationScores()
    dice = []
    for outcome in outcomes:
        path = outcome.directory / EVALUATION_FOLDER / PER_CUBE_FILE
        if not path.is_file():
            return {}
        for cube in json.loads(path.read_text())["cubes"]:
            classification.add(cube["score"], cube["predicted"], cube["label"])
            if cube["label"] == 1 and cube["dice"] is not None:
                dice.append(cube["dice"])
    return {"dice": float(np.mean(dice)) if dice else math.nan, **classification.summary()}
