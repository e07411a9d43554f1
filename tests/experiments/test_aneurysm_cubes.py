"""The aneurysm_cubes experiment: every config entry changes something, presets, bad input,
training end to end, sample panels, prediction and cross-validation."""

from __future__ import annotations

import json
import math
import os
import shutil
import subprocess
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch
from torch import nn

from experiments import aneurysm_cubes as exp
from ingredients import pipeline as pipeline_module
from ingredients.pipeline import PredictionSnapshots
from medseg.data.npz_cubes import TEST_FOLD, fold_folder
from medseg.engine.reporting import RecordingReporter
from medseg.errors import ConfigError, DataError, MedsegError
from support import flatten, nested, shared_tracking_entry
from tests.cube_factory import SHAPE, write_cube, write_cubes_dir, write_volumes

ROOT = Path(__file__).resolve().parents[2]
QUIET = {"--loglevel": "ERROR"}


# ---------------------------------------------------------------------------- helpers
def experiment_config_keys() -> list[str]:
    """Every entry of the experiment's merged config (Sacred's own ``seed`` included)."""
    run = exp.ex._create_run("print_config", config_updates={"tracking": {"observer": "none"}},
                             options=QUIET)
    return sorted(flatten(dict(run.config)))


class Captured(Exception):
    """Raised in place of training: carries the trainer the experiment built."""

    def __init__(self, trainer) -> None:
        super().__init__("captured")
        self.trainer = trainer


@dataclass
class Env:
    """What the effect checks need: data folders, a trained checkpoint, a way to run."""

    tmp: pytest.TempPathFactory
    monkeypatch: pytest.MonkeyPatch
    cubes: Path
    other_cubes: Path
    trained: "TrainedRun"

    def base(self, **updates) -> dict:
        out = self.tmp.mktemp("run")
        flat = {"cubes_dir": str(self.cubes), "dataset.cube_shape": list(SHAPE),
                "augmentation.crop_size": [8, 16, 16], "model.filters": [4, 8, 16, 32],
                "training.num_epochs": 2, "training.num_workers": 0, "training.device": "cpu",
                "training.learning_rate": 3e-3, "sw_batch_size": 9,
                "tracking.observer": "none", "logging.progress_bar": False,
                "checkpoint.save_dir": str(out), "checkpoint.save_frequency": 0,
                "volumes_dir": str(out / "volumes"), "viz_dir": str(out / "viz"),
                "predict_output_dir": str(out / "predictions")}
        flat.update(updates)
        return nested(flat)

    def run(self, command: str = "main", **updates):
        return self.run_config(command, self.base(**updates))

    @staticmethod
    def run_config(command: str, config: dict):
        return exp.ex.run(command, config_updates=config, options=QUIET)

    def created(self, **updates):
        """The run `main` would start, with its observers, not started."""
        return exp.ex._create_run("main", config_updates=self.base(**updates), options=QUIET)

    def build(self, **updates):
        """The trainer `main` builds for these updates (training itself is skipped)."""
        def capture(trainer):
            raise Captured(trainer)

        self.monkeypatch.setattr(pipeline_module.Trainer, "fit", capture)
        with pytest.raises(Captured) as caught:
            self.run("main", **updates)
        return caught.value.trainer

    def outcome(self, command: str, config: dict):
        """The run's result, or the message of the error that stopped it."""
        try:
            return self.run_config(command, config).result
        except MedsegError as error:
            return f"error: {error}"


@dataclass
class TrainedRun:
    run: object
    directory: Path

    @property
    def history(self) -> list[dict]:
        return torch.load(self.directory / "last_model.pth", weights_only=True)["history"]


@pytest.fixture(scope="module")
def cubes(tmp_path_factory):
    return write_cubes_dir(tmp_path_factory.mktemp("cubes") / "cubes", per_fold=(3, 3),
                           test=(2, 2))


@pytest.fixture(scope="module")
def other_cubes(tmp_path_factory):
    return write_cubes_dir(tmp_path_factory.mktemp("other") / "cubes", per_fold=(2, 2), seed=5,
                           series_prefix="7.7.")


@pytest.fixture(scope="module")
def trained(tmp_path_factory, cubes):
    """A real tiny run: 6 epochs, checkpoints recorded by path (max_artifact_mb=0)."""
    directory = tmp_path_factory.mktemp("trained")
    flat = {"cubes_dir": str(cubes), "dataset.cube_shape": list(SHAPE),
            "augmentation.crop_size": [8, 16, 16], "model.filters": [4, 8, 16, 32],
            "training.num_epochs": 6, "training.num_workers": 0, "training.device": "cpu",
            "training.learning_rate": 1e-2, "loss_weights.pos_weight": 10.0,
            "sw_batch_size": 9, "tracking.observer": "none", "tracking.max_artifact_mb": 0,
            "logging.progress_bar": False, "checkpoint.save_dir": str(directory),
            "checkpoint.save_frequency": 0, "seed": 1}
    run = exp.ex.run("main", config_updates=nested(flat), options=QUIET)
    return TrainedRun(run, directory)


