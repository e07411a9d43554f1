"""The lung-tumour experiment end to end: generate -> convert -> train -> predict, the overfit
check, the bad inputs of issue 5, and an observable effect for every config entry."""

from __future__ import annotations

import copy
import json
import subprocess
import sys
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch
from monai.data.utils import set_rnd
from PIL import Image

import ingredients.lung_tumor as lung_ingredients
from ingredients.training import loader_settings
from medseg.data.msd import ConversionSettings, convert_task
from medseg.data.synthetic.lung import generate_lung_task
from medseg.engine import trainer as trainer_module
from medseg.engine.checkpoint import atomic_save, load_checkpoint
from medseg.engine.fit import make_loaders
from medseg.errors import ConfigError, DataError, MedsegError
from support import (
    add_effect_probe,
    flatten,
    load_experiment,
    nested,
    shared_tracking_entry,
    schedule_observation,
    shows_progress_bar,
    substitute,
)

ROOT = Path(__file__).resolve().parents[2]
EXPERIMENT = ROOT / "experiments" / "lung_tumor.py"


lung = load_experiment("lung_tumor")
ex = lung.ex
_probe = add_effect_probe(ex)


# ----------------------------------------------------------------------------- data
@pytest.fixture(scope="module")
def msd_root(tmp_path_factory):
    """A tiny synthetic MSD folder: msd/Task006_Lung with 5 volumes of 32 x 32 x 16."""
    root = tmp_path_factory.mktemp("msd") / "msd"
    generate_lung_task(root / "Task006_Lung", num_volumes=5, volume_size=(32, 32, 16),
                       tumor_free_fraction=0.0, seed=4)
    return root


@pytest.fixture(scope="module")
def slices(msd_root, tmp_path_factory):
    """Its PNG slices (every tumour slice, a third of the others)."""
    out = tmp_path_factory.mktemp("slices") / "dataset"
    convert_task(msd_root / "Task006_Lung", out, ConversionSettings(empty_slice_fraction=0.34))
    return out


QUICK = {
    "seed": 0, "training.image_size": [32, 32], "training.num_epochs": 1,
    "training.num_workers": 0, "training.batch_size": 4, "training.gradient_accumulation_steps": 1,
    "training.learning_rate": 3e-3, "training.val_batch_size": 4,
    "model.channels": [4, 8, 16], "logging.progress_bar": False,
    "overfit.steps": 3,
}


def quick_updates(data: Path, tmp: Path, dotted: dict) -> dict:
    base = {**QUICK, "dataset_path": str(data),
            "checkpoint.save_dir": str(tmp / "checkpoints" / "{run_id}"),
            "tracking.observer": "file", "tracking.file_dir": str(tmp / "runs"),
            "predict_dir": str(tmp / "predictions")}
    return nested({**base, **dotted})


def first_slice(data: Path) -> Path:
    return sorted((data / "images").iterdir())[0]


def run(command: str, data: Path, tmp: Path, **dotted):
    return ex.run(command, config_updates=quick_updates(data, tmp, dotted),
                  options={"--capture": "sys"})


def recorded_runs(tmp: Path) -> list[Path]:
    return sorted((tmp / "runs").glob("*/run.json"))


# ----------------------------------------------------------------------------- end to end
@pytest.mark.slow
def test_training_lowers_the_loss_raises_dice_and_saves_the_seed_outputs(slices, tmp_path):
    result = run("main", slices, tmp_path, **{"training.num_epochs": 6,
                                              "model.channels": [8, 16, 32],
                                              "training.learning_rate": 3e-2}).result
    folder = next((tmp_path / "checkpoints").iterdir())
    assert sorted(str(p.relative_to(folder)) for p in folder.rglob("*.p*")) == [
        "training_curves.png", "val_predictions.png", "weights/best.pt", "weights/last.pt"]
    metrics = json.loads((tmp_path / "runs" / "1" / "metrics.json").read_text())
    losses = metrics["train_loss_epoch"]["values"]
    dice = metrics["val_tumor_dice"]["values"]
    # Six epochs of 32-pixel slices on a CPU: a clear trend, far from convergence.
    assert losses[-1] < 0.85 * losses[0]
    assert max(dice[1:]) > 1.5 * dice[0]
    for name in ("val_tumor_iou", "val_pixel_accuracy", "val_tumor_dice_pooled",
                 "val_tumor_dice_per_volume", "val_tumor_dice_per_slice", "val_loss"):
        assert len(metrics[name]["values"]) == 6, name
    assert result["best_metric"] == pytest.approx(max(dice))
    info = json.loads((tmp_path / "runs" / "1" / "info.json").read_text())
    assert info["dataset"]["splits"]["val"]["volumes"] == 1
    # Validation scores the whole volume (16 slices, left_out/ included); training reads only
    # the slices convert kept (every tumour slice, a third of the others).
    assert info["dataset"]["splits"]["val"]["slices"] == 16
    kept = len(list((slices / "images").iterdir()))
    assert info["dataset"]["splits"]["train"]["slices"] < kept < 5 * 16
    artifacts = json.loads((tmp_path / "runs" / "1" / "run.json").read_text())["artifacts"]
    assert {"training_curves.png", "val_predictions.png", "best.pt", "last.pt"} <= set(artifacts)


def last_checkpoint(tmp: Path) -> Path:
    return next((tmp / "checkpoints").iterdir()) / "weights" / "last.pt"


