"""Every config entry of the SADAAN experiment changes something a user can observe.

``EFFECTS`` maps each entry to ``(probe, base, alternative)``: the probe's observation with
``base`` updates must differ from the one with ``base`` plus ``alternative``. A new entry
without a row here fails ``test_every_entry_has_an_effect_row``. The shared tracking entries
(``tracking.*`` and ``tags``) are shown once for all experiments by
tests/tracking/test_tracking_config.py.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from monai.data.utils import set_rnd

from ingredients.training import loader_settings
from medseg.engine import trainer as trainer_module
from medseg.engine.fit import build_loader
from medseg.errors import MedsegError
from medseg.models.sadaan import SADAANOutput

from support import (
    add_effect_probe,
    file_runs,
    load_experiment,
    nested,
    shared_tracking_entry,
    schedule_observation,
    shows_progress_bar,
    substitute,
)

sadaan = load_experiment("sadaan")
ex = sadaan.ex
_probe = add_effect_probe(ex)


# ----------------------------------------------------------------------------- build probes
def probe_loader(config):
    settings = loader_settings(config, config["seed"])
    loader = build_loader(sadaan._split(config, "train", True), settings, train=True,
                          device=torch.device("cpu"))
    loader.set_epoch(1)
    return loader.batch_size, loader.num_workers, [int(i) for i in next(iter(loader))["index"]]


def probe_schedule(config):
    return schedule_observation(config)


def probe_model(config):
    net = sadaan.model.make_model(num_structures=3)
    first = next(p for p in net.parameters() if p.dim() == 5)
    return sum(p.numel() for p in net.parameters()), first.shape[1]


def probe_presence_gate(config):
    task = sadaan._task(config, ["a", "b", "c"])
    output = SADAANOutput(segmentation=torch.ones(1, 3, 2, 2, 2),
                          attention=torch.ones(1, 3, 2, 2, 2),
                          presence=torch.tensor([[-2.0, 0.0, 0.3]]), confidence=torch.ones(1, 3))
    masks, present = task.predict(output)
    return present.tolist(), int(masks.sum())


def probe_transform(config):
    transform = sadaan.augmentation.make_transform(config["training"]["image_size"], train=True)
    set_rnd(transform, 7)
    sample = sadaan.dataset.open_split(config["dataset_path"], "train")[0]
    out = transform(sample)
    return tuple(out["image"].shape), round(float(out["image"].double().abs().sum()), 3)


def probe_loss(config):
    torch.manual_seed(0)
    loss = sadaan.loss_weights.make_loss()
    output = SADAANOutput(torch.randn(2, 3, 8, 8, 8), torch.rand(2, 3, 8, 8, 8),
                          torch.randn(2, 3), torch.rand(2, 3))
    masks = (torch.rand(2, 3, 8, 8, 8) > 0.8).float()
    masks[0, 1] = 0
    presence = masks.flatten(2).amax(2)
    total, terms = loss(output, masks, presence)
    return round(float(total), 6), sorted(terms)


def probe_precision(config):
    device, precision = sadaan.training.device_and_precision()
    return str(device), precision.name


def probe_generate(config):
    target = Path(config["dataset_path"])
    try:
        sadaan.generate_data(str(target))
    except MedsegError as error:
        return f"error: {error}".replace(str(target), "TARGET")
    metadata = json.loads((target / "metadata.json").read_text())
    import h5py

    with h5py.File(target / "train.h5") as f:
        images = f["images"][:]
        scenarios = [s.decode() if isinstance(s, bytes) else s for s in f["scenarios"][:]]
        counts = {split: int(h5py.File(target / f"{split}.h5")["images"].shape[0])
                  for split in ("train", "val", "test") if (target / f"{split}.h5").exists()}
    return (metadata["num_structures"], images.shape, counts, scenarios,
            round(float(np.abs(np.diff(images, axis=1)).mean()), 4), round(float(images.mean()), 4))


# ----------------------------------------------------------------------------- run probes
def run_main(updates, tmp, command="main"):
    return ex.run(command, config_updates=updates, options={"--capture": "sys"})


def probe_run_summary(run, tmp):
    records = file_runs(tmp / "runs")
    run_dir = tmp / "runs" / str(run._id) if run._id else None
    metrics = json.loads((run_dir / "metrics.json").read_text()) if run_dir else {}
    info = json.loads((run_dir / "info.json").read_text()) if run_dir else {}
    return records, metrics, info


RUN_PROBES = {
    "epochs": lambda run, tmp: run.result["epochs_run"],
    "grad_norm_logged": lambda run, tmp: "train_grad_norm" in probe_run_summary(run, tmp)[1],
    "optimizer_steps": lambda run, tmp: probe_run_summary(run, tmp)[1]["train_loss"]["steps"],
    "train_loss": lambda run, tmp: [round(v, 6) for v in
                                    probe_run_summary(run, tmp)[1]["train_loss"]["values"]],
    "best": lambda run, tmp: (run.result["best_epoch"], run.result["monitor"]),
    "artifacts": lambda run, tmp: sorted(probe_run_summary(run, tmp)[0][-1]["artifacts"]),
    "captured_bar": lambda run, tmp: shows_progress_bar(run.captured_out),
    "checkpoint_files": lambda run, tmp: sorted(
        str(p.relative_to(tmp)) for p in tmp.rglob("*.pth")),
    "resumed": lambda run, tmp: probe_run_summary(run, tmp)[2].get("resumed_from", {}).get("epoch"),
    "result_keys": lambda run, tmp: sorted(run.result),
    "result": lambda run, tmp: {k: round(v, 6) for k, v in run.result.items()},
    "dataset_info": lambda run, tmp: probe_run_summary(run, tmp)[2]["dataset"]["splits"],
}

BUILD_PROBES = {
    "loader": probe_loader, "schedule": probe_schedule, "model": probe_model,
    "presence_gate": probe_presence_gate, "transform": probe_transform, "loss": probe_loss,
    "precision": probe_precision, "generate": probe_generate,
}

SCHEDULE = {"training.num_epochs": 8}
SGD, COSINE, PLATEAU, ONECYCLE = ({**SCHEDULE, "optimizer.type": "sgd"},
                                  {**SCHEDULE, "optimizer.lr_scheduler": "cosine_annealing"},
                                  {**SCHEDULE, "optimizer.lr_scheduler": "reduce_on_plateau"},
                                  {**SCHEDULE, "optimizer.lr_scheduler": "onecycle"})
STALL = {"training.num_epochs": 3, "training.learning_rate": 1e-12, "training.monitor": "val_loss",
         "training.monitor_mode": "min"}
GENERATE = {"synthetic.num_train": 2, "synthetic.num_val": 1, "synthetic.num_test": 1,
            "synthetic.image_size": [32, 32, 16], "synthetic.num_structures": 2}

EFFECTS = {
    "dataset_path": ("run:dataset_info", {}, {"dataset_path": "OTHER_DATASET"}),
    "eval_split": ("run:result_keys", {}, {"eval_split": "val"}),
    "eval_checkpoint": ("evaluate:result", {"eval_checkpoint": "CHECKPOINT_1"},
                        {"eval_checkpoint": "CHECKPOINT_2"}),
    "seed": ("loader", {}, {"seed": 12345}),  # quick runs fix seed=0
    "synthetic.num_train": ("generate", GENERATE, {"synthetic.num_train": 3}),
    "synthetic.num_val": ("generate", GENERATE, {"synthetic.num_val": 2}),
    "synthetic.num_test": ("generate", GENERATE, {"synthetic.num_test": 0}),
    "synthetic.image_size": ("generate", GENERATE, {"synthetic.image_size": [32, 32, 32]}),
    "synthetic.num_structures": ("generate", GENERATE, {"synthetic.num_structures": 3}),
    "synthetic.in_channels": ("generate", GENERATE, {"synthetic.in_channels": 2}),
    "synthetic.absent_probability": ("generate", {**GENERATE, "synthetic.num_train": 6},
                                   {"synthetic.absent_probability": 1.0}),
    "synthetic.noise_std": ("generate", GENERATE, {"synthetic.noise_std": 30.0}),
    "synthetic.seed": ("generate", GENERATE, {"synthetic.seed": 5}),
    "synthetic.overwrite": ("generate:twice", GENERATE, {"synthetic.overwrite": True}),
    # 0/255 masks are refused before training unless the check is skipped.
    "dataset.check_cases": ("run:epochs", {"dataset_path": "MASKS_0_255_DATASET"},
                            {"dataset.check_cases": 0}),
    "model.in_channels": ("model", {}, {"model.in_channels": 2}),
    "model.presence_threshold": ("presence_gate", {}, {"model.presence_threshold": 0.3}),
    "model.base_channels": ("model", {}, {"model.base_channels": 6}),
    **{f"loss_weights.{term}": ("loss", {}, {f"loss_weights.{term}": 0.0})
       for term in ("segmentation", "dice", "focal_seg", "absence", "attention_supervision",
                    "false_positive_suppression", "confidence")},
    # The whole path: the training split's presence rates reach the absence term.
    "loss_weights.absence_balance": ("run:train_loss", {}, {"loss_weights.absence_balance": True}),
    "augmentation.enabled": ("transform", {}, {"augmentation.enabled": False}),
    # the loader no longer augments; the run augments on the device (test below)
    "augmentation.on_device": ("transform", {}, {"augmentation.on_device": True}),
    "augmentation.noise_std": ("transform", {}, {"augmentation.noise_std": 20.0}),
    "augmentation.intensity_scale_range": ("transform", {},
                                           {"augmentation.intensity_scale_range": [0.5, 0.6]}),
    "augmentation.rotation_degrees": ("transform", {}, {"augmentation.rotation_degrees": 0}),
    "augmentation.flip_probability": ("transform", {}, {"augmentation.flip_probability": 1.0}),
    "optimizer.type": ("schedule", SCHEDULE, {"optimizer.type": "adamw"}),
    "optimizer.weight_decay": ("schedule", SCHEDULE, {"optimizer.weight_decay": 0.0}),
    "optimizer.momentum": ("schedule", SGD, {"optimizer.momentum": 0.5}),
    "optimizer.lr_scheduler": ("schedule", SCHEDULE, {"optimizer.lr_scheduler": "none"}),
    "optimizer.min_lr": ("schedule", {**COSINE, "training.warmup_epochs": 0}, {"optimizer.min_lr": 1e-4}),
    "optimizer.plateau_factor": ("schedule", {**PLATEAU, "training.warmup_epochs": 0,
                                              "optimizer.plateau_patience": 0},
                                 {"optimizer.plateau_factor": 0.1}),
    "optimizer.plateau_patience": ("schedule", {**PLATEAU, "training.warmup_epochs": 0},
                                   {"optimizer.plateau_patience": 0}),
    "optimizer.max_lr": ("schedule", {**ONECYCLE, "training.warmup_epochs": 0},
                         {"optimizer.max_lr": 0.05}),
    "training.batch_size": ("loader", {}, {"training.batch_size": 3}),
    "training.learning_rate": ("schedule", SCHEDULE, {"training.learning_rate": 1e-2}),
    "training.num_epochs": ("run:epochs", {}, {"training.num_epochs": 2}),
    "training.early_stopping_patience": ("run:epochs", STALL, {"training.early_stopping_patience": 1}),
    "training.gradient_clip_norm": ("run:grad_norm_logged", {}, {"training.gradient_clip_norm": 0.0}),
    "training.num_workers": ("loader", {}, {"training.num_workers": 1}),
    "training.warmup_epochs": ("schedule", SCHEDULE, {"training.warmup_epochs": 2}),
    "training.gradient_accumulation_steps": ("run:optimizer_steps", {},
                                             {"training.gradient_accumulation_steps": 4}),
    "training.memory_cleanup_frequency": ("run:cleanups", {}, {"training.memory_cleanup_frequency": 1}),
    "training.mixed_precision": ("precision", {}, {"training.mixed_precision": "bf16"}),
    "training.device": ("precision", {}, {"training.device": "cuda" if not torch.cuda.is_available()
                                          else "cpu"}),
    "training.monitor": ("run:best", STALL, {"training.monitor": "val_dice",
                                             "training.monitor_mode": "max"}),
    "training.monitor_mode": ("run:best", {**STALL, "training.learning_rate": 5e-3},
                              {"training.monitor_mode": "max"}),
    "training.image_size": ("transform", {}, {"training.image_size": [16, 16, 16]}),
    "logging.log_frequency": ("run:optimizer_steps", {}, {"logging.log_frequency": 2}),
    "logging.visualize_predictions": ("run:artifacts", {}, {"logging.visualize_predictions": True}),
    "logging.progress_bar": ("run:captured_bar", {}, {"logging.progress_bar": True}),
    "checkpoint.save_dir": ("run:checkpoint_files", {}, {"checkpoint.save_dir": "TMP/elsewhere/{run_id}"}),
    "checkpoint.save_frequency": ("run:checkpoint_files", {}, {"checkpoint.save_frequency": 1}),
    "checkpoint.keep_best_only": ("run:checkpoint_files", {}, {"checkpoint.keep_best_only": True}),
    "checkpoint.keep_periodic": ("run:checkpoint_files", {"training.num_epochs": 3,
                                                          "checkpoint.save_frequency": 1},
                                 {"checkpoint.keep_periodic": 1}),
    "checkpoint.resume": ("run:resumed", {"training.num_epochs": 2},
                          {"checkpoint.resume": "CHECKPOINT_1"}),
}


def test_every_entry_has_an_effect_row():
    assert sorted(EFFECTS) == sorted(k for k in ex.known_entries() if not shared_tracking_entry(k))


@pytest.fixture(scope="module")
def checkpoints(sadaan_data, tmp_path_factory):
    """Two different checkpoints of the tiny model (after 1 and after 2 epochs)."""
    tmp = tmp_path_factory.mktemp("effect_checkpoints")
    updates = quick_updates(sadaan_data, tmp, {"training.num_epochs": 2, "checkpoint.save_frequency": 1})
    ex.run("main", config_updates=updates, options={"--capture": "sys"})
    folder = next((tmp / "checkpoints").iterdir())
    return folder / "checkpoint_epoch_1.pth", folder / "checkpoint_epoch_2.pth"


@pytest.fixture(scope="module")
def masks_0_255_dataset(sadaan_data, tmp_path_factory):
    import shutil

    import h5py

    target = tmp_path_factory.mktemp("masks_0_255") / "data"
    shutil.copytree(sadaan_data, target)
    with h5py.File(target / "train.h5", "a") as file:
        file["masks"][...] = file["masks"][:] * 255
    return target


@pytest.fixture(scope="module")
def other_dataset(tmp_path_factory):
    from medseg.data.synthetic.sadaan import generate_sadaan_dataset

    return generate_sadaan_dataset(tmp_path_factory.mktemp("other") / "data", num_train=4,
                                   num_val=2, num_test=2, image_size=(32, 32, 16),
                                   num_structures=3, seed=9)


def quick_updates(data, tmp, dotted):
    base = {
        "seed": 0, "dataset_path": str(data), "training.image_size": [32, 32, 16],
        "training.num_epochs": 1, "training.warmup_epochs": 0, "training.num_workers": 0,
        "training.batch_size": 2, "model.base_channels": 4, "logging.progress_bar": False,
        "logging.log_frequency": 1,
        "checkpoint.save_dir": str(tmp / "checkpoints" / "{run_id}"),
        "tracking.observer": "file", "tracking.file_dir": str(tmp / "runs"),
    }
    return nested({**base, **dotted})


def observe(probe, dotted, tmp, data, substitutions, monkeypatch):
    """The probe's observation, or the message of the error the config gave."""
    try:
        return _observe(probe, dotted, tmp, data, substitutions, monkeypatch)
    except MedsegError as error:
        return f"error: {error}"


