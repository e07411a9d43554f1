"""SMALabeller's config: the original's command-line arguments as top-level entries, its
``config`` dict as the ``config`` group, and groups for what its code fixed (crops, BatchNorm
calibration, early stopping, checkpoints, TensorBoard) and for the generator (``synthetic``).

The functions below turn a merged config into the library's arguments (no captured closures:
every value's origin is visible at the call).
"""

from __future__ import annotations

import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from ingredients.distributed import check_launch
from ingredients.fields import Field, FieldIngredient, may_change_on_resume
from ingredients.tracking import SacredReporter, link_checkpoint_directory
from ingredients.training import FIELDS as TRAINING_FIELDS
from ingredients.tune import trial_callbacks
from medseg import config as c
from medseg.data.mri_transforms import CACHE_MODES
from medseg.data.nifti_pairs import CasePair, check_pairs, find_pairs, split_pairs
from medseg.data.synthetic.smalabeller import BrainSettings
from medseg.engine import distributed
from medseg.engine.checkpoint import CheckpointManager
from medseg.engine.precision import resolve_device, resolve_precision
from medseg.engine.tensorboard import TensorBoardImages, TensorBoardReporter, writable_folder
from medseg.errors import ConfigError, DataError
from medseg.tasks.smalabeller import (CHECKPOINT_KEYS, DIMENSIONS, LOSSES, SMALabellerSettings,
                                      fit)

#: The original's command-line arguments (argparse flags and the positional comment).
ARGUMENT_FIELDS = {
    "unet_dimensions": Field("2D", c.choice(*DIMENSIONS),
                             "'2D' (slice-wise U-Net) or '3D' (volumetric U-Net)"),
    "num_workers": Field(8, c.integer(minimum=0), "DataLoader worker processes"),
    "batch_size": Field(2, c.integer(minimum=1),
                        "Volumes per batch (each gives data.crops_per_volume crops)"),
    "epochs": Field(1, c.integer(minimum=1), "Training epochs"),
    "training_images": Field("data/sma/imagesTr_resampled", c.text(),
                             "Folder of <case>_0000.nii.gz images"),
    "training_labels": Field("data/sma/labelsTr_resampled", c.text(),
                             "Folder of <case>.nii.gz binary labels"),
    "tb_prefix": Field("SMALabeller", c.text(),
                       "Folder under runs_dir for TensorBoard logs and checkpoints"),
    "val_set_size": Field(0.2, c.number(above=0, maximum=0.999),
                          "Fraction of the cases for validation (0 < v < 1)"),
    "comment": Field("cconelea", c.text(), "Suffix of the TensorBoard folder names"),
    "runs_dir": Field("~/runs", c.text(),
                      "Root of <tb_prefix>/<timestamp>-trn_cls-<comment>, -val_cls- and "
                      "<timestamp>/checkpoints"),
    "data_dir": Field("data/sma", c.text(), "generate_data: where the synthetic cases go"),
}

CONFIG_FIELDS = {
    "lr": Field(2.3173e-5, c.number(above=0),
                "AdamW starting learning rate: OneCycleLR starts at lr (div_factor = max_lr / lr)"),
    "max_lr": Field(5.1206e-3, c.number(above=0), "OneCycleLR peak learning rate"),
    "loss_function": Field("cross_entropy", c.choice(*LOSSES),
                           "'dice', 'cross_entropy' (BCE with logits) or 'combination' "
                           "(Dice + BCE)"),
    "augmentations": Field(True, c.boolean(),
                           "Random crops and the augmentation list for training "
                           "(off: whole volumes)"),
    "dropout_rate": Field(0.45012, c.number(minimum=0, maximum=0.99),
                          "Dropout probability of the U-Net's encoder blocks"),
}