@pytest.mark.slow
def test_resumed_run_matches_the_uninterrupted_one(slices, tmp_path):
    common = {"training.num_epochs": 3, "optimizer.lr_scheduler": "none", "training.ema": True,
              "training.ema_ramp_steps": 0, "training.ema_decay": 0.9}
    straight = run("main", slices, tmp_path / "straight", **common)
    run("main", slices, tmp_path / "first", **{**common, "training.num_epochs": 2})
    resumed = run("main", slices, tmp_path / "resumed", **common,
                  **{"checkpoint.resume": str(last_checkpoint(tmp_path / "first"))})
    expected = load_checkpoint(last_checkpoint(tmp_path / "straight"))
    got = load_checkpoint(last_checkpoint(tmp_path / "resumed"))
    for key in ("model", "training_model"):
        for name, value in expected[key].items():
            assert torch.allclose(value.float(), got[key][name].float(), atol=1e-5), (key, name)
    assert resumed.result == straight.result


@pytest.mark.slow
def test_predict_with_a_trained_checkpoint_on_png_folder_and_nifti(slices, msd_root, tmp_path):
    run("main", slices, tmp_path, **{"training.num_epochs": 1})
    weights = next((tmp_path / "checkpoints").iterdir()) / "weights" / "best.pt"
    volume = msd_root / "Task006_Lung" / "imagesTr" / "lung_001.nii.gz"
    for source in (first_slice(slices), slices / "images", volume):
        out = tmp_path / "predicted" / source.name
        run("predict", slices, tmp_path, weights=str(weights), source=str(source),
            save_overlay=True, predict_dir=str(out))
        summary = json.loads((out / "predictions.json").read_text())
        assert summary["weights"] == str(weights) and summary["epoch"] == 1
        expected = len(list(source.iterdir())) if source.is_dir() else 1
        assert len(summary["predictions"]) == expected
    mask = tmp_path / "predicted" / "lung_001.nii.gz" / "lung_001_mask.nii.gz"
    assert summary["window_center"] == -300.0 and summary["window_width"] == 1400.0
    # Another window in the config does not change the volume's prediction: the slices
    # were converted with conversion.json's window, and predict uses that.
    out = tmp_path / "predicted" / "other_window"
    run("predict", slices, tmp_path, weights=str(weights), source=str(volume),
        predict_dir=str(out), **{"dataset.window_center": 200.0, "dataset.window_width": 400.0})
    assert np.array_equal(np.asarray(nib.load(out / "lung_001_mask.nii.gz").dataobj),
                          np.asarray(nib.load(mask).dataobj))
    assert json.loads((out / "predictions.json").read_text())["window_center"] == -300.0
    # evaluate scores the checkpoint on every slice of the validation volume.
    scored = run("evaluate", slices, tmp_path, weights=str(weights)).result
    assert set(scored) == {"val_tumor_dice_per_volume", "val_tumor_dice_pooled",
                           "val_tumor_dice_per_slice"}
    folder = next(p for p in (tmp_path / "checkpoints").iterdir() if (p / "evaluation_val").is_dir())
    recorded = json.loads((folder / "evaluation_val" / "val_metrics.json").read_text())
    assert recorded["val_tumor_dice_per_volume"] == scored["val_tumor_dice_per_volume"]
    assert {"val_loss", "val_tumor_iou", "val_pixel_accuracy"} <= set(recorded)
    per_volume = json.loads((folder / "evaluation_val" / "per_volume_dice.json").read_text())
    assert len(per_volume) == 1 and next(iter(per_volume.values()))["tumour_pixels"] > 0


def test_predict_windows_nifti_as_the_training_slices_were_converted(tmp_path, caplog):
    """The window comes from conversion.json of the checkpoint's dataset_path, not from the
    current dataset.window_* entries; one line says so when they differ."""
    converted = tmp_path / "converted"
    converted.mkdir()
    (converted / "conversion.json").write_text(json.dumps({"window_center": -600.0,
                                                           "window_width": 1500.0}))
    weights = tmp_path / "best.pt"
    atomic_save({"model": {}, "config": {"dataset_path": str(converted)}}, weights)
    volume, image = [tmp_path / "ct.nii.gz"], [tmp_path / "slice.png"]
    config = {"weights": str(weights), "dataset": {"window_center": -300.0,
                                                   "window_width": 1400.0}}
    with caplog.at_level("WARNING", logger="medseg"):
        assert lung_ingredients.predict_window(config, volume) == (-600.0, 1500.0)
    lines = [r.getMessage() for r in caplog.records]
    assert len(lines) == 1 and "centre -600, width 1500" in lines[0]
    assert "conversion.json" in lines[0] and "dataset.window_center=-300" in lines[0]
    caplog.clear()
    same = {**config, "dataset": {"window_center": -600.0, "window_width": 1500.0}}
    with caplog.at_level("WARNING", logger="medseg"):
        assert lung_ingredients.predict_window(same, volume) == (-600.0, 1500.0)
        assert lung_ingredients.predict_window(config, image) == (-600.0, 1500.0)
    assert not caplog.records   # same window, or no volume to window: nothing to say
    (converted / "conversion.json").unlink()   # a folder converted elsewhere, or moved
    with caplog.at_level("WARNING", logger="medseg"):
        assert lung_ingredients.predict_window(config, volume) == (-300.0, 1400.0)
    assert len(caplog.records) == 1 and "no conversion.json" in caplog.records[0].getMessage()


def test_predict_and_evaluate_take_the_neighbouring_slices_of_the_checkpoint(tmp_path, caplog):
    weights, old = tmp_path / "best.pt", tmp_path / "old.pt"
    atomic_save({"model": {}, "config": {"dataset": {"context_slices": 2}}}, weights)
    atomic_save({"model": {}, "config": {"dataset": {"window_center": -300.0}}}, old)
    given = lambda k: {"dataset": {"context_slices": k}}   # noqa: E731
    with caplog.at_level("WARNING", logger="medseg"):
        assert lung_ingredients.trained_context_slices(given(0), str(weights)) == 2
        assert lung_ingredients.trained_context_slices(given(0), str(old)) == 0
    assert not caplog.records   # the default given: nothing to say
    with caplog.at_level("WARNING", logger="medseg"):
        assert lung_ingredients.trained_context_slices(given(1), str(weights)) == 2
    assert len(caplog.records) == 1
    assert "dataset.context_slices=1 is replaced by the checkpoint's 2" in caplog.records[0].getMessage()