def _observe(probe, dotted, tmp, data, substitutions, monkeypatch):
    dotted = {k: substitute(v, tmp, substitutions) for k, v in dotted.items()}
    updates = quick_updates(data, tmp, dotted)
    kind, _, name = probe.partition(":")
    if kind in ("run", "evaluate"):
        cleanups = []
        monkeypatch.setattr(trainer_module, "cleanup_memory", lambda device: cleanups.append(1))
        run = ex.run("main" if kind == "run" else "evaluate", config_updates=updates,
                     options={"--capture": "sys"})
        return len(cleanups) if name == "cleanups" else RUN_PROBES[name](run, tmp)
    if kind == "generate":
        updates["dataset_path"] = str(tmp / "generated")
        updates["tracking"]["observer"] = "none"
        if name == "twice":
            _probe["function"] = probe_generate
            ex.run("effect_probe", config_updates=updates, options={"--capture": "sys"})
    _probe["function"] = BUILD_PROBES[kind]
    return ex.run("effect_probe", config_updates=updates, options={"--capture": "sys"}).result


@pytest.mark.slow
@pytest.mark.parametrize("key", sorted(EFFECTS))
def test_entry_changes_what_the_user_observes(key, sadaan_data, tmp_path, checkpoints,
                                              other_dataset, masks_0_255_dataset, monkeypatch):
    probe, base, alternative = EFFECTS[key]
    substitutions = {"CHECKPOINT_1": checkpoints[0], "CHECKPOINT_2": checkpoints[1],
                     "OTHER_DATASET": other_dataset, "MASKS_0_255_DATASET": masks_0_255_dataset}
    default = observe(probe, base, tmp_path / "base", sadaan_data, substitutions, monkeypatch)
    changed = observe(probe, {**base, **alternative}, tmp_path / "changed", sadaan_data,
                      substitutions, monkeypatch)
    assert default != changed, f"{key}: {default!r}"