DATA_FIELDS = {
    "crop_size": Field([128, 128, 64], c.sequence(c.integer(minimum=4), length=3),
                       "Foreground-aware random crop size [H, W, D] (with augmentations)"),
    "crops_per_volume": Field(3, c.integer(minimum=1),
                              "Crops per volume (half centred on foreground), flattened "
                              "into the batch"),
    "spacing": Field([1.0, 1.0, 1.0], c.sequence(c.number(above=0), length=3),
                     "Voxel size in mm the volumes are resampled to"),
    "split_seed": Field(42, c.integer(minimum=0), "random_state of the train/validation split"),
    "cache": Field("memory", c.choice(*CACHE_MODES),
                   "Preprocessed cases: 'memory' (CacheDataset), 'disk' "
                   "(PersistentDataset), 'none'"),
    "cache_dir": Field("cache/smalabeller", c.text(), "PersistentDataset folder (cache='disk')"),
}

MODEL_FIELDS = {
    "channels": Field(None, c.optional(c.sequence(c.integer(minimum=1), min_length=2)),
                      "Features per U-Net level (null: 64..1024 in 2D, 64..512 in 3D)"),
    "initial_foreground": Field(0.01, c.number(above=0, maximum=0.5),
                                "Foreground probability the untrained U-Net predicts everywhere "
                                "(output bias = its logit); 0.5: zero bias, the original's"),
}

BN_FIELDS = {
    "enabled": Field(True, c.boolean(), "Recompute BatchNorm statistics before each validation"),
    "warmup_batches": Field(8, c.integer(minimum=1), "Training batches forwarded to calibrate"),
    "slice_batch": Field(16, c.integer(minimum=1),
                         "Slices (2D) or volumes (3D) per calibration forward"),
}

EARLY_STOPPING_FIELDS = {
    "patience": Field(15, c.integer(minimum=0),
                      "Epochs without a lower validation loss before stopping (0: never)"),
}

CHECKPOINT_FIELDS = {
    "period": Field(5, c.integer(minimum=0), "Epochs between periodic_####.pth (0: none)"),
    "keep_periodic": Field(3, c.integer(minimum=1), "Newest periodic checkpoints kept"),
    "resume": Field(None, c.optional(c.text()), "Checkpoint (last.pth ...) to continue from"),
}

ENGINE_FIELDS = {
    "device": TRAINING_FIELDS["device"],
    "mixed_precision": TRAINING_FIELDS["mixed_precision"],
    "distributed_backend": TRAINING_FIELDS["distributed_backend"],
    "distributed_timeout": TRAINING_FIELDS["distributed_timeout"],
    "log_frequency": Field(1, c.integer(minimum=1), "Optimizer steps between batch scalars"),
    "progress_bar": Field(True, c.boolean(), "Show tqdm progress bars"),
}

TENSORBOARD_FIELDS = {
    "enabled": Field(True, c.boolean(), "Write TensorBoard event files"),
}

SYNTHETIC_FIELDS = {
    "num_cases": Field(12, c.integer(minimum=2), "generate_data: cases written"),
    "image_size": Field([64, 64], c.sequence(c.integer(minimum=16), length=2),
                        "generate_data: in-plane size (1 mm voxels)"),
    "depth_range": Field([28, 40], c.number_range(minimum=8),
                         "generate_data: head height in mm (varies per case)"),
    "slice_spacings": Field([1.0, 1.5, 2.0], c.sequence(c.number(minimum=0.5), min_length=1),
                            "generate_data: slice thicknesses drawn from"),
    "noise_std": Field(0.03, c.number(minimum=0), "generate_data: Gaussian noise"),
    "seed": Field(0, c.integer(minimum=0), "generate_data: random seed"),
    "overwrite": Field(False, c.boolean(), "generate_data: replace a non-empty data_dir"),
}


#: Entries a resumed run may change (``checkpoint.resume`` among them): where outputs go, how
#: long to train, workers, device and logging. What shapes the training (data, model, loss,
#: the schedule's rates, calibration) must stay the checkpoint's.
RESUMABLE = {"epochs", "num_workers", "runs_dir", "tb_prefix", "comment", "data_dir",
             "early_stopping.patience", "training.device", "training.distributed_backend",
             "training.distributed_timeout",
             "training.log_frequency",
             "training.progress_bar", "tensorboard.enabled", "checkpoint.period",
             "checkpoint.keep_periodic", "checkpoint.resume"}