@pytest.mark.slow
def test_predict_builds_the_network_and_input_the_checkpoint_was_trained_with(slices, msd_root,
                                                                             tmp_path):
    run("main", slices, tmp_path, **{"model.channels": [4, 8, 16, 32], "training.num_epochs": 1,
                                     "dataset.context_slices": 1})
    weights = next((tmp_path / "checkpoints").iterdir()) / "weights" / "best.pt"
    assert load_checkpoint(weights)["config"]["dataset"]["context_slices"] == 1
    # Given without dataset.context_slices: the checkpoint's network takes three slices,
    # and predict and evaluate stack each slice's neighbours as it was trained.
    volume = msd_root / "Task006_Lung" / "imagesTr" / "lung_001.nii.gz"
    for source in (first_slice(slices), slices / "images", volume):
        out = tmp_path / "predicted" / source.name
        run("predict", slices, tmp_path, weights=str(weights), source=str(source),
            predict_dir=str(out))
        assert json.loads((out / "predictions.json").read_text())["context_slices"] == 1
    assert (tmp_path / "predicted" / "images" / f"{first_slice(slices).stem}_mask.png").is_file()
    scored = run("evaluate", slices, tmp_path, weights=str(weights)).result
    assert 0 <= scored["val_tumor_dice_pooled"] <= 1


@pytest.mark.slow
def test_overfit_check_reaches_near_perfect_dice(slices, tmp_path):
    result = run("overfit", slices, tmp_path, **{"overfit.steps": 200,
                                                  "model.channels": [8, 16, 32],
                                                  "overfit.learning_rate": 3e-3}).result
    assert result["passed"] and result["dice"] >= 0.95 and len(result["slices"]) == 4


@pytest.mark.slow
def test_generate_convert_train_from_the_command_line(tmp_path):
    env_python = sys.executable
    common = ["tracking.observer=none", f"msd_dir={tmp_path / 'msd'}",
              f"dataset_path={tmp_path / 'dataset'}"]

    def cli(*args):
        return subprocess.run([env_python, str(EXPERIMENT), *args], capture_output=True,
                              text=True, cwd=tmp_path, timeout=600)

    generated = cli("generate_msd", "with", "synthetic.num_volumes=4",
                    "synthetic.volume_size=[32,32,16]", "synthetic.tumor_free_fraction=0.0", *common)
    assert generated.returncode == 0, generated.stderr
    converted = cli("convert", "with", *common)
    assert converted.returncode == 0, converted.stderr
    assert "slices of 4 volumes" in converted.stdout
    trained = cli("with", str(ROOT / "configs" / "lung_tumor.yaml"), *common,
                  "training.image_size=[32,32]", "model.channels=[4,8,16]",
                  "training.num_epochs=1", "training.num_workers=0", "logging.progress_bar=False")
    assert trained.returncode == 0, trained.stderr
    assert list((tmp_path / "runs" / "lung_tumor").glob("*/weights/best.pt"))


# ----------------------------------------------------------------------------- bad input
def break_dataset(slices: Path, tmp: Path) -> Path:
    broken = tmp / "broken"
    broken.mkdir()
    for folder in ("images", "labels"):
        (broken / folder).mkdir()
        for path in (slices / folder).iterdir():
            (broken / folder / path.name).write_bytes(path.read_bytes())
    return broken


def a_slice(folder: Path) -> Path:
    return sorted((folder / "labels").iterdir())[3]


def assert_refused(command, data, tmp, error, message, **dotted):
    with pytest.raises(error, match=message):
        run(command, data, tmp, **dotted)
    assert recorded_runs(tmp) == []  # stopped before a run was recorded
    assert not (tmp / "checkpoints").exists()


def test_label_with_values_other_than_0_and_255(slices, tmp_path):
    data = break_dataset(slices, tmp_path)
    label = a_slice(data)
    Image.fromarray(np.full((32, 32), 128, dtype=np.uint8)).save(label)
    assert_refused("main", data, tmp_path, DataError,
                   f"{label.name} has values 128; expected only 0 .background. and 255")


def test_image_and_label_of_different_sizes(slices, tmp_path):
    data = break_dataset(slices, tmp_path)
    label = a_slice(data)
    Image.fromarray(np.zeros((32, 30), dtype=np.uint8)).save(label)
    assert_refused("main", data, tmp_path, DataError,
                   rf"{label.name} is 30x32 \(width x height\) but its image .* is 32x32")


def test_image_without_label(slices, tmp_path):
    data = break_dataset(slices, tmp_path)
    label = a_slice(data)
    label.unlink()
    assert_refused("main", data, tmp_path, DataError, f"images/{label.name} has no label")


def test_empty_images_folder(tmp_path):
    (tmp_path / "data" / "images").mkdir(parents=True)
    (tmp_path / "data" / "labels").mkdir()
    assert_refused("main", tmp_path / "data", tmp_path, DataError, "images holds no PNG files")


def test_msd_folder_without_dataset_json(msd_root, tmp_path):
    task = tmp_path / "msd" / "Task006_Lung"
    task.mkdir(parents=True)
    for folder in ("imagesTr", "labelsTr"):
        (task / folder).mkdir()
    with pytest.raises(DataError, match="dataset.json does not exist; an MSD task folder needs"):
        run("convert", tmp_path / "dataset", tmp_path, msd_dir=str(tmp_path / "msd"))
    assert not (tmp_path / "dataset").exists()