def test_absence_balance_weighs_by_the_training_split_presence_rates(sadaan_data, tmp_path,
                                                                     monkeypatch):
    import h5py

    from medseg.losses import sadaan as sadaan_loss

    seen = []
    original = sadaan_loss._balancing_weights
    monkeypatch.setattr(sadaan_loss, "_balancing_weights",
                        lambda rate: seen.append(list(rate)) or original(rate))
    updates = quick_updates(sadaan_data, tmp_path, {"loss_weights.absence_balance": True})
    ex.run("main", config_updates=updates, options={"--capture": "sys"})
    with h5py.File(sadaan_data / "train.h5") as file:
        expected = (file["presence_labels"][:] > 0).mean(axis=0)
    assert 0 < expected.min() < 1  # the fixture has absent structures
    assert seen and np.allclose(seen[0], expected)


def test_on_device_augmentation_runs_in_every_training_step(sadaan_data, tmp_path, monkeypatch):
    from medseg.data.batch_augmentation import SADAANBatchAugmentation

    seen = []
    original = SADAANBatchAugmentation.apply

    def spy(self, image, mask, **draws):
        out = original(self, image, mask, **draws)
        seen.append((tuple(mask.shape), tuple(out[1].shape), float(out[0].mean())))
        return out

    monkeypatch.setattr(SADAANBatchAugmentation, "apply", spy)
    updates = quick_updates(sadaan_data, tmp_path, {"augmentation.on_device": True})
    run = ex.run("main", config_updates=updates, options={"--capture": "sys"})
    structures = sadaan.dataset.check_splits(str(sadaan_data), ())["num_structures"]
    steps = -(-len(sadaan.dataset.open_split(str(sadaan_data), "train")) // 2)
    assert len(seen) == steps
    for packed_shape, mask_shape, mean in seen:
        assert packed_shape[1] == 1 and mask_shape[1] > 1       # bits travel, masks come out
        assert mask_shape[1] == structures
        assert abs(mean) < 0.2                                   # z-scored on the device
    assert np.isfinite(run.result["best_metric"])


def test_absence_balance_without_a_training_split_is_refused_up_front(sadaan_data, tmp_path):
    import shutil

    data = tmp_path / "test_only"
    shutil.copytree(sadaan_data, data)
    (data / "train.h5").unlink()
    updates = quick_updates(data, tmp_path, {"loss_weights.absence_balance": True,
                                             "eval_split": "test"})
    with pytest.raises(MedsegError, match="absence_balance=True .*/train.h5 does not exist"):
        ex.run("evaluate", config_updates=updates, options={"--capture": "sys"})
    assert not (tmp_path / "runs").exists()
