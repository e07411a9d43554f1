"""The Neuroverse3D pipeline's own ingredients: ``model``, ``augmentation`` and ``synthetic``
(generator settings, read by ``generate_data`` only).

Each is fields only; the experiment passes a section of the config to the library's builders
explicitly (``build_model(config["model"])``), so where every value comes from is visible at
the call site.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

from ingredients.fields import Field, FieldIngredient, SyntheticIngredient
from medseg import config as c
from medseg.data.episodes import (
    AugmentationSettings,
    EpisodeAugmentation,
    EpisodeSettings,
    select_tasks,
)
from medseg.data.nnunet import NnunetDataset, find_datasets
from medseg.data.staging import refuse_to_overwrite
from medseg.engine import distributed
from medseg.errors import ConfigError, DataError
from medseg.models.neuroverse3d import DEFAULT_CHANNELS, Neuroverse3D
from medseg.tasks.neuroverse3d import open_episode_data, read_weights

_probability = c.number(minimum=0, maximum=1)

MODEL_FIELDS = {
    "channels": Field(list(DEFAULT_CHANNELS), c.sequence(c.integer(minimum=1), min_length=2),
                      "Feature channels per level (the original: 32 64 128 256 512, 70.9 M "
                      "parameters); image_size must be a multiple of 2^(levels-1)"),
    "conv_layers_per_stage": Field(2, c.integer(minimum=1), "3-convolutions per residual unit"),
    "gs": Field(3, c.integer(minimum=1),
                "Mini-context size in training (the original's forward default, 3)"),
    "val_gs": Field(4, c.integer(minimum=1),
                    "Mini-context size in validation, evaluate and predict (memory only: the "
                    "prediction does not depend on it)"),
    "shuffle_groups": Field(True, c.boolean(),
                            "Visit mini-contexts in random order in training, so the group that "
                            "back-propagates is a random one"),
}


class Neuroverse3DModelIngredient(FieldIngredient):
    def __init__(self, **defaults: Any) -> None:
        super().__init__("model", MODEL_FIELDS, defaults)


def build_model(model: Mapping[str, Any], channels=None) -> Neuroverse3D:
    """The network of a ``model`` config section (``channels`` overrides, from a checkpoint)."""
    return Neuroverse3D(channels=list(channels or model["channels"]),
                        conv_layers_per_stage=model["conv_layers_per_stage"], gs=model["gs"],
                        shuffle_groups=model["shuffle_groups"])


AUGMENTATION_FIELDS = {
    "enabled": Field(True, c.boolean(), "Augment training episodes"),
    **{name: Field(getattr(AugmentationSettings(), name), _probability, doc) for name, doc in [
        ("flip", "Probability of a flip, per axis"),
        ("rotate90", "Probability of a 90-degree rotation, per plane"),
        ("resample", "Probability of keeping every 2nd-4th slice along one axis, stretched back"),
        ("intensity_shift", "Probability of an intensity shift (up to +-0.2)"),
        ("intensity_scale", "Probability of an intensity scaling (up to +-10%)"),
        ("noise", "Probability of Gaussian noise (std 0.02)"),
        ("elastic", "Probability of an elastic deformation (sigma 7-8, magnitude 100-200)"),
        ("invert_label", "Probability of inverting the labels (1 - label)"),
        ("invert_image", "Probability of inverting the images (1 - image)"),
        ("dilate", "Probability of dilating the labels (3x3x3)"),
        ("erode", "Probability of eroding the labels (3x3x3), when not dilated"),
        ("edge", "Probability of replacing the labels by their edges (Sobel)"),
        ("gin", "Probability of GIN: intensities remapped by a random shallow conv network "
                "(the original's gin_prob)"),
        ("volume_rotate90", "Probability of a 90-degree rotation of each volume on its own "
                            "(in datasets that volume_rotate90_datasets names)"),
    ]},
    "volume_rotate90_datasets": Field(
        AugmentationSettings().volume_rotate90_datasets, c.optional(c.text()),
        "volume_rotate90 applies to datasets whose name contains this text (the original: "
        "_syn_type, its synthetic sets); null: every dataset"),
}


class Neuroverse3DAugmentationIngredient(FieldIngredient):
    def __init__(self, **defaults: Any) -> None:
        super().__init__("augmentation", AUGMENTATION_FIELDS, defaults)


def build_augmentation(augmentation: Mapping[str, Any]) -> EpisodeAugmentation | None:
    if not augmentation["enabled"]:
        return None
    return EpisodeAugmentation(AugmentationSettings(
        **{k: v for k, v in augmentation.items() if k != "enabled"}))


SYNTHETIC_FIELDS = {
    "num_datasets": Field(4, c.integer(minimum=2),
                          "generate_data: datasets written (the last, ..._HeldOut, is for judging "
                          "in-context learning and is not trained on by the named configs)"),
    "cases_per_dataset": Field(12, c.integer(minimum=2), "generate_data: cases per dataset"),
    "volume_shape": Field([40, 48, 40], c.sequence(c.integer(minimum=8), length=3),
                          "generate_data: voxels per case (resized to image_size on loading)"),
    "structures": Field(4, c.integer(minimum=2, maximum=5),
                        "generate_data: labelled structures per case (labels 1..structures)"),
    "noise_std": Field(0.03, c.number(minimum=0), "generate_data: Gaussian noise (tissue ~0.45)"),
    "structure_radius": Field([0.16, 0.24], c.number_range(minimum=0.01),
                              "generate_data: range of a structure's radius, a fraction of the "
                              "volume's half-width (the brain's: ~0.8)"),
    "spacing": Field(1.2, c.number(above=0), "generate_data: voxel size (mm)"),
    "seed": Field(0, c.integer(minimum=0), "generate_data: random seed"),
    "overwrite": Field(False, c.boolean(), "generate_data: replace an existing data_dir"),
}


class Neuroverse3DSyntheticIngredient(SyntheticIngredient):
    def __init__(self, **defaults: Any) -> None:
        super().__init__(SYNTHETIC_FIELDS, defaults, generator="generate_data")


def _require_file(config, key: str, example: str) -> None:
    value = config[key]
    if value is None:
        raise ConfigError(f"{key} is not set; give it, e.g. {key}={example}")
    if not Path(value).is_file():
        raise ConfigError(f"{key}: no file at {value}")


def check_config(config: Mapping[str, Any], command_name: str) -> None:
    """The experiment's checks across entries, in config terms (they run before a run starts)."""
    levels = len(config["model"]["channels"])
    multiple = 2 ** (levels - 1)
    if any(s % multiple for s in config["image_size"]):
        raise ConfigError(f"image_size {list(config['image_size'])} must be multiples of {multiple} "
                          f"(the {levels} levels of model.channels halve it {levels - 1} times)")
    low, high = config["random_context_range"]
    if low > high:
        raise ConfigError(f"random_context_range must be [low, high] with low <= high, got {[low, high]}")
    if command_name == "generate_data":
        refuse_to_overwrite(config["data_dir"], config["synthetic"]["overwrite"],
                            "synthetic Neuroverse3D data", "synthetic.overwrite")
    if command_name == "prepare":
        if not Path(config["input_dir"]).is_dir():
            raise ConfigError(f"input_dir: {config['input_dir']} is not a folder")
        refuse_to_overwrite(config["output_dir"], config["overwrite"], "nnU-Net dataset")
    if command_name == "main":
        _check_training(config)
    if command_name == "predict":
        _require_file(config, "weights", "checkpoints/neuroverse3d/1/best.ckpt")
        _require_file(config, "target", "case_000_0000.nii.gz")
        if config["context_dir"] is None:
            raise ConfigError("context_dir is not set; give an nnU-Net dataset folder of context "
                              "pairs, e.g. context_dir=data/neuroverse3d/Dataset004_HeldOut")
        NnunetDataset.open(config["context_dir"])
    if command_name == "evaluate":
        _require_file(config, "weights", "checkpoints/neuroverse3d/1/best.ckpt")
        _tasks(config, "eval_datasets")