def test_unknown_key_in_the_config_file_gives_one_line(tmp_path):
    config = tmp_path / "lung.yaml"
    config.write_text((ROOT / "configs" / "lung_tumor.yaml").read_text()
                      .replace("  batch_size: 4", "  batch_sise: 4"))
    done = subprocess.run([sys.executable, str(EXPERIMENT), "with", str(config),
                           "tracking.observer=none"], capture_output=True, text=True, cwd=tmp_path,
                          timeout=300)
    assert done.returncode == 2
    lines = [line for line in done.stderr.splitlines() if line.strip()]
    assert lines == [f"error: unknown config entry training.batch_sise (set in {config}) (did you "
                     "mean training.batch_size?); `print_config` lists them all"]


def test_the_seed_config_file_holds_only_known_entries():
    config = ex.run("print_config", named_configs=[str(ROOT / "configs" / "lung_tumor.yaml")],
                    options={"--unobserved": True, "--capture": "sys"}).config
    training = config["training"]
    assert training["gradient_accumulation_steps"] * training["batch_size"] == 32
    assert config["optimizer"]["type"] == "adamw" and config["loss"]["type"] == "dice_bce"


@pytest.mark.parametrize("dotted, message", [
    ({"training.image_size": [40, 40], "model.channels": [4, 8, 16, 32, 32]},
     r"training.image_size \[40, 40\] must be multiples of 16"),
    ({"training.image_size": [32, 32, 32]}, "training.image_size must be a list of 2 values"),
    ({"training.monitor": "val_dice"}, "training.monitor='val_dice' is not a metric"),
    ({"model.architecture": "unet", "model.deep_supervision": True},
     "model.deep_supervision=True needs model.architecture='attention_unet'"),
    ({"loss.type": "focal"}, "loss.type must be one of"),
    ({"threshold": 1.5}, "threshold must be a number"),
    ({"overfit.samples": 0}, "overfit.samples must be an integer >= 1"),
])
def test_bad_config_values_are_named(slices, tmp_path, dotted, message):
    assert_refused("main", slices, tmp_path, ConfigError, message, **dotted)


def test_validation_volumes_without_tumour(slices, tmp_path):
    data = break_dataset(slices, tmp_path)
    for label in (data / "labels").iterdir():
        Image.fromarray(np.zeros((32, 32), dtype=np.uint8)).save(label)
    assert_refused("main", data, tmp_path, DataError, "validation volumes .* have no tumour")


@pytest.mark.parametrize("dotted, message", [
    ({}, "weights is not set"),
    ({"weights": "nowhere.pt", "source": "x.png"}, "weights: no checkpoint file at nowhere.pt"),
    ({"weights": "WEIGHTS"}, "source is not set"),
    ({"weights": "WEIGHTS", "source": "missing.png"}, "source missing.png does not exist"),
    ({"weights": "WEIGHTS", "source": "EMPTY"}, "holds no images"),
    ({"weights": "WEIGHTS", "source": "SLICE"}, "w.pt could not be read as a medseg checkpoint"),
])
def test_bad_predict_inputs_are_named(slices, tmp_path, dotted, message):
    (tmp_path / "w.pt").write_bytes(b"")
    (tmp_path / "empty").mkdir()
    replace = {"WEIGHTS": str(tmp_path / "w.pt"), "EMPTY": str(tmp_path / "empty"),
               "SLICE": str(first_slice(slices))}
    dotted = {k: replace.get(v, v) for k, v in dotted.items()}
    with pytest.raises(MedsegError, match=message):
        run("predict", slices, tmp_path, **dotted)
    assert not (tmp_path / "predictions").exists()


@pytest.mark.parametrize("dotted, message", [
    ({}, "weights is not set; give the checkpoint to evaluate"),
    ({"weights": "nowhere.pt"}, "weights: no checkpoint file at nowhere.pt"),
    ({"weights": "WEIGHTS"}, "w.pt could not be read as a medseg checkpoint"),
])
def test_bad_evaluate_inputs_are_named(slices, tmp_path, dotted, message):
    (tmp_path / "w.pt").write_bytes(b"")
    dotted = {k: str(tmp_path / "w.pt") if v == "WEIGHTS" else v for k, v in dotted.items()}
    with pytest.raises(MedsegError, match=message):
        run("evaluate", slices, tmp_path, **dotted)


# ----------------------------------------------------------------------------- config effects
def probe_loader(config):
    train, val = lung.dataset.split(dataset_path=config["dataset_path"])
    transform = lung.augmentation.make_transform(config["training"]["image_size"], train=False)
    path = config["dataset_path"]
    train_loader, val_loader = make_loaders(lung.dataset.open(train, transform, dataset_path=path),
                                            lung.dataset.open(val, transform, dataset_path=path),
                                            loader_settings(config, config["seed"]),
                                            torch.device("cpu"))
    train_loader.set_epoch(1)
    return (train_loader.batch_size, train_loader.num_workers, val_loader.batch_size,
            [int(i) for i in next(iter(train_loader))["slice"]])


def probe_split(config):
    _, val = lung.dataset.split(dataset_path=config["dataset_path"])
    return sorted({r.volume for r in val})


def probe_input(config):
    """What the network is fed: a training item's image shape, and the channels the model
    built for the run takes."""
    train, _ = lung.dataset.split(dataset_path=config["dataset_path"])
    transform = lung.augmentation.make_transform(config["training"]["image_size"], train=False)
    item = lung.dataset.open(train, transform, dataset_path=config["dataset_path"])[0]
    net = lung.model.make_model(in_channels=lung._in_channels(config["dataset"]["context_slices"]))
    first = next(m for m in net.modules() if isinstance(m, torch.nn.Conv2d))
    return tuple(item["image"].shape), first.in_channels


