"""Cross-validation bookkeeping: folds run in order, finished folds are reused, summaries."""

from __future__ import annotations

import json
import math

import pytest

from medseg.engine.reporting import RecordingReporter
from medseg.errors import MedsegError
from medseg.tasks.aneurysm_cv import (
    fold_run_config,
    read_fold,
    record_cross_validation,
    run_folds,
    summarise_folds,
    train_fold_in_subprocess,
)


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


def test_a_fold_run_config_sets_the_fold_and_resumes_an_interrupted_attempt(tmp_path):
    config = {"val_fold": 0, "cv_id": None, "viz_samples": 3, "model": {"filters": (4, 8)},
              "checkpoint": {"save_dir": "checkpoints/{experiment}/{run_id}", "resume": None}}
    fresh = fold_run_config(config, cv_id="x", fold=2, directory=tmp_path, last_name="last.pth")
    assert (fresh["val_fold"], fresh["cv_id"], fresh["viz_samples"]) == (2, "x", 0)
    assert fresh["checkpoint"] == {"save_dir": str(tmp_path), "resume": None}
    assert fresh["model"] == {"filters": [4, 8]} and config["checkpoint"]["resume"] is None
    (tmp_path / "last.pth").write_bytes(b"")
    resumed = fold_run_config(config, cv_id="x", fold=2, directory=tmp_path, last_name="last.pth")
    assert resumed["checkpoint"]["resume"] == str(tmp_path / "last.pth")


def test_a_fold_runs_the_script_with_its_config_file_and_a_failure_is_named(tmp_path):
    script = tmp_path / "experiment.py"
    script.write_text("import json, pathlib, sys\n"
                      "config = pathlib.Path(sys.argv[2])\n"
                      "(config.parent / 'argv.json').write_text(json.dumps(sys.argv))\n"
                      "sys.exit(3 if 'fold_4' in str(config) else 0)\n")
    config = {"checkpoint": {"save_dir": "x", "resume": None}}
    train_fold_in_subprocess(script, config, "cv1", 1, tmp_path / "fold_1", last_name="last.pth")
    argv = json.loads((tmp_path / "fold_1" / "argv.json").read_text())
    assert argv[1:] == ["with", str(tmp_path / "fold_1" / "fold_config.json"), "-c",
                        "cross-validation cv1, fold 1"]
    assert json.loads((tmp_path / "fold_1" / "fold_config.json").read_text())["val_fold"] == 1
    with pytest.raises(MedsegError, match=r"fold 4 of cross-validation cv1 failed \(exit status 3"):
        train_fold_in_subprocess(script, config, "cv1", 4, tmp_path / "fold_4",
                                 last_name="last.pth")


def test_the_cross_validation_record_is_logged_and_written(tmp_path):
    for fold, (dice, auc) in enumerate([(0.8, 1.0), (0.4, 0.0)]):
        finish_fold(tmp_path / f"fold_{fold}", dice, auc, [(0.9, 1, dice)])
    outcomes = [read_fold(tmp_path, fold, "best_model.pth") for fold in range(2)]
    reporter = RecordingReporter()
    result = record_cross_validation(tmp_path, "cv1", outcomes, reporter,
                                     {"ensemble_test_auc": 0.7})
    assert result["cv_id"] == "cv1" and result["ensemble_test_auc"] == 0.7
    assert reporter.values("cv_dice_mean") == [pytest.approx(0.6)]
    assert reporter.info["folds"]["fold_1"] == {
        "checkpoint": str(tmp_path / "fold_1" / "best_model.pth"), "dice": 0.4, "auc": 0.0}
    written = json.loads((tmp_path / "cross_validation.json").read_text())
    assert written["cv_dice_mean"] == pytest.approx(0.6)
    assert [name for _, name in reporter.artifacts] == ["cross_validation.json"]
