"""Cross-validation bookkeeping: folds run in order, finished folds are reused, summaries."""

from __future__ import annotations

import json
import math

import pytest

from medseg.errors import MedsegError
from medseg.tasks.aneurysm_cv import read_fold, run_folds, summarise_folds


def finish_fold(directory, dice, auc, cubes=()):
    """What a training run leaves in a fold folder."""
    evaluation = directory / "evaluation_fold"
    evaluation.mkdir(parents=True, exist_ok=True)
    (directory / "best_model.pth").write_bytes(b"weights")
    (evaluation / "fold_metrics.json").write_text(json.dumps({"fold_dice": dice, "fold_auc": auc}))
    (evaluation / "per_cube_metrics.json").write_text(json.dumps({"cubes": [
        {"score": s, "predicted": s > 0.5, "label": y, "dice": d} for s, y, d in cubes]}))


def test_folds_run_in_order_and_finished_ones_are_reused(tmp_path):
    finish_fold(tmp_path / "fold_1", 0.5, 0.9)
    trained = []

    def train(fold, directory):
        trained.append(fold)
        finish_fold(directory, 0.1 * fold, 0.8)

    outcomes = run_folds(tmp_path, range(5), train, best_name="best_model.pth")
    assert trained == [0, 2, 3, 4]
    assert [o.fold for o in outcomes] == [0, 1, 2, 3, 4]
    assert outcomes[1].metrics == {"dice": 0.5, "auc": 0.9}
    assert outcomes[3].checkpoint == tmp_path / "fold_3" / "best_model.pth"


def test_a_fold_that_leaves_no_result_stops_the_cross_validation(tmp_path):
    with pytest.raises(MedsegError, match=r"fold 0 finished without writing best_model\.pth"):
        run_folds(tmp_path, range(5), lambda fold, directory: None, best_name="best_model.pth")
    assert read_fold(tmp_path, 0, "best_model.pth") is None


def test_summary_gives_mean_spread_and_pooled_out_of_fold_metrics(tmp_path):
    cubes = [[(0.9, 1, 0.8), (0.2, 0, None)], [(0.6, 1, 0.4), (0.7, 0, None)]]
    for fold, (dice, auc) in enumerate([(0.8, 1.0), (0.4, 0.0)]):
        finish_fold(tmp_path / f"fold_{fold}", dice, auc, cubes[fold])
    outcomes = [read_fold(tmp_path, fold, "best_model.pth") for fold in range(2)]
    summary = summarise_folds(outcomes, names=("dice", "auc"))
    assert summary["cv_dice_mean"] == pytest.approx(0.6)
    assert summary["cv_dice_std"] == pytest.approx(0.2828427, abs=1e-6)  # sample standard deviation
    assert summary["cv_auc_mean"] == pytest.approx(0.5)
    # Pooled: positives 0.9, 0.6 against negatives 0.2, 0.7 -> 3 of 4 pairs ordered.
    assert summary["cv_pooled_auc"] == pytest.approx(0.75)
    assert summary["cv_pooled_dice"] == pytest.approx(0.6)
    assert summary["cv_pooled_accuracy"] == pytest.approx(0.75)
    single = summarise_folds(outcomes[:1], names=("dice",))
    assert math.isnan(single["cv_dice_std"])
