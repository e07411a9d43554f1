"""The SADAAN experiment as a user runs it: training, outputs, commands and bad input."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys

import h5py
import pytest

from medseg.errors import ConfigError, DataError

from support import ROOT, file_runs, load_experiment, merge

sadaan = load_experiment("sadaan")


def run(updates: dict, command: str = "main", named=()):
    return sadaan.ex.run(command, config_updates=updates, named_configs=named,
                         options={"--capture": "sys"})


def metrics_of(run_dir) -> dict[str, list[float]]:
    return {k: v["values"] for k, v in json.loads((run_dir / "metrics.json").read_text()).items()}


def test_training_lowers_the_loss_and_raises_dice(sadaan_quick, tmp_path):
    updates = merge(sadaan_quick, {"training": {"num_epochs": 25, "learning_rate": 3e-3},
                                   "model": {"base_channels": 8},
                                   "optimizer": {"lr_scheduler": "none"}})
    result = run(updates).result
    metrics = metrics_of(tmp_path / "runs" / "1")
    losses, dice = metrics["train_loss_epoch"], metrics["val_dice"]
    assert sum(losses[-3:]) < 0.75 * sum(losses[:3])
    assert dice[0] < 0.05 and max(dice) > 0.3
    assert result["best_metric"] == pytest.approx(max(dice))
    assert result["test_dice"] > 0.2


def test_a_run_records_metrics_info_artifacts_and_checkpoints(sadaan_quick, tmp_path):
    updates = merge(sadaan_quick, {"training": {"num_epochs": 2},
                                   "logging": {"visualize_predictions": True, "progress_bar": True},
                                   "checkpoint": {"save_frequency": 1}})
    result = run(updates).result
    (record,) = file_runs(tmp_path / "runs")
    assert record["status"] == "COMPLETED"
    run_dir = tmp_path / "runs" / "1"
    metrics = metrics_of(run_dir)
    for name in ("train_loss", "train_loss_dice", "train_loss_confidence", "val_loss",
                 "val_loss_dice", "val_loss_confidence", "val_dice",
                 "val_presence_accuracy", "val_dice_spleen", "val_dice_present",
                 "val_presence_balanced_accuracy", "val_presence_balanced_accuracy_spleen",
                 "val_dice_present_spleen", "test_presence_balanced_accuracy", "lr", "epoch_time_s",
                 "samples_per_s", "rss_mb", "rss_peak_mb", "test_dice"):
        assert name in metrics, name
    info = json.loads((run_dir / "info.json").read_text())
    assert info["model"]["parameters"] > 0 and info["device"]["type"] == "cpu"
    assert info["dataset"]["splits"] == {"train": 8, "val": 3, "test": 3}
    assert info["best_epoch"] == result["best_epoch"] and info["monitor"] == "val_dice"
    assert set(record["artifacts"]) >= {
        "training_curves.png", "best_model.pth", "last_model.pth", "predictions_epoch_001.png",
        "predictions_epoch_002.png", "per_case_metrics.json", "dice_per_structure.png",
        "test_metrics.json"}
    checkpoints = tmp_path / "checkpoints" / "1"
    assert {"best_model.pth", "last_model.pth", "checkpoint_epoch_1.pth",
            "checkpoint_epoch_2.pth"} <= {p.name for p in checkpoints.iterdir()}
    per_case = json.loads((checkpoints / "evaluation_test" / "per_case_metrics.json").read_text())
    assert len(per_case["cases"]) == 3 and set(per_case["confusion"]) == {
        "spleen", "right_kidney", "left_kidney"}
    captured = (run_dir / "cout.txt").read_text()
    bars = [line for line in captured.splitlines() if line.startswith("epoch 2/2:")]
    assert "\r" not in captured and len(bars) == 1 and "100%" in bars[0]


def test_evaluate_scores_a_checkpoint_on_a_split(sadaan_quick, tmp_path):
    run(sadaan_quick)
    best = tmp_path / "checkpoints" / "1" / "best_model.pth"
    result = run(merge(sadaan_quick, {"eval_checkpoint": str(best), "eval_split": "val"}),
                 command="evaluate").result
    assert set(result) == {"val_loss", "val_dice", "val_iou", "val_presence_accuracy",
                           "val_dice_present", "val_presence_balanced_accuracy"}
    (evaluation,) = [r for r in file_runs(tmp_path / "runs") if r["command"] == "evaluate"]
    assert evaluation["status"] == "COMPLETED" and "val_metrics.json" in evaluation["artifacts"]


def test_resume_continues_from_the_checkpoint(sadaan_quick, tmp_path):
    run(merge(sadaan_quick, {"training": {"num_epochs": 2}}))
    last = tmp_path / "checkpoints" / "1" / "last_model.pth"
    run(merge(sadaan_quick, {"training": {"num_epochs": 3}, "checkpoint": {"resume": str(last)}}))
    # The file observer continues the resumed run: one run id, one series of epochs.
    assert not (tmp_path / "runs" / "2").exists()
    resumed = tmp_path / "runs" / "1"
    info = json.loads((resumed / "info.json").read_text())
    assert info["resumed_from"]["epoch"] == 2
    assert json.loads((resumed / "metrics.json").read_text())["val_dice"]["steps"] == [1, 2, 3]


def test_generate_data_writes_the_documented_layout(tmp_path):
    target = tmp_path / "generated"
    run({"dataset_path": str(target), "tracking": {"observer": "none"},
         "synthetic": {"num_train": 3, "num_val": 2, "num_test": 1, "image_size": [32, 32, 16],
                       "num_structures": 2}}, command="generate_data")
    assert sorted(p.name for p in target.iterdir()) == ["metadata.json", "test.h5", "train.h5",
                                                         "val.h5"]
    with h5py.File(target / "train.h5") as f:
        assert f["images"].shape == (3, 32, 32, 16) and f["masks"].shape == (3, 2, 32, 32, 16)
        assert f["presence_labels"].shape == (3, 2) and f["scenarios"].shape == (3,)


def broken_copy(source, tmp_path, damage):
    target = tmp_path / "broken"
    shutil.copytree(source, target)
    damage(target)
    return target


def drop_scenarios(path):
    with h5py.File(path / "train.h5", "a") as f:
        del f["scenarios"]


def shrink_masks(path):
    with h5py.File(path / "val.h5", "a") as f:
        masks = f["masks"][:, :, :16]
        del f["masks"]
        f["masks"] = masks


def rename_structures(path):
    metadata = json.loads((path / "metadata.json").read_text())
    metadata["structure_names"] = metadata["structure_names"][:2]
    metadata["num_structures"] = 2
    (path / "metadata.json").write_text(json.dumps(metadata))


@pytest.mark.parametrize("damage, error, message", [
    (lambda p: shutil.rmtree(p), DataError, r"dataset folder .*broken does not exist"),
    (lambda p: (p / "metadata.json").unlink(), DataError, r"metadata.json does not exist"),
    (drop_scenarios, DataError, r"train.h5.*scenarios"),
    (shrink_masks, DataError, r"val.h5.*masks"),
    (rename_structures, DataError, r"train.h5.*masks.*2"),
])
def test_bad_datasets_stop_before_a_run_is_recorded(sadaan_data, sadaan_quick, tmp_path, damage,
                                                    error, message):
    broken = broken_copy(sadaan_data, tmp_path, damage)
    with pytest.raises(error, match=message):
        run(merge(sadaan_quick, {"dataset_path": str(broken)}))
    assert not (tmp_path / "runs").exists() or file_runs(tmp_path / "runs") == []


@pytest.mark.parametrize("updates, message", [
    ({"training": {"batch_size": "eight"}}, r"training.batch_size must be an integer >= 1, got 'eight'"),
    ({"training": {"batch_size": 0}}, r"training.batch_size must be an integer >= 1, got 0"),
    ({"training": {"learning_rate": -1e-3}}, r"training.learning_rate must be a number > 0"),
    ({"optimizer": {"lr_scheduler": "cosine"}}, r"optimizer.lr_scheduler must be one of"),
    ({"checkpoint": {"resume": "/no/such/checkpoint.pth"}}, r"checkpoint.resume: no checkpoint file"),
    ({"training": {"batch_sizee": 2}}, r"unknown config entry training.batch_sizee \(did you mean "
                                        r"training.batch_size\?\)"),
    ({"dataset_pth": "elsewhere"}, r"unknown config entry dataset_pth \(did you mean "
                                   r"dataset_path\?\)"),
    ({"lr": 3}, r"unknown config entry lr; "),
    ({"model": {"in_channels": 3}}, r"model.in_channels=3 but .*train.h5 has images with 1 channel"),
    ({"augmentation": {"intensity_scale_range": [1.1, 0.9]}}, r"intensity_scale_range.*low <= high"),
    ({"checkpoint": {"save_dir": "out/{run}"}}, r"placeholders \{experiment\} and \{run_id\}"),
    ({"training": {"monitor": "val_dcie"}}, r"training.monitor='val_dcie' is not a metric"),
])
def test_bad_config_stops_before_training(sadaan_quick, tmp_path, updates, message):
    with pytest.raises(ConfigError, match=message):
        run(merge(sadaan_quick, updates))
    records = file_runs(tmp_path / "runs") if (tmp_path / "runs").exists() else []
    assert all(r["status"] == "FAILED" for r in records)  # never RUNNING or COMPLETED
    assert not any((tmp_path / "checkpoints").glob("*/last_model.pth"))


def test_command_line_bad_input_is_one_line_and_exit_2(sadaan_data, tmp_path):
    completed = subprocess.run(
        [sys.executable, str(ROOT / "experiments" / "sadaan.py"), "with",
         f"dataset_path={sadaan_data}", "training.batch_size=0", "tracking.observer=file",
         f"tracking.file_dir={tmp_path / 'runs'}"],
        capture_output=True, text=True, cwd=tmp_path, timeout=120)
    assert completed.returncode == 2
    assert completed.stderr.strip().splitlines()[-1] == (
        "error: training.batch_size must be an integer >= 1, got 0 (int)")
    assert "Traceback" not in completed.stderr
    assert not (tmp_path / "runs").exists()


def test_command_line_accepts_a_partial_loss_weights_dict(sadaan_data, tmp_path):
    """The seed's `with loss_weights='{...}'` form updates the named weights only."""
    completed = subprocess.run(
        [sys.executable, str(ROOT / "experiments" / "sadaan.py"), "print_config", "with",
         'loss_weights={"dice": 4.0, "focal_seg": 0.5}'],
        capture_output=True, text=True, cwd=tmp_path, timeout=120)
    assert completed.returncode == 0, completed.stderr
    config = completed.stdout
    assert "dice = 4.0" in config and "focal_seg = 0.5" in config
    assert "segmentation = 1.0" in config and "confidence = 0.1" in config