@pytest.fixture
def env(tmp_path_factory, monkeypatch, cubes, other_cubes, trained):
    return Env(tmp_path_factory, monkeypatch, cubes, other_cubes, trained)


# ---------------------------------------------------------------------------- effects
Check = Callable[[Env, str], None]


def on_trainer(alternative, probe: Callable, **base) -> Check:
    """The entry changes what ``probe`` reads from the trainer `main` builds."""
    def check(env: Env, key: str) -> None:
        value = alternative(env) if callable(alternative) else alternative
        before = probe(env.build(**base))
        after = probe(env.build(**{**base, key: value}))
        assert before != after, f"{key}={value!r} changed nothing ({before!r})"
    return check


def on_outcome(command: str, alternative, probe: Callable, setup=None, **base) -> Check:
    """The entry changes what ``probe`` reads from a command's run (its output folder)."""
    def check(env: Env, key: str) -> None:
        value = alternative(env) if callable(alternative) else alternative
        observed = []
        for updates in (base, {**base, key: value}):
            updates = {name: (v(env) if callable(v) else v) for name, v in updates.items()}
            config = env.base(**updates)
            if setup is not None:
                setup(env, config)
            observed.append(probe(config, env.outcome(command, config)))
        assert observed[0] != observed[1], f"{key}={value!r} changed nothing ({observed[0]!r})"
    return check


def records(loader):
    return sorted((r.fold, r.label, r.name) for r in loader.dataset.records)


def param_count(trainer):
    return sum(p.numel() for p in trainer.model.parameters())


def transform_steps(trainer):
    return [type(t).__name__ for t in trainer.train_loader.dataset.transform.transforms]


def loss_on_fixed_input(trainer):
    torch.manual_seed(0)
    logits = torch.randn(2, 1, 4, 8, 8)
    target = (torch.rand(2, 1, 4, 8, 8) > 0.9).float()
    return round(float(trainer.task.loss(logits, target)[0]), 6)


def window_batches(trainer):
    class Recorder(nn.Module):
        def __init__(self):
            super().__init__()
            self.batches = []

        def forward(self, x):
            self.batches.append(x.shape[0])
            position = torch.linspace(0, 1, x.shape[-1]).expand_as(x)
            return position.clone()

    recorder = Recorder()
    output = trainer.task.infer(recorder, torch.zeros(1, 1, *SHAPE), trainer.precision)
    return recorder.batches, np.round(output.flatten()[::97].numpy(), 4).tolist()


def mask_voxels_of_last_val_cube(trainer):
    return float(trainer.val_loader.dataset[len(trainer.val_loader.dataset) - 1]["mask"].sum())


def cubes_written(config, outcome):
    root = Path(config["cubes_dir"])
    if isinstance(outcome, str):
        return outcome
    files = sorted(root.rglob("*.npz"))
    summary = []
    for path in files:
        with np.load(path) as npz:
            summary.append((str(path.relative_to(root)), npz["volume"].shape,
                            round(float(npz["volume"].astype(float).mean()), 2),
                            round(float(npz["mask"].astype(float).sum()), 2),
                            int(np.argmax(npz["mask"])), path.stat().st_size))
    return summary


def volumes_written(config, outcome):
    if isinstance(outcome, str):
        return outcome
    folder = Path(config["volumes_dir"])
    images = [nib.load(p) for p in sorted(folder.glob("*.nii.gz"))]
    return ([(img.shape, tuple(round(float(z), 2) for z in img.header.get_zooms()),
              round(float(np.asarray(img.dataobj).std()), 1)) for img in images],
            (folder / "aneurysm_centres.csv").read_text())


def prediction_written(config, outcome):
    if isinstance(outcome, str):
        return outcome
    written = Path(outcome["probability_map"])
    assert written.is_file() and written.with_name(
        written.name.replace("_probability.nii.gz", "_prediction.json")).is_file()
    return (written.parent.name, written.name, round(outcome["score"], 5),
            outcome["predicted_label"])


def with_volumes(env, config):
    if not Path(config["volumes_dir"]).exists():
        write_volumes(Path(config["volumes_dir"]))


def with_existing_output(folder_key):
    def setup(env, config):
        with_volumes(env, config)
        folder = Path(config[folder_key])
        folder.mkdir(parents=True, exist_ok=True)
        (folder / "old.txt").write_text("an earlier run")
    return setup


def other_volumes(env):
    folder = env.tmp.mktemp("volumes") / "volumes"
    return str(write_volumes(folder, positives=6, negatives=3, shape_xyz=(44, 40, 20)))


