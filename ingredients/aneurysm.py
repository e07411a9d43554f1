"""The aneurysm-cubes experiment's config checks and the folder of its cross-validations.

They speak config keys and run before a command starts (``experiments/aneurysm_cubes.py``'s
config validator); what the commands do is the library's (``medseg.tasks.aneurysm``,
``medseg.tasks.aneurysm_cv``).
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

from ingredients.checkpoint import run_directory
from ingredients.checks import check_monitor
from medseg.data.prepare_cubes import check_prediction_input
from medseg.errors import ConfigError
from medseg.tasks.aneurysm import METRICS

EXPERIMENT = "aneurysm_cubes"


def check_crop(config: Mapping[str, Any], downsampling: int) -> None:
    """The training crop fits in a cube and is divisible by the model's ``downsampling``."""
    crop, cube = config["augmentation"]["crop_size"], config["dataset"]["cube_shape"]
    if any(c_ > s for c_, s in zip(crop, cube)):
        raise ConfigError(f"augmentation.crop_size {crop} is larger than dataset.cube_shape "
                          f"{cube}; the crop is cut out of a cube")
    if any(size % downsampling for size in crop):
        raise ConfigError(f"augmentation.crop_size {crop} must be divisible by {downsampling} on "
                          f"every axis: model.strides {config['model']['strides']} downsample "
                          "by that")


def check_cube_monitor(config: Mapping[str, Any]) -> None:
    """``training.monitor`` is a validation metric, and defined on the validation cubes."""
    check_monitor(config, [f"val_{name}" for name in METRICS])
    monitor = config["training"]["monitor"]
    if config["dataset"]["only_positive_val"] and monitor in ("val_auc", "val_neg_accuracy"):
        raise ConfigError(f"training.monitor={monitor!r} is undefined with "
                          "dataset.only_positive_val (no negative validation cubes)")


def check_predict(config: Mapping[str, Any]) -> None:
    """``predict_checkpoints`` and ``predict_input`` name files that ``predict`` can read."""
    if not config["predict_checkpoints"]:
        raise ConfigError("predict_checkpoints is empty; give one checkpoint or the five fold "
                          "checkpoints, e.g. predict_checkpoints=[checkpoints/.../best_model.pth]")
    for path in config["predict_checkpoints"]:
        if not Path(path).is_file():
            raise ConfigError(f"predict_checkpoints: no checkpoint file at {path}")
    source = config["predict_input"]
    if source is None:
        raise ConfigError("predict_input is not set; give an NPZ cube or a NIfTI volume")
    if not Path(source).is_file():
        raise ConfigError(f"predict_input: no file at {source}")
    check_prediction_input(source)


def cv_root(config: Mapping[str, Any], cv_id: str) -> Path:
    """Where a cross-validation keeps its folds: the ``checkpoint.save_dir`` template with the
    run id replaced by ``cv_<cv_id>``."""
    return run_directory(config["checkpoint"]["save_dir"], EXPERIMENT, f"cv_{cv_id}")
