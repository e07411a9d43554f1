"""The SMALabeller experiment end to end: generate -> train from the shell (the seed's
entries), TensorBoard event files, checkpoints and resume, BN calibration on/off, the 3D path,
the programmatic API, Ray Tune sweeps, and the bad inputs of issue 9."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from ingredients import tune as tune_module
from medseg.data.synthetic.smalabeller import BrainSettings, generate_brain_dataset
from medseg.engine.reporting import RecordingReporter
from medseg.engine.checkpoint import load_checkpoint
from medseg.errors import MedsegError
from support import load_experiment, nested

ROOT = Path(__file__).resolve().parents[2]
EXPERIMENT = ROOT / "experiments" / "smalabeller.py"

sma = load_experiment("smalabeller")
ex = sma.ex

QUICK = {
    "seed": 0, "epochs": 1, "num_workers": 0, "batch_size": 2,
    "model.channels": [4, 8, 16], "data.crop_size": [16, 16, 8], "data.crops_per_volume": 2,
    "bn_calibration.warmup_batches": 1, "config.lr": 1e-3, "config.max_lr": 1e-2,
    "config.dropout_rate": 0.0, "training.progress_bar": False,
}


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    """Six generated heads of 24 x 24 x 12..16 mm."""
    return generate_brain_dataset(tmp_path_factory.mktemp("sma") / "data", num_cases=6,
                                  settings=BrainSettings((24, 24), (12, 16), (1.0, 2.0), 0.02, 1))


def updates(data: Path, tmp: Path, dotted: dict) -> dict:
    base = {**QUICK, "training_images": str(data / "imagesTr_resampled"),
            "training_labels": str(data / "labelsTr_resampled"), "runs_dir": str(tmp / "runs"),
            "tracking.observer": "file", "tracking.file_dir": str(tmp / "sacred")}
    return nested({**base, **dotted})


def run(data: Path, tmp: Path, command: str = "main", **dotted):
    return ex.run(command, config_updates=updates(data, tmp, dotted),
                  options={"--capture": "sys"})


def run_folder(tmp: Path) -> Path:
    """The single timestamp folder of a run under runs/SMALabeller."""
    (folder,) = [p for p in (tmp / "runs" / "SMALabeller").iterdir() if "_cls-" not in p.name]
    return folder


def metrics(tmp: Path, run_id: int = 1) -> dict:
    return json.loads((tmp / "sacred" / str(run_id) / "metrics.json").read_text())


def events(folder: Path) -> EventAccumulator:
    accumulator = EventAccumulator(str(folder), size_guidance={"scalars": 0, "histograms": 0,
                                                                "images": 0, "tensors": 0})
    accumulator.Reload()
    return accumulator


# ----------------------------------------------------------------------------- end to end
@pytest.mark.slow
def test_generate_and_train_from_the_shell_with_the_seed_entries(tmp_path):
    def cli(*args):
        done = subprocess.run([sys.executable, str(EXPERIMENT), *args], capture_output=True,
                              text=True, cwd=tmp_path, env={**os.environ, "HOME": str(tmp_path)})
        assert done.returncode == 0, done.stderr[-3000:]
        return done

    cli("generate_data", "with", "data_dir=data/sma", "synthetic.num_cases=5",
        "synthetic.image_size=[24,24]", "synthetic.depth_range=[12,16]", "tracking.observer=none")
    assert len(list((tmp_path / "data/sma/imagesTr_resampled").glob("*_0000.nii.gz"))) == 5
    cli("with", "training_images=data/sma/imagesTr_resampled",
        "training_labels=data/sma/labelsTr_resampled", "unet_dimensions=2D", "batch_size=2",
        "epochs=2", "val_set_size=0.2", "tb_prefix=SMALabeller", "comment=cconelea",
        "config.loss_function=combination", "config.max_lr=5e-3", "num_workers=0",
        "model.channels=[4,8,16]", "data.crop_size=[16,16,8]", "data.crops_per_volume=2",
        "bn_calibration.warmup_batches=1", "checkpoint.period=1", "checkpoint.keep_periodic=1",
        "tracking.observer=file", "tracking.file_dir=sacred", "training.progress_bar=False")
    root = tmp_path / "runs" / "SMALabeller"  # runs_dir defaults to ~/runs
    (train_dir,) = root.glob("*-trn_cls-cconelea")
    (val_dir,) = root.glob("*-val_cls-cconelea")
    checkpoints = root / train_dir.name.split("-trn_cls-")[0] / "checkpoints"
    assert sorted(p.name for p in checkpoints.glob("*.pth")) == ["best.pth", "last.pth",
                                                                 "periodic_0002.pth"]
    state = torch.load(checkpoints / "last.pth", weights_only=True)
    assert {"epoch", "global_step", "monitor_value", "model_state", "optimizer_state",
            "scheduler_state", "scaler_state", "config"} <= set(state)
    assert state["epoch"] == 2 and state["config"]["config"]["max_lr"] == 5e-3
    train, val = events(train_dir), events(val_dir)
    scalars = set(train.Tags()["scalars"])
    assert {"Loss/batch", "LR/batch", "Time/iter_sec", "GradNorm/batch",
            "Loss/epoch_train"} <= scalars
    assert len(train.Scalars("Loss/batch")) == len(train.Scalars("GradNorm/batch")) >= 4
    assert any(t.startswith("Params/") for t in train.Tags()["histograms"])
    assert any(t.startswith("Grads/") for t in train.Tags()["histograms"])
    assert "hparams/json/text_summary" in train.Tags()["tensors"]
    assert {"Loss/epoch_val", "Dice/epoch_val", "Checkpoint/best_val_loss",
            "EarlyStopping/best_val_loss", "EarlyStopping/patience_used",
            "EarlyStopping/best_epoch"} <= set(val.Tags()["scalars"])
    assert {"val/img/0", "val/lbl/0", "val/pred/2"} <= set(val.Tags()["images"])
    recorded = metrics(tmp_path)
    for name in ("train_loss", "train_lr", "train_iter_time_s", "train_grad_norm", "val_loss",
                 "val_dice", "val_loss_dice", "val_loss_bce", "best_val_loss", "patience_used"):
        assert name in recorded, name
    assert [e.value for e in val.Scalars("Loss/epoch_val")] == pytest.approx(
        recorded["val_loss"]["values"])
    artifacts = json.loads((tmp_path / "sacred" / "1" / "run.json").read_text())["artifacts"]
    assert {"val_images_epoch_001.png", "val_images_epoch_002.png", "best.pth"} <= set(artifacts)


@pytest.mark.slow
def test_training_lowers_the_loss_and_raises_dice(data, tmp_path):
    result = run(data, tmp_path, epochs=10, batch_size=1,
                 **{"config.loss_function": "dice", "config.augmentations": False,
                    "model.channels": [8, 16, 32], "config.lr": 3e-3,
                    "config.max_lr": 3e-2}).result
    recorded = metrics(tmp_path)
    losses = recorded["train_loss_epoch"]["values"]
    dice = recorded["val_dice"]["values"]
    # Ten epochs of four 24-pixel heads on a CPU: a clear trend, far from convergence.
    assert losses[-1] < 0.95 * losses[0]
    assert max(dice) > dice[0] + 0.2
    assert result["epochs_run"] == 10


def last(tmp: Path) -> Path:
    return run_folder(tmp) / "checkpoints" / "last.pth"


@pytest.mark.slow
def test_resumed_run_matches_the_uninterrupted_one(data, tmp_path):
    common = {"epochs": 3, "checkpoint.period": 1, "checkpoint.keep_periodic": 3}
    straight = run(data, tmp_path / "straight", **common)
    run(data, tmp_path / "first", **common)
    periodic = run_folder(tmp_path / "first") / "checkpoints" / "periodic_0002.pth"
    resumed = run(data, tmp_path / "resumed", **common, **{"checkpoint.resume": str(periodic)})
    expected = load_checkpoint(last(tmp_path / "straight"))
    got = load_checkpoint(periodic.parent / "last.pth")
    assert got["epoch"] == 3 and got["global_step"] == expected["global_step"]
    for name, value in expected["model"].items():
        assert torch.allclose(value.float(), got["model"][name].float(), atol=1e-5), name
    assert resumed.result["best_val_loss"] == pytest.approx(straight.result["best_val_loss"])


def bn_state(tmp: Path) -> dict:
    return load_checkpoint(last(tmp))["model"]


@pytest.mark.slow
def test_bn_calibration_sets_the_statistics_validation_and_checkpoints_use(data, tmp_path):
    on = run(data, tmp_path / "on", epochs=2)
    off = run(data, tmp_path / "off", epochs=2, **{"bn_calibration.enabled": False})
    key = "encoders.0.1.running_mean"
    assert not torch.allclose(bn_state(tmp_path / "on")[key], bn_state(tmp_path / "off")[key])
    # Same weights up to the first validation: only the statistics differ.
    assert metrics(tmp_path / "on")["train_loss"]["values"][:2] == pytest.approx(
        metrics(tmp_path / "off")["train_loss"]["values"][:2])
    assert metrics(tmp_path / "on")["val_loss"]["values"][0] != pytest.approx(
        metrics(tmp_path / "off")["val_loss"]["values"][0])
    assert on.status == off.status == "COMPLETED"


@pytest.mark.slow
def test_the_3d_path_trains(data, tmp_path):
    result = run(data, tmp_path, unet_dimensions="3D", epochs=2).result
    state = load_checkpoint(last(tmp_path))
    assert state["model"]["encoders.0.0.weight"].dim() == 5
    assert result["epochs_run"] == 2 and np.isfinite(result["best_val_loss"])


@pytest.mark.slow
def test_programmatic_use_is_a_recorded_run(data, tmp_path):
    args = {key: value for key, value in updates(data, tmp_path, {}).items()
            if key not in ("config", "seed")}
    app = sma.SMALabellerApp(args=args)
    finished = app.do2dTraining({"lr": 1e-3, "max_lr": 5e-3, "loss_function": "dice",
                                 "augmentations": True, "dropout_rate": 0.2})
    assert finished.status == "COMPLETED"
    config = json.loads((tmp_path / "sacred" / "1" / "config.json").read_text())
    assert config["config"]["loss_function"] == "dice" and config["unet_dimensions"] == "2D"


# ----------------------------------------------------------------------------- bad input
def copy_data(data: Path, tmp: Path) -> Path:
    target = tmp / "copy"
    for folder in ("imagesTr_resampled", "labelsTr_resampled"):
        (target / folder).mkdir(parents=True)
        for path in (data / folder).iterdir():
            (target / folder / path.name).write_bytes(path.read_bytes())
    return target


def refused(data: Path, tmp: Path, message: str, command: str = "main", **dotted):
    with pytest.raises(MedsegError, match=message):
        run(data, tmp, command, **dotted)
    assert not (tmp / "runs").exists()
    assert not (tmp / "sacred").exists()


def test_label_without_image(data, tmp_path):
    copy = copy_data(data, tmp_path)
    (copy / "imagesTr_resampled" / "sma_002_0000.nii.gz").unlink()
    refused(copy, tmp_path, r"label .*sma_002.nii.gz has no image")


def test_image_without_label(data, tmp_path):
    copy = copy_data(data, tmp_path)
    (copy / "labelsTr_resampled" / "sma_004.nii.gz").unlink()
    refused(copy, tmp_path, r"image .*sma_004_0000.nii.gz has no label")


def test_no_pairs(tmp_path):
    for folder in ("imagesTr_resampled", "labelsTr_resampled"):
        (tmp_path / "empty" / folder).mkdir(parents=True)
    refused(tmp_path / "empty", tmp_path, "no image/label pairs")


def rewrite(path: Path, array) -> None:
    nib.save(nib.Nifti1Image(array, np.eye(4)), path)


def test_label_values_shapes_and_4d_images(data, tmp_path):
    copy = copy_data(data, tmp_path)
    label_path = copy / "labelsTr_resampled" / "sma_001.nii.gz"
    label = np.asarray(nib.load(label_path).dataobj).copy()
    rewrite(label_path, label * 3)
    refused(copy, tmp_path, r"sma_001.nii.gz holds values \[3.0\]; expected a binary mask")
    rewrite(label_path, label[:-2])
    refused(copy, tmp_path, r"sma_001_0000.nii.gz has shape .* but its label")
    rewrite(copy / "imagesTr_resampled" / "sma_001_0000.nii.gz",
            np.zeros((*label[:-2].shape, 3), np.float32))
    refused(copy, tmp_path, r"expected a 3D single-channel volume")


@pytest.mark.parametrize("size, message", [
    (0.0, r"val_set_size must be a number > 0"), (1.0, r"val_set_size must be a number > 0"),
    (0.99, r"leaves 0 for training and 6 for validation")])
def test_val_set_size(data, tmp_path, size, message):
    refused(data, tmp_path, message, val_set_size=size)


def test_unet_dimensions_4d(data, tmp_path):
    refused(data, tmp_path, r"unet_dimensions must be one of '2D', '3D', got '4D'",
            unet_dimensions="4D")


def test_search_space_entry_that_is_not_a_config_entry(data, tmp_path):
    refused(data, tmp_path, r"tune.space entry 'config.learning_rate' is not a config entry",
            "tune", **{"tune.space.config.learning_rate": ["uniform", 0.1, 0.2]})


def test_nccl_on_cpu_under_torchrun(data, tmp_path, monkeypatch):
    """training.distributed_backend reaches SMALabeller's torchrun check like every pipeline's."""
    monkeypatch.setenv("RANK", "1")  # what torchrun tells the second process
    monkeypatch.setenv("WORLD_SIZE", "2")
    refused(data, tmp_path, r"training.distributed_backend='nccl' needs CUDA devices",
            seed=1, **{"training.distributed_backend": "nccl", "training.device": "cpu"})


def test_unwritable_tensorboard_folder(data, tmp_path):
    (tmp_path / "blocker").write_text("a file where the runs folder should be")
    with pytest.raises(MedsegError, match="cannot write TensorBoard logs and checkpoints"):
        run(data, tmp_path, runs_dir=str(tmp_path / "blocker" / "runs"))
    assert not (tmp_path / "sacred").exists()


def test_bad_input_from_the_shell_is_one_line(data, tmp_path):
    done = subprocess.run([sys.executable, str(EXPERIMENT), "with",
                           f"training_images={data / 'imagesTr_resampled'}",
                           f"training_labels={data}", "tracking.observer=file",
                           f"tracking.file_dir={tmp_path / 'sacred'}",
                           f"runs_dir={tmp_path / 'runs'}"],
                          capture_output=True, text=True)
    assert done.returncode == 2
    lines = [line for line in done.stderr.splitlines() if line.startswith("error:")]
    assert len(lines) == 1 and "has no label" in lines[0] or "no image/label pairs" in lines[0]
    assert "Traceback" not in done.stderr
    assert not (tmp_path / "runs").exists() and not (tmp_path / "sacred").exists()


# ----------------------------------------------------------------------------- Ray Tune
TINY = ["num_workers=0", "batch_size=2", "epochs=2", "model.channels=[4,8,16]",
        "data.crop_size=[16,16,8]", "data.crops_per_volume=2", "bn_calibration.warmup_batches=1",
        "tensorboard.enabled=False"]


@pytest.mark.slow
def test_a_four_trial_sweep_records_every_trial(data, tmp_path):
    args = [f"training_images={data / 'imagesTr_resampled'}",
            f"training_labels={data / 'labelsTr_resampled'}", f"runs_dir={tmp_path / 'runs'}",
            "tracking.observer=file", f"tracking.file_dir={tmp_path / 'sacred'}",
            "tune.num_samples=4", "tune.search=optuna", "tune.max_t=2", "tune.name=tiny",
            f"tune.storage_path={tmp_path / 'ray'}", *TINY]
    done = subprocess.run([sys.executable, str(EXPERIMENT), "tune", "with", *args],
                          capture_output=True, text=True, cwd=tmp_path, timeout=400)
    assert done.returncode == 0, done.stderr[-3000:]
    runs = [json.loads(p.read_text()) for p in (tmp_path / "sacred").glob("*/run.json")]
    configs = {p.parent.name: json.loads(p.read_text())
               for p in (tmp_path / "sacred").glob("*/config.json")}
    trials = [r for r in runs if r["command"] == "main"]
    assert len(trials) == 4
    assert all(r["status"] == "COMPLETED" for r in runs), [r["status"] for r in runs]
    assert len(runs) == 5  # the sweep's own run and its four trials
    for folder, config in configs.items():
        if config.get("tags") == ["sweep:tiny"]:
            metrics = json.loads((tmp_path / "sacred" / folder / "metrics.json").read_text())
            assert metrics["val_loss"]["values"], folder
            assert config["config"]["loss_function"] in ("dice", "cross_entropy", "combination")
    assert sum(c.get("tags") == ["sweep:tiny"] for c in configs.values()) == 4
    assert sum(r["command"] == "tune" for r in runs) == 1
    assert "sweep tiny: best validation_loss=" in done.stdout + done.stderr
    infos = [json.loads(p.read_text()) for p in (tmp_path / "sacred").glob("*/info.json")]
    summary = [i["sweep"] for i in infos if "sweep" in i][0]
    assert len(summary["trials"]) == 4 and summary["best_metric"] is not None
    assert summary["searcher"] == "OptunaSearch"  # tune.search=optuna, the original's
    stopped = [i for i in infos if "stopped_by_scheduler" in i]
    assert len(stopped) == summary["trials_ended_before_max_t"]
    for note in stopped:
        assert note["stopped_by_scheduler"]["reason"].startswith("stopped by the sweep")


class FakeTrainer:
    def __init__(self, num_epochs=10):
        self.stop_reason = None
        self.reporter = RecordingReporter()
        self.settings = type("Settings", (), {"num_epochs": num_epochs})()


def test_a_stop_from_the_scheduler_ends_training_with_a_note(monkeypatch):
    ray_tune = pytest.importorskip("ray.tune")
    reported = []

    def report(metrics):
        reported.append(metrics)
        if metrics["epoch"] == 2:
            raise SystemExit(0)  # what Ray's scheduler does inside report

    monkeypatch.setattr(ray_tune, "report", report)
    trainer = FakeTrainer()
    callback = tune_module.TuneReport()
    callback.on_epoch_end(trainer, 1, {"train_loss_epoch": 0.9, "val_loss": 0.8})
    assert trainer.stop_reason is None
    callback.on_epoch_end(trainer, 2, {"train_loss_epoch": 0.7, "val_loss": 0.6})
    assert reported[0] == {"train_loss_epoch": 0.9, "val_loss": 0.8, "epoch": 1,
                           "training_loss": 0.9, "validation_loss": 0.8}
    assert trainer.stop_reason == "stopped by the sweep's scheduler after epoch 2"
    assert trainer.reporter.info["stopped_by_scheduler"]["epoch"] == 2
    last = FakeTrainer(num_epochs=2)  # a stop at the last epoch stops nothing early
    callback.on_epoch_end(last, 2, {"train_loss_epoch": 0.7, "val_loss": 0.6})
    assert last.stop_reason is None and "stopped_by_scheduler" not in last.reporter.info


def test_only_trials_report_to_tune():
    assert tune_module.trial_callbacks() == []
    with tune_module.reporting_to_tune():
        assert isinstance(tune_module.trial_callbacks()[0], tune_module.TuneReport)
    assert tune_module.trial_callbacks() == []


def test_ray_start_is_retried_when_the_node_times_out(monkeypatch):
    ray = pytest.importorskip("ray")
    calls = []

    def init(**kwargs):
        calls.append(kwargs)
        if len(calls) == 1:
            raise Exception("The current node timed out during startup. This could happen ...")

    monkeypatch.setattr(ray, "init", init)
    monkeypatch.setattr(ray, "shutdown", lambda: None)
    tune_module.start_ray()
    assert len(calls) == 2
    monkeypatch.setattr(ray, "init", lambda **kwargs: (_ for _ in ()).throw(ValueError("bad")))
    with pytest.raises(ValueError, match="bad"):  # other failures are not retried
        tune_module.start_ray()