def other_centres(env):
    path = env.tmp.mktemp("centres") / "centres.csv"
    rows = ["series_id,voxel_x,voxel_y,voxel_z"] + [f"9.8.{i},20,20,10" for i in range(5)]
    path.write_text("\n".join(rows) + "\n")
    return str(path)


def fake_nifti(env):
    path = env.tmp.mktemp("nifti") / "head.nii.gz"
    data = np.random.default_rng(0).normal(30, 5, (40, 40, 12)).astype(np.int16)
    data[18:22, 18:22, 5:8] = 300
    nib.save(nib.Nifti1Image(data, np.diag([1.0, 1.0, 2.0, 1.0])), path)
    return str(path)


def npz_input(env):
    return str(sorted(fold_folder(env.cubes, TEST_FOLD).glob("pos_*.npz"))[0])


def checkpoint_paths(env):
    return [str(env.trained.directory / "best_model.pth")]


def resumed_ensemble(env):
    """Two different checkpoints: the trained best one and a copy with changed weights."""
    state = torch.load(env.trained.directory / "best_model.pth", weights_only=True)
    state["model"] = {k: v * 0.5 if v.is_floating_point() else v for k, v in state["model"].items()}
    path = env.tmp.mktemp("ckpt") / "half.pth"
    torch.save(state, path)
    return [*checkpoint_paths(env), str(path)]


def check_resume(env: Env, key: str) -> None:
    fresh = env.build()
    # A resume keeps the entries that shaped the training (the trained run's pos_weight).
    resumed = env.build(**{key: str(env.trained.directory / "last_model.pth"),
                           "training.num_epochs": 8, "seed": 1, "loss_weights.pos_weight": 10.0})
    assert (fresh.epoch, resumed.epoch) == (0, 6)


def check_max_artifact_mb(env: Env, key: str) -> None:
    assert "checkpoint_paths" in env.trained.run.info  # trained with max_artifact_mb=0
    run = env.run("main", **{"training.num_epochs": 1})
    assert "checkpoint_paths" not in run.info  # 200 MB: stored as artifacts


def check_visualize_predictions(env: Env, key: str) -> None:
    assert not any(isinstance(c, PredictionSnapshots) for c in env.build().callbacks)
    trainer = env.build(**{key: True})
    snapshots = [c for c in trainer.callbacks if isinstance(c, PredictionSnapshots)]
    assert len(snapshots) == 1
    snapshots[0].reporter = RecordingReporter()
    snapshots[0].on_epoch_end(trainer, 1, {})
    assert (snapshots[0].directory / "predictions_epoch_001.png").is_file()


def check_device(env: Env, key: str) -> None:
    assert env.build().device.type == "cpu"
    if torch.cuda.is_available():
        assert env.build(**{key: "cuda"}).device.type == "cuda"
    else:
        with pytest.raises(ConfigError, match=r"training\.device='cuda' but no CUDA device"):
            env.build(**{key: "cuda"})


def check_cv_id(env: Env, key: str) -> None:
    """cross_validate with an existing id reuses its finished folds; without one it starts
    a new cross-validation (here the fold training is replaced by a marker)."""
    started = []

    def start_fold(config, cv_id, fold, directory):
        started.append((cv_id, fold))
        raise Captured(None)

    env.monkeypatch.setattr(exp, "train_fold_in_subprocess", start_fold)
    template = str(env.tmp.mktemp("cv") / "{experiment}" / "{run_id}")
    config = env.base(**{"checkpoint.save_dir": template})
    root = exp.cv_root(config, "ready")
    assert root.name == "cv_ready"
    for fold in range(5):
        directory = root / f"fold_{fold}" / "evaluation_fold"
        directory.mkdir(parents=True)
        shutil.copy(env.trained.directory / "best_model.pth", directory.parent / "best_model.pth")
        shutil.copy(env.trained.directory / "evaluation_fold" / "fold_metrics.json", directory)
        shutil.copy(env.trained.directory / "evaluation_fold" / "per_cube_metrics.json", directory)
    result = env.run_config("cross_validate", {**config, key: "ready"}).result
    assert started == [] and result["cv_id"] == "ready"
    assert (root / "cross_validation.json").is_file()
    with pytest.raises(Captured):
        env.run_config("cross_validate", config)
    assert started[0][0] != "ready" and started[0][1] == 0


def check_viz(env: Env, key: str) -> None:
    result = env.run("main", viz_samples=3, **({key: str(env.tmp.mktemp("panels"))}
                                             if key == "viz_dir" else {})).result
    assert len(result["viz_panels"]) == 3 and "best_epoch" not in result
    if key == "viz_dir":
        assert all(Path(p).parent.name.startswith("panels") for p in result["viz_panels"])
    assert "viz_panels" not in env.run("main", **{"training.num_epochs": 1}).result


def check_cache_dir(env: Env, key: str) -> None:
    folders = [env.tmp.mktemp("cache") for _ in range(2)]
    for folder in folders:
        trainer = env.build(**{"dataset.cache": "disk", key: str(folder)})
        trainer.train_loader.dataset[0]
        # The cube is saved where the run says, and nowhere else.
        assert len(list(folder.iterdir())) == 1, folder