def probe_cleanup(config):
    """Validation of a 'model' that finds an 8 x 8 tumour and leaves a 2-voxel speck across
    two slices (volume 'v')."""
    class Speck(torch.nn.Module):
        def forward(self, x):
            logits = torch.zeros(x.shape[0], 2, *x.shape[2:])
            logits[:, 1, 0, 0] = 10.0
            logits[0, 1, 8:16, 8:16] = 10.0
            return logits

    mask = torch.zeros(2, 1, 32, 32)
    mask[0, 0, 8:16, 8:16] = 1
    batch = {"image": torch.zeros(2, 1, 32, 32), "mask": mask, "volume": ["v", "v"],
             "slice": torch.tensor([0, 1])}
    scores = lung._task(config).validate(Speck(), [batch], torch.device("cpu"),
                                         lung.training.device_and_precision()[1])
    return round(scores["tumor_dice_pooled"], 4)


def probe_schedule(config):
    return schedule_observation(config)


def probe_model(config):
    torch.manual_seed(0)
    net = lung.model.make_model()
    net.train()
    out = net(torch.ones(2, 1, 32, 32))
    outputs = out if isinstance(out, list) else [out]
    dropouts = sorted({m.p for m in net.modules() if isinstance(m, torch.nn.Dropout)})
    return (type(net).__name__, sum(p.numel() for p in net.parameters()), len(outputs), dropouts)


def probe_transform(config):
    transform = lung.augmentation.make_transform(config["training"]["image_size"], train=True)
    set_rnd(transform, 7)
    yy, xx = np.mgrid[:40, :40]
    mask = ((yy - 15) ** 2 + (xx - 12) ** 2 <= 30).astype(np.float32)
    image = (0.2 + 0.4 * xx / 40 + 0.4 * mask).astype(np.float32)
    out = transform({"image": image[None], "mask": mask[None]})
    # Weighted by position and by brightness, so flips and contrast about the mean show too.
    ramp = torch.linspace(0, 1, out["image"].shape[-1], dtype=torch.float64)
    image = out["image"].double()
    return (tuple(out["image"].shape), round(float((image * ramp).sum()), 3),
            round(float((image ** 2).sum()), 3), round(float((out["mask"] * ramp).sum()), 3))


def probe_loss(config):
    torch.manual_seed(0)
    loss = lung.loss.make_loss(deep_supervision=False)
    target = torch.zeros(2, 1, 16, 16)
    target[:, :, 4:8, 4:8] = 1
    total, terms = loss(torch.randn(2, 2, 16, 16), target)
    return round(float(total), 6), sorted(terms)


def probe_ema(config):
    torch.manual_seed(0)
    net = torch.nn.Linear(2, 2)
    callbacks = lung._callbacks(net, config)
    if not callbacks:
        return "no EMA"

    class Steps:
        model = net

    for _ in range(5):
        with torch.no_grad():
            net.weight.add_(1.0)
        callbacks[0].on_optimizer_step(Steps)
    return round(float(callbacks[0].module.weight.detach().sum()), 5)


def probe_precision(config):
    device, precision = lung.training.device_and_precision()
    return str(device), precision.name


def probe_generate(config):
    import nibabel as nib

    try:
        lung.generate_msd(config["msd_dir"], config["task"])
    except MedsegError as error:
        return f"error: {error}".replace(config["msd_dir"], "MSD")
    task = Path(config["msd_dir"]) / config["task"]
    volumes = sorted((task / "imagesTr").iterdir())
    first = np.asarray(nib.load(volumes[0]).dataobj)
    labels = [int(np.asarray(nib.load(p).dataobj).sum())
              for p in sorted((task / "labelsTr").iterdir())]
    root = Path(config["msd_dir"]).parent
    written = sorted(str(p.parent.relative_to(root)) for p in root.rglob("dataset.json"))
    return len(volumes), first.shape, round(float(first.std()), 2), labels, written


def probe_convert(config):
    try:
        lung.convert(config["msd_dir"], config["task"], config["dataset_path"])
    except MedsegError as error:
        return f"error: {error}".replace(config["dataset_path"], "OUT")
    images = sorted((Path(config["dataset_path"]) / "images").iterdir())
    return [p.name for p in images], int(np.asarray(Image.open(images[0]), dtype=np.int64).sum())


def probe_config(config):
    return copy.deepcopy(dict(config))


BUILD_PROBES = {
    "loader": probe_loader, "split": probe_split, "input": probe_input, "cleanup": probe_cleanup, "schedule": probe_schedule,
    "model": probe_model, "transform": probe_transform, "loss": probe_loss, "ema": probe_ema,
    "precision": probe_precision, "generate": probe_generate,
    "convert": probe_convert, "config": probe_config,
}


def run_metrics(run, tmp):
    path = tmp / "runs" / str(run._id) / "metrics.json"
    return json.loads(path.read_text()) if run._id else {}


def run_info(run, tmp):
    return json.loads((tmp / "runs" / str(run._id) / "info.json").read_text())


