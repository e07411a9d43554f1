"""The lung-tumour experiment's config checks (config keys; they run before a command starts,
from ``experiments/lung_tumor.py``'s config validator)."""

from __future__ import annotations

import logging
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from ingredients.checks import check_monitor
from ingredients.dataset import LUNG_FIELDS
from ingredients.fields import FieldIngredient
from ingredients.model import trained_model_config
from medseg.data.png_slices import SliceRecord
from medseg.engine.checkpoint import load_checkpoint
from medseg.errors import ConfigError, DataError
from medseg.tasks.lung_tumor import METRICS
from medseg.data.nifti import is_nifti
from medseg.tasks.lung_tumor_predict import find_sources, training_window

log = logging.getLogger("medseg")


def check_image_size_and_monitor(config: Mapping[str, Any], multiple: int) -> None:
    """``training.image_size`` is a multiple of ``multiple`` (the network's halvings), and
    ``training.monitor`` one of the validation metrics."""
    size = config["training"]["image_size"]
    if any(s % multiple for s in size):
        raise ConfigError(f"training.image_size {list(size)} must be multiples of {multiple} "
                          f"(the {len(config['model']['channels'])} levels of model.channels "
                          "halve it that often)")
    check_monitor(config, [f"val_{name}" for name in METRICS])


def check_validation_has_tumor(config: Mapping[str, Any], val: list[SliceRecord]) -> None:
    """Tumour Dice, the monitored metric, needs tumour in the validation volumes."""
    if not any(record.tumor_pixels for record in val):
        raise DataError(f"the validation volumes of {config['dataset_path']} "
                        f"({', '.join(sorted({r.volume for r in val}))}) have no tumour, so "
                        "tumour Dice is undefined; change dataset.split_seed or "
                        "dataset.val_fraction")


def check_weights(config: Mapping[str, Any], use: str = "predict with") -> None:
    """``weights`` names an existing file."""
    if config["weights"] is None:
        raise ConfigError(f"weights is not set; give the checkpoint to {use}, e.g. "
                          "weights=runs/lung_tumor/1/weights/best.pt")
    if not Path(config["weights"]).is_file():
        raise ConfigError(f"weights: no checkpoint file at {config['weights']}")


def check_predict_inputs(config: Mapping[str, Any], model: FieldIngredient) -> None:
    """``weights`` names a checkpoint of this pipeline, ``source`` something to predict on."""
    check_weights(config)
    if config["source"] is None:
        raise ConfigError("source is not set; give an image, a NIfTI volume or a folder, "
                          "e.g. source=image.png")
    find_sources(config["source"])
    trained = load_checkpoint(config["weights"]).get("config") or {}
    if trained.get("model") and set(trained["model"]) != set(model.fields):
        trained_model_config(model, config["model"], trained["model"], config["weights"],
                             "weights")  # another pipeline's checkpoint: refused up front


def trained_context_slices(config: Mapping[str, Any], weights: str) -> int:
    """The ``dataset.context_slices`` the checkpoint ``weights`` was trained with (0 for one
    written before the entry existed; the run's own without a stored config): its network
    takes that many neighbours, so ``predict`` and ``evaluate`` stack them so. One line says so
    when ``dataset.context_slices`` was set to another value."""
    trained = load_checkpoint(weights).get("config")
    given = config["dataset"]["context_slices"]
    if not trained:
        return given
    context = int((trained.get("dataset") or {}).get("context_slices", 0))
    if given != context and given != LUNG_FIELDS["context_slices"].default:
        log.warning("dataset.context_slices=%d is replaced by the checkpoint's %d: %s was "
                    "trained on %d neighbouring slices on each side", given, context, weights,
                    context)
    return context


def predict_window(config: Mapping[str, Any], sources: list[Path]) -> tuple[float, float]:
    """The CT window ``predict`` shows NIfTI volumes through: the one ``conversion.json`` of
    the checkpoint's training slices recorded at conversion, else ``dataset.window_center``
    and ``dataset.window_width``; one line says which when they differ (or none is recorded)
    and a volume is predicted."""
    current = (float(config["dataset"]["window_center"]),
               float(config["dataset"]["window_width"]))
    trained = load_checkpoint(config["weights"]).get("config")
    recorded = training_window(trained)
    if not any(is_nifti(path) for path in sources):
        return recorded[:2] if recorded else current
    if recorded is None:
        log.warning("predict: no conversion.json records the CT window the checkpoint's "
                    "training slices were converted with (dataset_path %s); windowing NIfTI "
                    "volumes with dataset.window_center=%g and dataset.window_width=%g",
                    (trained or {}).get("dataset_path"), *current)
        return current
    if recorded[:2] != current:
        log.warning("predict: windowing NIfTI volumes at centre %g, width %g HU as %s "
                    "recorded at conversion, not dataset.window_center=%g, "
                    "dataset.window_width=%g", recorded[0], recorded[1], recorded[2], *current)
    return recorded[:2]