def check_val_fold_range(env: Env, key: str) -> None:
    assert records(env.build(**{key: 0}).val_loader) != records(env.build(**{key: 3}).val_loader)


def sacred_seed(trainer):
    return trainer.train_loader.seed, round(next(trainer.model.parameters()).sum().item(), 6)


def score_of(trainer):
    probability = torch.zeros(1, 1, 4, 4, 4)
    probability[0, 0, 0, 0, 0] = 0.3
    return trainer.task.score_cube(probability)


TINY_SYNTHETIC = {"synthetic.num_series": 2, "synthetic.volume_shape": [16, 48, 48],
                  "synthetic.spacing": [4.0, 3.6, 3.6]}
PREPARE = {"dataset.cube_shape": [8, 16, 16], "prepare.test_fraction": 0.0,
           "prepare.positive_jitter": 0.0, "prepare.negatives_per_series": 1,
           "cubes_dir": lambda env: str(env.tmp.mktemp("prepared") / "cubes")}

EFFECTS: dict[str, Check] = {
    # top level
    "cubes_dir": on_trainer(lambda env: str(env.other_cubes), lambda t: records(t.train_loader)),
    "val_fold": check_val_fold_range,
    "pos_thr": on_trainer(0.5, score_of),
    "classification_score": on_trainer("fraction", score_of),
    "sw_batch_size": on_trainer(2, window_batches),
    "sw_overlap": on_trainer(0.6, window_batches),
    "sw_mode": on_trainer("constant", window_batches),
    "viz_samples": check_viz,
    "viz_dir": check_viz,
    "cv_id": check_cv_id,
    "volumes_dir": on_outcome("prepare", other_volumes, cubes_written, setup=with_volumes,
                              **PREPARE),
    "predict_checkpoints": on_outcome("predict", resumed_ensemble, prediction_written,
                                      predict_checkpoints=checkpoint_paths,
                                      predict_input=npz_input),
    "predict_input": on_outcome("predict", fake_nifti, prediction_written,
                                predict_checkpoints=checkpoint_paths, predict_input=npz_input),
    "predict_output_dir": on_outcome("predict", lambda env: str(env.tmp.mktemp("elsewhere")),
                                     prediction_written, predict_checkpoints=checkpoint_paths,
                                     predict_input=npz_input),
    "seed": on_trainer(7, sacred_seed),
    # dataset
    "dataset.cube_shape": on_outcome("prepare", [8, 24, 24], cubes_written, setup=with_volumes,
                                     **{k: v for k, v in PREPARE.items()
                                        if k != "dataset.cube_shape"}),
    "dataset.label_threshold": on_trainer(0.6, mask_voxels_of_last_val_cube),
    "dataset.small_dataset": on_trainer(True, lambda t: records(t.train_loader)),
    "dataset.small_dataset_fraction": on_trainer(0.7, lambda t: records(t.train_loader),
                                                 **{"dataset.small_dataset": True}),
    "dataset.only_positive": on_trainer(True, lambda t: records(t.train_loader)),
    "dataset.only_positive_val": on_trainer(True, lambda t: records(t.val_loader)),
    "dataset.cache": on_trainer("memory", lambda t: type(t.train_loader.dataset).__name__),
    "dataset.cache_dir": check_cache_dir,
    # prepare
    "prepare.centres_csv": on_outcome("prepare", other_centres, cubes_written, setup=with_volumes,
                                      **PREPARE),
    "prepare.negatives_per_series": on_outcome("prepare", 2, cubes_written, setup=with_volumes,
                                               **PREPARE),
    "prepare.mask_sigma_mm": on_outcome("prepare", 3.0, cubes_written, setup=with_volumes,
                                        **PREPARE),
    "prepare.intensity_window": on_outcome("prepare", [0, 400], cubes_written,
                                           setup=with_volumes, **PREPARE),
    "prepare.target_spacing": on_outcome("prepare", [1.0, 1.0, 1.0], cubes_written,
                                         setup=with_volumes, **PREPARE),
    "prepare.positive_jitter": on_outcome("prepare", 0.3, cubes_written, setup=with_volumes,
                                          **PREPARE),
    "prepare.test_fraction": on_outcome("prepare", 0.3, cubes_written, setup=with_volumes,
                                        **PREPARE),
    "prepare.compress": on_outcome("prepare", True, cubes_written, setup=with_volumes, **PREPARE),
    "prepare.seed": on_outcome("prepare", 3, cubes_written, setup=with_volumes, **PREPARE),
    "prepare.overwrite": on_outcome("prepare", True, cubes_written,
                                    setup=with_existing_output("cubes_dir"), **PREPARE),
    # synthetic volumes
    "synthetic.num_series": on_outcome("generate_volumes", 3, volumes_written, **TINY_SYNTHETIC),
    "synthetic.volume_shape": on_outcome("generate_volumes", [16, 40, 48], volumes_written,
                                         **TINY_SYNTHETIC),
    "synthetic.spacing": on_outcome("generate_volumes", [4.0, 3.0, 3.6], volumes_written,
                                    **TINY_SYNTHETIC),
    "synthetic.aneurysm_fraction": on_outcome("generate_volumes", 0.0, volumes_written,
                                              **TINY_SYNTHETIC),
    "synthetic.noise_std": on_outcome("generate_volumes", 60.0, volumes_written, **TINY_SYNTHETIC),
    "synthetic.seed": on_outcome("generate_volumes", 4, volumes_written, **TINY_SYNTHETIC),
    "synthetic.overwrite": on_outcome("generate_volumes", True, volumes_written,
                                      setup=with_existing_output("volumes_dir"),
                                      **TINY_SYNTHETIC),
    # model
    "model.filters": on_trainer([4, 8, 16, 16], param_count),
    "model.kernel_size": on_trainer(5, param_count),
    "model.strides": on_trainer([1, 2, 2, 1], param_count),
    "model.dropout": on_trainer(0.0, lambda t: [type(m).__name__ for m in t.model.modules()
                                                if isinstance(m, nn.Dropout3d | nn.Dropout)]),
    "model.norm_name": on_trainer("batch", lambda t: sorted({type(m).__name__
                                                             for m in t.model.modules()})),
    "model.res_block": on_trainer(True, param_count),
    "model.initial_foreground_probability": on_trainer(
        None, lambda t: round(t.model.output_block.conv.conv.bias.item(), 4)),
    # loss
    "loss_weights.pos_weight": on_trainer(1.0, loss_on_fixed_input),
    "loss_weights.dice": on_trainer(0.0, loss_on_fixed_input),
    "loss_weights.ce": on_trainer(0.0, loss_on_fixed_input),
    # augmentation
    "augmentation.enabled": on_trainer(False, transform_steps),
    "augmentation.crop_size": on_trainer(
        [8, 8, 8], lambda t: (t.task.roi_size, t.train_loader.dataset[0]["image"].shape)),
    "augmentation.rotate_probability": on_trainer(0.0, transform_steps),
    "augmentation.flip_probability": on_trainer(0.0, transform_steps),
    "augmentation.foreground_fraction": on_trainer(0.33, transform_steps),
    # optimizer
    "optimizer.type": on_trainer("sgd", lambda t: type(t.optimizer).__name__),
    "optimizer.weight_decay": on_trainer(1e-3,
                                         lambda t: t.optimizer.param_groups[0]["weight_decay"]),
    "optimizer.momentum": on_trainer(0.5, lambda t: t.optimizer.param_groups[0]["momentum"],
                                     **{"optimizer.type": "sgd"}),
    "optimizer.lr_scheduler": on_trainer("cosine_annealing",
                                         lambda t: type(t.schedule.main).__name__),
    "optimizer.min_lr": on_trainer(1e-5, lambda t: t.schedule.main.min_lrs),
    "optimizer.plateau_factor": on_trainer(0.2, lambda t: t.schedule.main.factor),
    "optimizer.plateau_patience": on_trainer(2, lambda t: t.schedule.main.patience),
    "optimizer.max_lr": on_trainer(0.5, lambda t: t.optimizer.param_groups[0]["max_lr"],
                                   **{"optimizer.lr_scheduler": "onecycle"}),
    # training
    "training.batch_size": on_trainer(2, lambda t: t.train_loader.batch_size),
    "training.learning_rate": on_trainer(1e-2, lambda t: t.optimizer.param_groups[0]["lr"]),
    "training.num_epochs": on_trainer(5, lambda t: t.settings.num_epochs),
    "training.early_stopping_patience": on_trainer(3, lambda t: t.early_stopping.patience),
    "training.gradient_clip_norm": on_trainer(1.0, lambda t: t.settings.gradient_clip_norm),
    "training.num_workers": on_trainer(1, lambda t: t.train_loader.num_workers),
    "training.warmup_epochs": on_trainer(1, lambda t: t.schedule.warmup_steps),
    "training.gradient_accumulation_steps": on_trainer(
        2, lambda t: t.settings.gradient_accumulation_steps),
    "training.memory_cleanup_frequency": on_trainer(
        5, lambda t: t.settings.memory_cleanup_frequency),
    "training.mixed_precision": on_trainer("bf16", lambda t: t.precision.name),
    "training.device": check_device,
    "training.monitor": on_trainer("val_auc", lambda t: t.settings.monitor),
    "training.monitor_mode": on_trainer("max", lambda t: (t.settings.monitor_mode,
                                                          t.schedule.main.mode)),
    # checkpoints
    "checkpoint.save_dir": on_trainer(lambda env: str(env.tmp.mktemp("saves")),
                                      lambda t: t.checkpoints.directory.name[:5]),
    "checkpoint.save_frequency": on_trainer(3, lambda t: t.checkpoints.save_frequency),
    "checkpoint.keep_best_only": on_trainer(True, lambda t: t.checkpoints.keep_best_only),
    "checkpoint.keep_periodic": on_trainer(2, lambda t: t.checkpoints.keep_periodic),
    "checkpoint.resume": check_resume,
    # logging and tracking
    "logging.log_frequency": on_trainer(3, lambda t: t.settings.log_frequency),
    "logging.visualize_predictions": check_visualize_predictions,
    "logging.progress_bar": on_trainer(True, lambda t: t.settings.progress_bar),
    "tracking.max_artifact_mb": check_max_artifact_mb,
}

