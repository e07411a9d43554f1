"""The SMALabeller experiment's own entries each change what a user can observe.

Each row: a probe run inside the experiment (so the config reaches the library's builders as it
does in a training run), its observation with the base config and with one entry changed, which
must differ. Entries shown elsewhere: ``runs_dir``/``tb_prefix``/``comment`` (the shell test's
folders), ``checkpoint.*`` and ``epochs`` (checkpoint/resume tests),
``tensorboard.enabled``, ``training.mixed_precision``/``device`` (the shell and throughput
runs), ``training_images``/``training_labels`` (bad-input tests), ``data_dir`` and
``synthetic.*`` (generate_data tests), ``tune.*`` (the sweep tests), all in
tests/experiments/test_smalabeller.py and tests/data/test_nifti_pairs.py, and
``training.distributed_*`` (the torchrun tests, tests/experiments/test_ddp*.py).
"""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch
from support import add_effect_probe, load_experiment, merge
from torch import nn

from ingredients import smalabeller as sma_ingredients
from medseg.data.synthetic.smalabeller import BrainSettings, generate_brain_dataset
from medseg.tasks.smalabeller import (bn_calibration, build, make_loaders, make_optimization,
                                      trainer_settings)

ex = load_experiment("smalabeller").ex
_probe = add_effect_probe(ex)
CPU = torch.device("cpu")


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return generate_brain_dataset(tmp_path_factory.mktemp("sma_effects") / "data", num_cases=6,
                                  settings=BrainSettings((24, 24), (12, 16), (1.0, 2.0), 0.02, 2))


def settings(config):
    return sma_ingredients.settings(config)


def model(config):
    net, task = build(settings(config))
    dropouts = [m.p for m in net.modules() if isinstance(m, nn.modules.dropout._DropoutNd)]
    return (sum(p.numel() for p in net.parameters()), task.spatial_dims, dropouts,
            round(net.head.bias.item(), 4), type(task.loss.loss).__name__)


def schedule(config):
    """The learning rate of every step of the run (3 steps an epoch)."""
    s = settings(config)
    net = nn.Linear(1, 1)
    optimizer, lr_schedule = make_optimization(s, net, steps_per_epoch=3)
    rates = [optimizer.param_groups[0]["lr"]]
    for _ in range(3 * s.epochs):
        optimizer.step()
        lr_schedule.after_optimizer_step()
        rates.append(lr_schedule.current_lr())
    return [round(rate, 9) for rate in rates]


def split(config):
    train, val = sma_ingredients.split(config)
    return [p.case for p in train], [p.case for p in val]


def loaders(config):
    """The batches a run trains and validates on: count, shapes, content, cache."""
    torch.manual_seed(0)
    train, val = make_loaders(settings(config), *sma_ingredients.split(config), CPU)
    batch, val_batch = next(iter(train)), next(iter(val))
    return (len(train), train.loader.num_workers, tuple(batch["image"].shape),
            tuple(val_batch["image"].shape), round(float(batch["image"].sum()), 2),
            type(train.dataset).__name__)


def calibration(config):
    """What BatchNorm calibration forwards: the samples and the size of each forward."""
    s = settings(config)
    net, task = build(s)
    callback = bn_calibration(s, task)
    if callback is None:
        return None
    sizes = []
    net.register_forward_pre_hook(lambda module, inputs: sizes.append(inputs[0].shape[0]))
    batch = {"image": torch.rand(2, 1, 16, 16, 8), "label": torch.zeros(2, 1, 16, 16, 8)}
    callback.model_for_validation(SimpleNamespace(train_loader=[batch] * 3, device=CPU), net)
    return callback.samples_seen, sizes


def trainer(config):
    t = trainer_settings(settings(config))
    return t.num_epochs, t.early_stopping_patience, t.log_frequency, t.progress_bar


