"""Five-fold cross-validation of the aneurysm-cubes pipeline.

A cross-validation lives in one folder, ``<root>/fold_<k>/`` per fold, each holding what a
training run writes there: its checkpoints and ``evaluation_fold/`` (the validation fold
scored with the restored best weights: ``fold_metrics.json`` and ``per_cube_metrics.json``).
A fold whose folder already has both the best checkpoint and ``fold_metrics.json`` is done,
so an interrupted cross-validation continues with the folds left.

How a fold is trained is the caller's (``run_folds(..., train_fold)``); the experiment passes
:func:`train_fold_in_subprocess`, one tracked run per fold in a fresh process. The folds are
run in order, read back and summarised (:func:`record_cross_validation`):

- mean and spread (sample standard deviation) over folds of each ``fold_*`` metric;
- pooled out-of-fold metrics: every cube scored by the one model that did not train on it,
  all folds together (one AUC over all cubes, rather than a mean of five small-sample AUCs);
- with test cubes, the mean of the five fold models scored on them (:func:`score_ensemble`).
"""

from __future__ import annotations

import json
import logging
import math
import os
import subprocess
import sys
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from medseg.engine.checkpoint import plain
from medseg.engine.evaluation import record_evaluation
from medseg.engine.precision import Precision
from medseg.engine.reporting import Reporter
from medseg.errors import MedsegError
from medseg.metrics.classification import BinaryClassificationScores
from medseg.models.ensemble import ProbabilityEnsemble
from medseg.tasks.aneurysm import AneurysmTask, evaluate_cubes, load_models

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


def fold_run_config(config: Mapping[str, Any], *, cv_id: str, fold: int, directory: Path,
                    last_name: str) -> dict[str, Any]:
    """The config of one fold's run: the cross-validation's (an aneurysm_cubes config) with
    ``val_fold``, ``cv_id`` and the checkpoint folder set, no sample panels, and a resume from
    the fold's last checkpoint when an interrupted attempt left one."""
    last = Path(directory) / last_name
    updates = plain(config)
    updates.update(val_fold=fold, cv_id=cv_id, viz_samples=0)
    updates["checkpoint"].update(save_dir=str(directory),
                                 resume=str(last) if last.is_file() else None)
    return updates


def train_fold_in_subprocess(script: str | Path, config: Mapping[str, Any], cv_id: str,
                             fold: int, directory: Path, *, last_name: str) -> None:
    """One fold as its own tracked run of the experiment ``script``, in a fresh process (as
    the seed's shell loop runs them), given its :func:`fold_run_config` as
    ``<directory>/fold_config.json``."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    updates = fold_run_config(config, cv_id=cv_id, fold=fold, directory=directory,
                              last_name=last_name)
    config_file = directory / "fold_config.json"
    config_file.write_text(json.dumps(updates, indent=1))
    command = [sys.executable, os.path.abspath(script), "with", str(config_file),
               "-c", f"cross-validation {cv_id}, fold {fold}"]
    print(f"== fold {fold}: {' '.join(command)}", flush=True)
    returncode = subprocess.run(command).returncode
    if returncode != 0:
        raise MedsegError(f"fold {fold} of cross-validation {cv_id} failed (exit status "
                          f"{returncode}, output above); run `cross_validate with cv_id={cv_id}` "
                          "to continue with the unfinished folds")


def score_ensemble(outcomes: Sequence[FoldOutcome], loader: Iterable, *,
                   build: Callable[[dict], nn.Module], task: AneurysmTask, root: Path,
                   device: torch.device, precision: Precision,
                   reporter: Reporter) -> dict[str, float]:
    """Score the mean of the fold models on ``loader`` (the test cubes) as the evaluation
    ``ensemble_test`` in ``<root>/evaluation_ensemble_test``, and add the fold models' own
    mean test AUC (``fold_models_test_auc_mean``) where the folds scored test/."""
    members = load_models([o.checkpoint for o in outcomes], build, device)
    split = "ensemble_test"
    scores = record_evaluation(evaluate_cubes, ProbabilityEnsemble(members), task, loader,
                               split=split, directory=root / f"evaluation_{split}",
                               device=device, precision=precision, reporter=reporter)
    single = [o.directory / "evaluation_test" / "test_metrics.json" for o in outcomes]
    fold_auc = [json.loads(p.read_text())["test_auc"] for p in single if p.is_file()]
    if fold_auc:
        scores["fold_models_test_auc_mean"] = float(sum(fold_auc) / len(fold_auc))
    return scores


def record_cross_validation(root: Path, cv_id: str, outcomes: Sequence[FoldOutcome],
                            reporter: Reporter,
                            test_scores: Mapping[str, float] | None = None) -> dict[str, Any]:
    """Log the fold summary (:func:`summarise_folds`, step 0), store each fold's metrics as
    the info ``folds``, and write ``<root>/cross_validation.json`` (attached): the summary
    with ``cv_id`` and ``test_scores``, which is returned."""
    summary = summarise_folds(outcomes)
    for name, value in summary.items():
        reporter.log_scalar(name, value, 0)
    reporter.set_info("folds", {f"fold_{o.fold}": {"checkpoint": str(o.checkpoint), **o.metrics}
                                for o in outcomes})
    result = {"cv_id": cv_id, **summary, **(test_scores or {})}
    path = Path(root) / "cross_validation.json"
    path.write_text(json.dumps(result, indent=2, allow_nan=True))
    reporter.add_artifact(path)
    return result