# The other shared tracking entries are shown once for every experiment by
# tests/tracking/test_tracking_config.py.
CONFIG_KEYS = [key for key in experiment_config_keys()
               if not shared_tracking_entry(key) or key in EFFECTS]


def test_every_config_entry_has_an_effect_check():
    assert sorted(EFFECTS) == CONFIG_KEYS


@pytest.mark.parametrize("key", CONFIG_KEYS)
def test_config_entry_has_an_effect(env, key):
    EFFECTS[key](env, key)


# ---------------------------------------------------------------------------- presets
def created_config(*named, **updates) -> dict:
    run = exp.ex._create_run("print_config", config_updates=nested(
        {"tracking.observer": "none", **updates}), named_configs=named, options=QUIET)
    return run.config


def test_presets_set_what_the_seed_documents():
    default = created_config()
    assert (default["training"]["learning_rate"], default["training"]["num_epochs"]) == (1e-4, 200)
    assert default["training"]["batch_size"] == 4
    assert default["dataset"]["cube_shape"] == [32, 128, 128]
    assert (default["loss_weights"]["pos_weight"], default["dataset"]["label_threshold"],
            default["pos_thr"]) == (128.0, 0.1, 0.1)
    assert default["model"]["filters"] == [32, 64, 128, 256]
    assert (default["model"]["strides"], default["model"]["dropout"]) == ([1, 2, 2, 2], 0.1)
    assert default["augmentation"]["crop_size"] == [16, 64, 64]
    assert default["optimizer"]["lr_scheduler"] == "reduce_on_plateau"
    assert default["training"]["mixed_precision"] == "auto"
    test = created_config("test")
    assert test["training"]["num_epochs"] == 1 and test["dataset"]["small_dataset"] is True
    both = created_config("test", "viz")
    assert both["viz_samples"] == 5 and both["training"]["num_epochs"] == 1
    full = created_config("full")
    assert full["training"]["num_epochs"] == 200 and full["dataset"]["small_dataset"] is False
    # The seed's random crop and file reading stay the default of the seed's presets.
    for preset in (default, test, both, full, created_config("positive_only"),
                   created_config("demo")):
        assert preset["augmentation"]["foreground_fraction"] == 0.0
        assert preset["dataset"]["cache"] == "none"
    positive = created_config("positive_only", val_fold=1)
    assert positive["dataset"]["only_positive"] and positive["dataset"]["only_positive_val"]
    assert positive["loss_weights"]["pos_weight"] == 10.0 and positive["val_fold"] == 1