BASE = {"epochs": 2, "batch_size": 2, "num_workers": 0, "model": {"channels": [4, 8]},
        "data": {"crop_size": [16, 16, 8], "crops_per_volume": 2},
        "config": {"dropout_rate": 0.2}, "tracking": {"observer": "none"}}
ROWS = [
    ("unet_dimensions", model, {"unet_dimensions": "3D"}),
    ("model.channels", model, {"model": {"channels": [4, 8, 16]}}),
    ("model.initial_foreground", model, {"model": {"initial_foreground": 0.2}}),
    ("config.dropout_rate", model, {"config": {"dropout_rate": 0.0}}),
    ("config.loss_function", model, {"config": {"loss_function": "dice"}}),
    ("config.lr", schedule, {"config": {"lr": 1e-3}}),
    ("config.max_lr", schedule, {"config": {"max_lr": 1e-2}}),
    ("epochs", schedule, {"epochs": 3}),
    ("val_set_size", split, {"val_set_size": 0.5}),
    ("data.split_seed", split, {"data": {"split_seed": 7}}),
    ("batch_size", loaders, {"batch_size": 1}),
    ("num_workers", loaders, {"num_workers": 1}),
    ("config.augmentations", loaders, {"config": {"augmentations": False}}),
    ("data.crop_size", loaders, {"data": {"crop_size": [8, 8, 4]}}),
    ("data.crops_per_volume", loaders, {"data": {"crops_per_volume": 1}}),
    ("data.spacing", loaders, {"data": {"spacing": [2.0, 2.0, 2.0]}}),
    ("data.cache", loaders, {"data": {"cache": "none"}}),
    ("data.cache_dir", loaders, {"data": {"cache": "disk", "cache_dir": "CACHE"}}),
    ("bn_calibration.enabled", calibration, {"bn_calibration": {"enabled": False}}),
    ("bn_calibration.warmup_batches", calibration, {"bn_calibration": {"warmup_batches": 2}}),
    ("bn_calibration.slice_batch", calibration, {"bn_calibration": {"slice_batch": 5}}),
    ("early_stopping.patience", trainer, {"early_stopping": {"patience": 3}}),
    ("training.log_frequency", trainer, {"training": {"log_frequency": 4}}),
    ("training.progress_bar", trainer, {"training": {"progress_bar": False}}),
]


def _observe(data, tmp_path, function, updates):
    config = merge(merge(BASE, {"training_images": str(data / "imagesTr_resampled"),
                                "training_labels": str(data / "labelsTr_resampled")}), updates)
    if config["data"].get("cache_dir") == "CACHE":
        config["data"]["cache_dir"] = str(tmp_path / "cache")
    _probe["function"] = function
    return ex.run("effect_probe", config_updates=config).result


@pytest.mark.parametrize("key, function, change", ROWS, ids=[r[0] for r in ROWS])
def test_entry_has_its_effect(data, tmp_path, key, function, change):
    # data.cache_dir: a disk cache in the default folder, then in another one (its files).
    base = {"data": {"cache": "disk", "cache_dir": str(tmp_path / "default")}} \
        if key == "data.cache_dir" else {}
    before = _observe(data, tmp_path, function, base)
    after = _observe(data, tmp_path, function, merge(base, change))
    if key == "data.cache_dir":
        before, after = (sorted(p.name for p in (tmp_path / d).iterdir())
                         for d in ("default", "cache"))
        assert before and after
        return
    assert before != after


def test_every_own_entry_has_a_row():
    own = {k for k, _, _ in ex.describe_entries()
           if k.split(".")[0] not in ("tracking", "synthetic", "tune", "checkpoint",
                                      "tensorboard", "tags", "seed")}
    shown_elsewhere = {"runs_dir", "tb_prefix", "comment", "data_dir", "training_images",
                       "training_labels", "training.device", "training.mixed_precision",
                       # the torchrun tests: test_ddp*.py and test_smalabeller.py's nccl check
                       "training.distributed_backend", "training.distributed_timeout"}
    assert own - shown_elsewhere <= {r[0] for r in ROWS}