RUN_PROBES = {
    "epochs": lambda run, tmp: run.result["epochs_run"],
    "grad_norm_logged": lambda run, tmp: "train_grad_norm" in run_metrics(run, tmp),
    "optimizer_steps": lambda run, tmp: run_metrics(run, tmp)["train_loss"]["steps"],
    "best": lambda run, tmp: (run.result["best_epoch"], run.result["monitor"]),
    "artifacts": lambda run, tmp: sorted(json.loads(
        (tmp / "runs" / str(run._id) / "run.json").read_text())["artifacts"]),
    "captured_bar": lambda run, tmp: shows_progress_bar(run.captured_out),
    "checkpoint_files": lambda run, tmp: sorted(
        str(p.relative_to(tmp)) for p in tmp.rglob("*.pt")),
    "checkpoint_keys": lambda run, tmp: sorted(load_checkpoint(next(tmp.rglob("last.pt")))),
    "resumed": lambda run, tmp: run_info(run, tmp).get("resumed_from", {}).get("epoch"),
    "dataset_info": lambda run, tmp: run_info(run, tmp)["dataset"]["splits"],
    "checkpoint_info": lambda run, tmp: "checkpoint_paths" in run_info(run, tmp),
    "overfit": lambda run, tmp: (run.result["steps"], run.result["slices"],
                                 round(run.result["loss"], 5)),
    "predict": lambda run, tmp: (json.loads(Path(run.result).read_text().replace(str(tmp), "TMP")),
                                 sorted(str(p.relative_to(tmp)) for p in
                                        Path(run.result).parent.rglob("*.png"))),
}

SCHEDULE = {"training.num_epochs": 6}
SGD, PLATEAU, ONECYCLE = ({**SCHEDULE, "optimizer.type": "sgd"},
                          {**SCHEDULE, "optimizer.lr_scheduler": "reduce_on_plateau"},
                          {**SCHEDULE, "optimizer.lr_scheduler": "onecycle"})
STALL = {"training.num_epochs": 3, "training.learning_rate": 1e-12, "training.monitor": "val_loss",
         "training.monitor_mode": "min"}
EVERY_STEP = {"logging.log_frequency": 1}
GENERATE = {"msd_dir": "TMP/msd", "synthetic.num_volumes": 2, "synthetic.volume_size": [32, 32, 16]}
CONVERT = {"msd_dir": "MSD_ROOT", "dataset_path": "TMP/converted"}
EMA = {"training.ema": True}
OVERFIT = {"overfit.steps": 4, "overfit.target_dice": 1.0}
PREDICT = {"weights": "CHECKPOINT_1", "source": "A_SLICE", "threshold": 0.5}


def augmentation_effects() -> dict:
    """Each augmentation entry against its transform switched on (probabilities start at 0)."""
    probabilities = [k for k in lung.augmentation.fields if k.endswith("probability")]
    off = {f"augmentation.{k}": 0.0 for k in probabilities}
    groups = {"affine_probability": ("rotate_degrees", "scale_range", "translate"),
              "elastic_probability": ("elastic_spacing", "elastic_magnitude"),
              "grid_distortion_probability": ("grid_distortion_limit",),
              "brightness_contrast_probability": ("brightness_limit", "contrast_limit"),
              "noise_probability": ("noise_std",),
              "coarse_dropout_probability": ("coarse_dropout_holes", "coarse_dropout_size")}
    changes = {"rotate_degrees": 60.0, "scale_range": [0.5, 0.6], "translate": 0.3,
               "elastic_spacing": 0.3, "elastic_magnitude": [0.05, 0.1],
               "grid_distortion_limit": 0.8, "brightness_limit": 0.6, "contrast_limit": 0.7,
               "noise_std": 0.3, "coarse_dropout_holes": 1, "coarse_dropout_size": 0.4}
    effects = {f"augmentation.{p}": ("transform", off, {f"augmentation.{p}": 1.0})
               for p in probabilities}
    for probability, names in groups.items():
        on = {**off, f"augmentation.{probability}": 1.0}
        if probability == "brightness_contrast_probability":
            on.update({"augmentation.brightness_limit": 0.0, "augmentation.contrast_limit": 0.0})
        for name in names:
            effects[f"augmentation.{name}"] = ("transform", on,
                                               {f"augmentation.{name}": changes[name]})
    effects["augmentation.enabled"] = ("transform", {"augmentation.flip_probability": 1.0},
                                       {"augmentation.enabled": False})
    return effects