# ---------------------------------------------------------------------------- bad input
def broken_cubes(tmp_path, cubes, breakage: str) -> Path:
    root = tmp_path / "broken"
    shutil.copytree(cubes, root)
    first_positive = sorted((root / "fold_2").glob("pos_*.npz"))[0]
    data = dict(np.load(first_positive))
    if breakage == "no_folds":
        for folder in root.glob("fold_*"):
            shutil.rmtree(folder)
    elif breakage == "no_positives":
        for path in (root / "fold_2").glob("pos_*.npz"):
            path.unlink()
    elif breakage == "missing_key":
        write_cube(first_positive, data["volume"], data["mask"], label=1, fold=2, drop="mask")
    elif breakage == "wrong_shape":
        write_cube(first_positive, data["volume"][:, :30], data["mask"][:, :30], label=1, fold=2)
    elif breakage == "mask_range":
        write_cube(first_positive, data["volume"], data["mask"].astype(np.float32) * 255,
                   label=1, fold=2)
    return root


def test_cpu_quality_is_the_demo_with_foreground_crops_a_schedule_and_a_cache():
    demo, recipe = created_config("demo"), created_config("cpu_quality")
    def value(config, key):
        for part in key.split("."):
            config = config[part]
        return config

    changed = {key for key in flatten(dict(recipe))
               if key != "seed" and value(recipe, key) != value(demo, key)}
    assert changed == {"augmentation.foreground_fraction", "dataset.cache",
                       "optimizer.lr_scheduler", "optimizer.min_lr", "training.num_epochs",
                       "training.num_workers", "training.warmup_epochs", "training.monitor",
                       "training.monitor_mode"}
    assert recipe["augmentation"]["foreground_fraction"] == 0.5
    assert recipe["optimizer"]["lr_scheduler"] == "cosine_annealing"
    assert (recipe["training"]["monitor"], recipe["training"]["monitor_mode"]) == ("val_dice",
                                                                                   "max")
    assert (recipe["cubes_dir"], recipe["volumes_dir"]) == (demo["cubes_dir"],
                                                            demo["volumes_dir"])