def resumable(fields: Mapping[str, Field], prefix: str = "") -> dict[str, Field]:
    """``fields`` with the :data:`RESUMABLE` ones marked as such."""
    return {name: may_change_on_resume(field) if f"{prefix}{name}" in RESUMABLE else field
            for name, field in fields.items()}


def group(name: str, fields: Mapping[str, Field], **defaults: Any) -> FieldIngredient:
    return FieldIngredient(name, resumable(fields, f"{name}."), defaults)


def settings(config: Mapping[str, Any]) -> SMALabellerSettings:
    """The library's settings from a merged config."""
    cfg, data = config["config"], config["data"]
    return SMALabellerSettings(
        unet_dimensions=config["unet_dimensions"], epochs=config["epochs"],
        batch_size=config["batch_size"], num_workers=config["num_workers"], lr=cfg["lr"],
        max_lr=cfg["max_lr"], loss_function=cfg["loss_function"],
        augmentations=cfg["augmentations"], dropout_rate=cfg["dropout_rate"],
        channels=config["model"]["channels"],
        initial_foreground=config["model"]["initial_foreground"], crop_size=data["crop_size"],
        crops_per_volume=data["crops_per_volume"], spacing=data["spacing"], cache=data["cache"],
        cache_dir=data["cache_dir"], bn_calibration=config["bn_calibration"]["enabled"],
        warmup_batches=config["bn_calibration"]["warmup_batches"],
        slice_batch=config["bn_calibration"]["slice_batch"],
        patience=config["early_stopping"]["patience"],
        log_frequency=config["training"]["log_frequency"],
        progress_bar=config["training"]["progress_bar"], seed=config["seed"])


def brain_settings(config: Mapping[str, Any]) -> BrainSettings:
    synthetic = config["synthetic"]
    return BrainSettings(tuple(synthetic["image_size"]), tuple(synthetic["depth_range"]),
                         tuple(synthetic["slice_spacings"]), synthetic["noise_std"],
                         synthetic["seed"])


def split(config: Mapping[str, Any]) -> tuple[list[CasePair], list[CasePair]]:
    pairs = find_pairs(config["training_images"], config["training_labels"])
    return split_pairs(pairs, config["val_set_size"], seed=config["data"]["split_seed"])


def check_training_inputs(config: Mapping[str, Any]) -> None:
    """Before a training run starts: the pairs, their split and contents, the output folder."""
    try:
        train, val = split(config)
    except DataError as error:
        raise DataError(f"{error} (training_images={config['training_images']}, "
                        f"training_labels={config['training_labels']}, "
                        f"val_set_size={config['val_set_size']})") from None
    check_pairs([*train, *val])
    check_launch(resolve_device(config["training"]["device"]),
                 config["training"]["distributed_backend"], config["batch_size"],
                 batch_key="batch_size")
    root = Path(config["runs_dir"]).expanduser() / config["tb_prefix"]
    if not writable_folder(root):
        raise ConfigError(f"runs_dir/tb_prefix: cannot write TensorBoard logs and checkpoints "
                          f"to {root}; expected a writable folder")
    resume = config["checkpoint"]["resume"]
    if resume is not None and not Path(resume).is_file():
        raise ConfigError(f"checkpoint.resume: no checkpoint file at {resume}")


def output_folders(config: Mapping[str, Any], resume: str | None = None) -> dict[str, Path]:
    """``train``/``val`` TensorBoard folders and the ``checkpoints`` folder of a new run
    (the original's layout, with the second of the start as timestamp); a resumed run keeps
    writing to the folders its checkpoint is in."""
    root = Path(config["runs_dir"]).expanduser() / config["tb_prefix"]
    if resume:
        stamp = Path(resume).resolve().parent.parent.name
    else:
        stamp = time.strftime("%Y-%m-%d_%H.%M.%S")
        base, suffix = stamp, 1
        while (root / stamp).exists():  # two runs started in the same second
            suffix += 1
            stamp = f"{base}_{suffix}"
    comment = config["comment"]
    return {"train": root / f"{stamp}-trn_cls-{comment}",
            "val": root / f"{stamp}-val_cls-{comment}",
            "checkpoints": root / stamp / "checkpoints"}