EFFECTS = {
    "seed": ("loader", {}, {"seed": 12345}),
    "dataset_path": ("run:dataset_info", {}, {"dataset_path": "OTHER_DATASET"}),
    "msd_dir": ("generate", GENERATE, {"msd_dir": "TMP/msd_elsewhere"}),
    "task": ("generate", GENERATE, {"task": "Task099_Other"}),
    "weights": ("predict", PREDICT, {"weights": "CHECKPOINT_2"}),
    "source": ("predict", PREDICT, {"source": "ANOTHER_SLICE"}),
    "threshold": ("predict", PREDICT, {"threshold": 0.001}),
    "min_tumor_voxels": ("cleanup", {}, {"min_tumor_voxels": 3}),
    "save_overlay": ("predict", PREDICT, {"save_overlay": True}),
    "predict_dir": ("predict", PREDICT, {"predict_dir": "TMP/elsewhere"}),
    "synthetic.num_volumes": ("generate", GENERATE, {"synthetic.num_volumes": 3}),
    "synthetic.volume_size": ("generate", GENERATE, {"synthetic.volume_size": [32, 32, 20]}),
    "synthetic.tumor_free_fraction": ("generate", {**GENERATE, "synthetic.num_volumes": 3},
                                     {"synthetic.tumor_free_fraction": 1.0}),
    "synthetic.max_tumors": ("generate", {**GENERATE, "synthetic.num_volumes": 4,
                                         "synthetic.tumor_free_fraction": 0.0,
                                         "synthetic.volume_size": [64, 64, 16]},
                            {"synthetic.max_tumors": 6}),
    "synthetic.noise_std": ("generate", GENERATE, {"synthetic.noise_std": 80.0}),
    "synthetic.seed": ("generate", GENERATE, {"synthetic.seed": 5}),
    "synthetic.overwrite": ("generate:twice", GENERATE, {"synthetic.overwrite": True}),
    "dataset.seed": ("convert", {**CONVERT, "dataset.empty_slice_fraction": 0.5},
                     {"dataset.seed": 5}),
    "dataset.overwrite": ("convert:twice", CONVERT, {"dataset.overwrite": True}),
    "dataset.window_center": ("convert", CONVERT, {"dataset.window_center": 0.0}),
    "dataset.window_width": ("convert", CONVERT, {"dataset.window_width": 400.0}),
    "dataset.empty_slice_fraction": ("convert", CONVERT, {"dataset.empty_slice_fraction": 1.0}),
    "dataset.val_fraction": ("split", {}, {"dataset.val_fraction": 0.5}),
    "dataset.split_seed": ("split", {}, {"dataset.split_seed": 7}),
    "dataset.context_slices": ("input", {}, {"dataset.context_slices": 2}),
    "model.architecture": ("model", {}, {"model.architecture": "unet"}),
    "model.channels": ("model", {}, {"model.channels": [4, 8, 16, 32]}),
    "model.dropout": ("model", {}, {"model.dropout": 0.2}),
    "model.deep_supervision": ("model", {}, {"model.deep_supervision": True}),
    "loss.type": ("loss", {}, {"loss.type": "dice"}),
    **augmentation_effects(),
    "optimizer.type": ("schedule", SCHEDULE, {"optimizer.type": "sgd"}),
    "optimizer.weight_decay": ("schedule", SCHEDULE, {"optimizer.weight_decay": 0.0}),
    "optimizer.momentum": ("schedule", SGD, {"optimizer.momentum": 0.5}),
    "optimizer.lr_scheduler": ("schedule", SCHEDULE, {"optimizer.lr_scheduler": "none"}),
    "optimizer.min_lr": ("schedule", SCHEDULE, {"optimizer.min_lr": 1e-3}),
    "optimizer.plateau_factor": ("schedule", {**PLATEAU, "optimizer.plateau_patience": 0},
                                 {"optimizer.plateau_factor": 0.1}),
    "optimizer.plateau_patience": ("schedule", PLATEAU, {"optimizer.plateau_patience": 0}),
    "optimizer.max_lr": ("schedule", ONECYCLE, {"optimizer.max_lr": 0.05}),
    "training.batch_size": ("loader", {}, {"training.batch_size": 3}),
    "training.val_batch_size": ("loader", {}, {"training.val_batch_size": 1}),
    "training.learning_rate": ("schedule", SCHEDULE, {"training.learning_rate": 1e-2}),
    "training.num_epochs": ("run:epochs", {}, {"training.num_epochs": 2}),
    "training.early_stopping_patience": ("run:epochs", STALL,
                                         {"training.early_stopping_patience": 1}),
    "training.gradient_clip_norm": ("run:grad_norm_logged", EVERY_STEP,
                                    {"training.gradient_clip_norm": 1.0}),
    "training.num_workers": ("loader", {}, {"training.num_workers": 1}),
    "training.warmup_epochs": ("schedule", SCHEDULE, {"training.warmup_epochs": 2}),
    "training.gradient_accumulation_steps": ("run:optimizer_steps", EVERY_STEP,
                                             {"training.gradient_accumulation_steps": 2}),
    "training.memory_cleanup_frequency": ("run:cleanups", {},
                                          {"training.memory_cleanup_frequency": 1}),
    "training.mixed_precision": ("precision", {}, {"training.mixed_precision": "bf16"}),
    "training.device": ("precision", {}, {"training.device": "cuda" if not torch.cuda.is_available()
                                          else "cpu"}),
    "training.monitor": ("run:best", STALL, {"training.monitor": "val_tumor_dice",
                                             "training.monitor_mode": "max"}),
    "training.monitor_mode": ("run:best", {**STALL, "training.learning_rate": 5e-3},
                              {"training.monitor_mode": "max"}),
    "training.image_size": ("transform", {}, {"training.image_size": [16, 16]}),
    "training.ema": ("run:checkpoint_keys", {}, {"training.ema": True}),
    "training.ema_decay": ("ema", EMA, {"training.ema_decay": 0.5}),
    "training.ema_ramp_steps": ("ema", EMA, {"training.ema_ramp_steps": 0}),
    "overfit.samples": ("overfit", OVERFIT, {"overfit.samples": 2}),
    "overfit.steps": ("overfit", OVERFIT, {"overfit.steps": 6}),
    "overfit.learning_rate": ("overfit", OVERFIT, {"overfit.learning_rate": 0.05}),
    "overfit.target_dice": ("overfit", {**OVERFIT, "overfit.steps": 30,
                                        "overfit.learning_rate": 3e-3},
                            {"overfit.target_dice": 0.001}),
    "logging.log_frequency": ("run:optimizer_steps", EVERY_STEP, {"logging.log_frequency": 2}),
    "logging.visualize_predictions": ("run:artifacts", {}, {"logging.visualize_predictions": True}),
    "logging.progress_bar": ("run:captured_bar", {}, {"logging.progress_bar": True}),
    "checkpoint.save_dir": ("run:checkpoint_files", {},
                            {"checkpoint.save_dir": "TMP/elsewhere/{run_id}"}),
    "checkpoint.save_frequency": ("run:checkpoint_files", {}, {"checkpoint.save_frequency": 1}),
    "checkpoint.keep_best_only": ("run:checkpoint_files", {}, {"checkpoint.keep_best_only": True}),
    "checkpoint.keep_periodic": ("run:checkpoint_files", {"training.num_epochs": 3,
                                                          "checkpoint.save_frequency": 1},
                                 {"checkpoint.keep_periodic": 1}),
    "checkpoint.resume": ("run:resumed", {"training.num_epochs": 2},
                          {"checkpoint.resume": "CHECKPOINT_1"}),
    "tracking.max_artifact_mb": ("run:checkpoint_info", {}, {"tracking.max_artifact_mb": 0}),
}