@pytest.mark.parametrize("name, expected", [
    ("debug", {"training.num_epochs": 5, "training.batch_size": 2, "logging.log_frequency": 1,
               "checkpoint.save_frequency": 1}),
    ("memory_constrained", {"training.batch_size": 2, "training.gradient_accumulation_steps": 8,
                            "training.memory_cleanup_frequency": 2}),
    ("research", {"training.num_epochs": 500, "loss_weights.attention_supervision": 1.5,
                  "optimizer.lr_scheduler": "cosine_annealing",
                  "logging.visualize_predictions": True}),
    ("high_memory", {"training.batch_size": 16, "training.image_size": [256, 256, 128]}),
    ("for_speed", {"training.num_workers": 8, "augmentation.enabled": False}),
    ("for_accuracy", {"loss_weights.dice": 3.0, "training.gradient_clip_norm": 1.0,
                      "optimizer.weight_decay": 1e-5, "augmentation.noise_std": 1.0}),
    ("high_absence", {"synthetic.absent_probability": 0.7}),
])
def test_named_configs_apply_the_seed_recipes(name, expected):
    config = run({"tracking": {"observer": "none"}}, command="print_config", named=[name]).config
    for key, value in expected.items():
        section, entry = key.split(".")
        assert config[section][entry] == value, key