def checkpoint_manager(config: Mapping[str, Any], directory: Path) -> CheckpointManager:
    checkpoint = config["checkpoint"]
    return CheckpointManager(directory, save_frequency=checkpoint["period"],
                             keep_periodic=checkpoint["keep_periodic"], best_name="best.pth",
                             last_name="last.pth", periodic_name="periodic_{epoch:04d}.pth",
                             stored_keys=CHECKPOINT_KEYS)


#: Sacred scalar -> the original's TensorBoard tags.
TENSORBOARD_TAGS = {
    "train_loss": [("train", "Loss/batch")],
    "train_lr": [("train", "LR/batch")],
    "train_iter_time_s": [("train", "Time/iter_sec")],
    "train_grad_norm": [("train", "GradNorm/batch")],
    "train_loss_epoch": [("train", "Loss/epoch_train")],
    "lr": [("train", "LR/epoch")],
    "val_loss": [("val", "Loss/epoch_val")],
    "val_dice": [("val", "Dice/epoch_val")],
    "best_val_loss": [("val", "Checkpoint/best_val_loss"), ("val", "EarlyStopping/best_val_loss")],
    "patience_used": [("val", "EarlyStopping/patience_used")],
    "best_epoch": [("val", "EarlyStopping/best_epoch")],
}


def hyperparameters(config: Mapping[str, Any]) -> dict[str, Any]:
    """The original's ``hparams/json``: its config dict and its command-line arguments."""
    return {**{key: config[key] for key in ARGUMENT_FIELDS}, **config["config"]}


def train(run, config: Mapping[str, Any]) -> dict[str, Any]:
    """A training run: the pairs split, the output folders, the Sacred reporter (with
    TensorBoard beside it), then :func:`medseg.tasks.smalabeller.fit`."""
    train_pairs, val_pairs = split(config)
    resume = config["checkpoint"]["resume"]
    # torchrun: join the job (this rank's device); the folders are rank 0's, it alone writes.
    device = distributed.setup(resolve_device(config["training"]["device"]),
                               config["training"]["distributed_backend"],
                               config["training"]["distributed_timeout"])
    folders = distributed.from_main(output_folders(config, resume))
    link_checkpoint_directory(run, folders["checkpoints"])
    reporter = SacredReporter(run)
    reporter.set_info("dataset", {"train_cases": [p.case for p in train_pairs],
                                  "val_cases": [p.case for p in val_pairs],
                                  **check_pairs([*train_pairs, *val_pairs])})
    reporter.set_info("output_dirs", {name: str(path) for name, path in folders.items()})
    callbacks = []
    if config["tensorboard"]["enabled"] and distributed.is_main():
        reporter = TensorBoardReporter(reporter, folders["train"], folders["val"],
                                       TENSORBOARD_TAGS)
        reporter.add_hparams(hyperparameters(config))
        callbacks.append(TensorBoardImages(reporter, folders["checkpoints"].parent))
    precision = resolve_precision(config["training"]["mixed_precision"], device)
    reporter.set_info("precision", precision.name)
    try:
        outcome = fit(settings(config), train_pairs, val_pairs, reporter=reporter,
                      device=device, precision=precision,
                      checkpoints=checkpoint_manager(config, folders["checkpoints"]),
                      resume=resume, config=config,
                      callbacks=[*callbacks, *trial_callbacks(reporter)])
    finally:
        if isinstance(reporter, TensorBoardReporter):
            reporter.close()
    for name in ("best.pth", "last.pth"):
        path = folders["checkpoints"] / name
        if path.is_file() and path.stat().st_size <= config["tracking"]["max_artifact_mb"] * 2**20:
            reporter.add_artifact(path)
    return outcome.result