def test_every_config_entry_has_an_effect_row(slices, tmp_path):
    _probe["function"] = probe_config
    config = ex.run("effect_probe", config_updates=quick_updates(slices, tmp_path, {}),
                    options={"--capture": "sys"}).result
    own = sorted(key for key in flatten(config) if not shared_tracking_entry(key) or key in EFFECTS)
    assert sorted(EFFECTS) == own
    assert sorted(EFFECTS) == sorted(key for key in ex.known_entries()
                                     if not shared_tracking_entry(key) or key in EFFECTS)


@pytest.fixture(scope="module")
def checkpoints(slices, tmp_path_factory):
    """Two different checkpoints of the tiny model (after epochs 1 and 2)."""
    tmp = tmp_path_factory.mktemp("effect_checkpoints")
    ex.run("main", config_updates=quick_updates(slices, tmp, {"training.num_epochs": 2,
                                                               "checkpoint.save_frequency": 1}),
           options={"--capture": "sys"})
    folder = next((tmp / "checkpoints").iterdir()) / "weights"
    return folder / "epoch_1.pt", folder / "epoch_2.pt"


@pytest.fixture(scope="module")
def other_dataset(slices, tmp_path_factory):
    """The same slices without the first volume."""
    other = tmp_path_factory.mktemp("other") / "dataset"
    for folder in ("images", "labels"):
        (other / folder).mkdir(parents=True)
        for path in (slices / folder).iterdir():
            if not path.name.startswith("lung_001"):
                (other / folder / path.name).write_bytes(path.read_bytes())
    return other


def observe(probe, dotted, tmp, data, substitutions, monkeypatch):
    """The probe's observation, or the message of the error the config gave."""
    try:
        return _observe(probe, dotted, tmp, data, substitutions, monkeypatch)
    except MedsegError as error:
        return f"error: {error}".replace(str(tmp), "TMP")


def _observe(probe, dotted, tmp, data, substitutions, monkeypatch):
    monkeypatch.delenv("MEDSEG_MONGO_URL", raising=False)
    dotted = {k: substitute(v, tmp, substitutions) for k, v in dotted.items()}
    updates = quick_updates(data, tmp, dotted)
    kind, _, name = probe.partition(":")
    if kind in ("run", "overfit", "predict"):
        cleanups = []
        monkeypatch.setattr(trainer_module, "cleanup_memory", lambda device: cleanups.append(1))
        command = {"run": "main", "overfit": "overfit", "predict": "predict"}[kind]
        result = ex.run(command, config_updates=updates, options={"--capture": "sys"})
        return len(cleanups) if name == "cleanups" else RUN_PROBES[name or kind](result, tmp)
    if kind == "generate":
        updates["tracking"]["observer"] = "none"
    if kind in ("generate", "convert") and name == "twice":
        _probe["function"] = BUILD_PROBES[kind]
        ex.run("effect_probe", config_updates=updates, options={"--capture": "sys"})
    _probe["function"] = BUILD_PROBES[kind]
    return ex.run("effect_probe", config_updates=updates, options={"--capture": "sys"}).result


@pytest.mark.slow
@pytest.mark.parametrize("key", sorted(EFFECTS))
def test_entry_changes_what_the_user_observes(key, slices, msd_root, tmp_path, checkpoints,
                                              other_dataset, monkeypatch):
    probe, base, alternative = EFFECTS[key]
    substitutions = {"CHECKPOINT_1": checkpoints[0], "CHECKPOINT_2": checkpoints[1],
                     "OTHER_DATASET": other_dataset, "MSD_ROOT": msd_root,
                     "A_SLICE": first_slice(slices),
                     "ANOTHER_SLICE": sorted((slices / "images").iterdir())[-1]}
    default = observe(probe, base, tmp_path / "base", slices, substitutions, monkeypatch)
    changed = observe(probe, {**base, **alternative}, tmp_path / "changed", slices,
                      substitutions, monkeypatch)
    assert default != changed, f"{key}: {default!r}"


def test_a_refused_config_leaves_the_experiment_usable(slices, tmp_path):
    with pytest.raises(ConfigError):
        run("main", slices, tmp_path, **{"loss.type": "focal"})
    _probe["function"] = probe_config
    assert run("effect_probe", slices, tmp_path).result["loss"]["type"] == "dice_bce"


@pytest.mark.parametrize("content, message", [
    (None, "config file .*absent.yaml does not exist"),
    ("training: [1\n", "config file .*bad.yaml could not be read"),
    ("- 1\n- 2\n", "config file .*list.yaml must hold a mapping of config entries, found list"),
])
def test_config_files_that_cannot_be_used(tmp_path, content, message):
    name = {None: "absent", "training: [1\n": "bad"}.get(content, "list")
    path = tmp_path / f"{name}.yaml"
    if content is not None:
        path.write_text(content)
    with pytest.raises(ConfigError, match=message):
        ex.run("print_config", named_configs=[str(path)], options={"--unobserved": True})


def test_unknown_entry_that_sacred_would_only_warn_about(slices, tmp_path):
    # `train` is an argument of a captured function, so Sacred itself only logs a warning.
    with pytest.raises(ConfigError, match="unknown config entry training.train"):
        run("main", slices, tmp_path, **{"training.train": True})