@pytest.mark.parametrize("breakage, updates, error, message", [
    ("no_folds", {}, DataError, r"broken has no fold_k folders; expected fold_0 \.\.\. fold_4"),
    ("no_positives", {}, DataError, r"broken/fold_2 has no positive cubes \(pos_\*\.npz\)"),
    ("missing_key", {}, DataError, r"fold_2/pos_\S+\.npz has no 'mask'; expected keys volume, "
                                   r"mask, label, fold"),
    ("wrong_shape", {}, DataError, r"fold_2/pos_\S+\.npz: 'volume' has shape \[8, 30, 32\] but "
                                   r"dataset\.cube_shape is \[8, 32, 32\]"),
    ("default_shape", {"dataset.cube_shape": [32, 128, 128]}, DataError,
     r"'volume' has shape \[8, 32, 32\] but dataset\.cube_shape is \[32, 128, 128\]"),
    ("mask_range", {}, DataError, r"fold_2/pos_\S+\.npz: 'mask' values lie in \[0, 2\d\d\.?\d*\]; "
                                  r"expected a Gaussian mask with values in \[0, 1\]"),
    ("none", {"val_fold": 7}, ConfigError, r"val_fold must be an integer >= 0 and <= 4, got 7"),
    ("none", {"augmentation.crop_size": [8, 12, 12]}, ConfigError,
     r"augmentation\.crop_size \[8, 12, 12\] must be divisible by 8"),
    ("none", {"augmentation.crop_size": [8, 64, 64]}, ConfigError,
     r"crop_size \[8, 64, 64\] is larger than dataset\.cube_shape \[8, 32, 32\]"),
    ("none", {"training.monitor": "val_iou"}, ConfigError,
     r"training\.monitor='val_iou' is not a metric of this pipeline"),
    ("none", {"dataset.only_positive_val": True, "training.monitor": "val_auc"}, ConfigError,
     r"undefined with dataset\.only_positive_val"),
    ("none", {"model.strides": [1, 2, 2]}, ConfigError,
     r"model\.filters has 4 levels but model\.strides has 3"),
])
def test_bad_input_stops_before_a_run_is_recorded(env, tmp_path, cubes, breakage, updates,
                                                  error, message):
    root = broken_cubes(tmp_path, cubes, breakage)
    runs = tmp_path / "runs"
    with pytest.raises(error, match=message):
        env.run("main", cubes_dir=str(root), **{"tracking.observer": "file",
                                                "tracking.file_dir": str(runs), **updates})
    assert not runs.exists()