def _tasks(config, key: str):
    try:
        available = find_datasets(config["data_dir"])
    except DataError as error:
        raise ConfigError(f"data_dir: {error}") from None
    try:
        return select_tasks(available, config[key], None)
    except DataError as error:
        raise ConfigError(f"{key}: {error}") from None


def _check_training(config) -> None:
    if config["stage"] == 2 and not config["weights"] and not config["checkpoint"]["resume"]:
        raise ConfigError("stage=2 continues from a stage-1 checkpoint: set weights=PATH (e.g. "
                          "weights=checkpoints/neuroverse3d/1/best.ckpt)")
    if config["weights"] is not None:
        _require_file(config, "weights", "checkpoints/neuroverse3d/1/best.ckpt")
        _, channels = read_weights(config["weights"])
        if channels is not None and list(channels) != list(config["model"]["channels"]):
            raise ConfigError(f"weights: {config['weights']} is a Neuroverse3D with channels "
                              f"{list(channels)}, but model.channels is "
                              f"{list(config['model']['channels'])}; set model.channels to match")
    random = config["stage"] == 2 and config["random_context_probability"] > 0
    processes = distributed.world_size()  # torchrun: each process takes its share
    if random and config["training"]["batch_size"] > processes:
        each = "1" if processes == 1 else f"{processes} (one per process under torchrun)"
        raise ConfigError(f"training.batch_size must be {each} in stage 2: its episodes have "
                          "different context sizes and cannot share a batch (got "
                          f"{config['training']['batch_size']})")
    tasks = _tasks(config, "datasets")
    rate = config["sample_rate"]
    names = config["datasets"] or sorted({t.dataset.name for t in tasks})
    if isinstance(rate, (list, tuple)) and len(rate) != len(names):
        raise ConfigError(f"sample_rate gives {len(rate)} weights for {len(names)} datasets "
                          f"({', '.join(names)}); give one per datasets entry")


def episode_settings(config: Mapping[str, Any]) -> EpisodeSettings:
    """Stage 2 draws L from random_context_range; stage 1 (and validation) use context_size."""
    random = config["stage"] == 2 and config["random_context_probability"] > 0
    return EpisodeSettings(context_size=config["context_size"],
                           random_context_range=tuple(config["random_context_range"]) if random else None,
                           random_context_probability=config["random_context_probability"],
                           max_classes=config["max_classes"],
                           background_in_pool=config["background_in_pool"])


def open_episodes(config: Mapping[str, Any]) -> dict[str, Any]:
    """Training and validation episodes of a run's config (see :func:`open_episode_data`)."""
    return open_episode_data(
        config["data_dir"], image_size=config["image_size"], settings=episode_settings(config),
        datasets=config["datasets"], sample_rate=config["sample_rate"],
        val_fraction=config["val_fraction"], keep_rate=config["keep_rate"],
        episodes=config["episodes_per_epoch"],
        val_episodes=config["val_episodes"], seed=config["seed"],
        augmentation=build_augmentation(config["augmentation"]))