def test_the_command_line_prints_one_line_and_exits_2(tmp_path, cubes):
    result = subprocess.run(
        [sys.executable, str(ROOT / "experiments" / "aneurysm_cubes.py"), "with", "val_fold=7",
         f"cubes_dir={cubes}", "dataset.cube_shape=[8,32,32]", "tracking.observer=none"],
        capture_output=True, text=True, cwd=tmp_path,
        env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert result.returncode == 2
    lines = [line for line in result.stderr.splitlines()
             if line.strip() and "pkg_resources" not in line and "import pkg_resources" not in line]
    assert lines[-1] == "error: val_fold must be an integer >= 0 and <= 4, got 7 (int)"
    assert "Traceback" not in result.stderr


def test_predict_names_bad_inputs(env, tmp_path):
    with pytest.raises(ConfigError, match=r"predict_checkpoints is empty"):
        env.run("predict", predict_input=str(tmp_path))
    with pytest.raises(ConfigError, match=r"predict_checkpoints: no checkpoint file at .*nope"):
        env.run("predict", predict_checkpoints=[str(tmp_path / "nope.pth")])
    checkpoints = checkpoint_paths(env)
    (tmp_path / "scan.txt").write_text("not a volume")
    with pytest.raises(DataError, match=r"scan\.txt: expected an NPZ cube \(\.npz\) or a NIfTI"):
        env.run("predict", predict_checkpoints=checkpoints,
                predict_input=str(tmp_path / "scan.txt"))
    np.savez(tmp_path / "cube.npz", image=np.zeros((4, 4, 4), np.uint8))
    with pytest.raises(DataError, match=r"cube\.npz has no 'volume'"):
        env.run("predict", predict_checkpoints=checkpoints,
                predict_input=str(tmp_path / "cube.npz"))


def test_prepare_and_generate_refuse_to_overwrite(env, tmp_path):
    folder = tmp_path / "taken"
    folder.mkdir()
    (folder / "keep.txt").write_text("mine")
    with pytest.raises(DataError, match=r"taken already contains files"):
        env.run("generate_volumes", volumes_dir=str(folder))
    volumes = write_volumes(tmp_path / "volumes")
    with pytest.raises(DataError, match=r"taken already contains files"):
        env.run("prepare", volumes_dir=str(volumes), cubes_dir=str(folder))
    assert (folder / "keep.txt").read_text() == "mine"


# ---------------------------------------------------------------------------- end to end
@pytest.mark.slow
def test_training_lowers_the_loss_and_raises_dice(trained):
    history = trained.history
    assert len(history) == 6
    losses = [row["train_loss_epoch"] for row in history]
    dice = [row["val_dice"] for row in history]
    # Falls by more than 15 %, and the lowest epoch is one of the last two (an epoch of 24
    # random crops may tick up by a few per cent).
    assert losses[-1] < 0.85 * losses[0] and min(losses[-2:]) == min(losses)
    assert dice[-1] > dice[0] + 0.1 and dice[-1] > 0.6
    result = trained.run.result
    assert set(result) >= {"best_epoch", "fold_dice", "fold_auc", "fold_pos_accuracy",
                           "fold_neg_accuracy", "test_dice", "test_auc", "checkpoint"}
    assert Path(result["checkpoint"]).is_file()
    evaluation = trained.directory / "evaluation_fold"
    per_cube = json.loads((evaluation / "per_cube_metrics.json").read_text())
    assert len(per_cube["cubes"]) == 6 and (evaluation / "roc_curve.png").is_file()
    assert trained.run.info["dataset"]["cubes"]["fold_0"] == {"negative": 3, "positive": 3}
    assert trained.run.info["dataset"]["train_cubes"] == 24


def test_viz_writes_sample_panels_and_trains_nothing(env, tmp_path):
    run = env.run("main", viz_samples=3, viz_dir=str(tmp_path / "viz"))
    panels = sorted((tmp_path / "viz").glob("*.png"))
    assert len(panels) == 3 and [p.name[:13] for p in panels] == ["sample_00_pos", "sample_01_neg",
                                                                   "sample_02_pos"]
    assert not any(Path(run.config["checkpoint"]["save_dir"]).glob("*.pth"))


def test_predict_writes_a_probability_map_and_score(env, tmp_path):
    checkpoints = checkpoint_paths(env)
    cube = npz_input(env)
    record = env.run("predict", predict_checkpoints=checkpoints, predict_input=cube,
                     predict_output_dir=str(tmp_path)).result
    image = nib.load(record["probability_map"])
    assert image.shape == (32, 32, 8)  # x, y, z of the (z, y, x) cube
    probability = np.asarray(image.dataobj)
    assert 0 <= probability.min() and probability.max() <= 1
    assert record["score"] == pytest.approx(float(probability.max()), abs=1e-5)
    assert record["predicted_label"] == int(record["score"] > 0.1) and record["label"] == 1
    saved = json.loads((tmp_path / (Path(cube).stem + "_prediction.json")).read_text())
    assert saved["score"] == record["score"]
    volume = fake_nifti(env)
    record = env.run("predict", predict_checkpoints=checkpoints * 2, predict_input=volume,
                     predict_output_dir=str(tmp_path)).result
    image = nib.load(record["probability_map"])
    assert image.shape == (40, 40, 12)
    np.testing.assert_allclose(image.affine, nib.load(volume).affine)
    assert record["label"] is None and math.isfinite(record["score"])


@pytest.mark.slow
def test_cross_validation_runs_five_fold_runs_and_scores_their_ensemble(env, tmp_path, cubes):
    template = str(tmp_path / "checkpoints" / "{experiment}" / "{run_id}")
    config = env.base(**{"checkpoint.save_dir": template, "training.num_epochs": 1,
                         "cv_id": "e2e"})
    result = env.run_config("cross_validate", config).result
    root = tmp_path / "checkpoints" / "aneurysm_cubes" / "cv_e2e"
    for fold in range(5):
        fold_config = json.loads((root / f"fold_{fold}" / "fold_config.json").read_text())
        assert (fold_config["val_fold"], fold_config["cv_id"]) == (fold, "e2e")
        assert (root / f"fold_{fold}" / "best_model.pth").is_file()
    for name in ("dice", "auc"):
        assert math.isfinite(result[f"cv_{name}_mean"]) and math.isfinite(result[f"cv_{name}_std"])
    assert {"ensemble_test_dice", "ensemble_test_auc", "cv_pooled_auc"} <= set(result)
    assert json.loads((root / "cross_validation.json").read_text())["cv_id"] == "e2e"
    assert (root / "evaluation_ensemble_test" / "per_cube_metrics.json").is_file()
