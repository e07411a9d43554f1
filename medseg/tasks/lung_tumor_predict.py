"""Prediction with a trained lung-tumour model: single slices, folders of slices, NIfTI volumes.

- An image (PNG, JPEG, ...) is a slice already windowed to 8-bit grey, as ``convert`` writes
  them. Output: ``<name>_mask.png`` (0 / 255, the image's size) and, with overlays,
  ``<name>_overlay.png`` (the tumour tinted red and outlined).
- A NIfTI volume (``.nii`` / ``.nii.gz``) in HU is windowed as in conversion (the window that
  ``conversion.json`` of the training slices recorded: :func:`training_window`) and predicted
  slice by slice along its last axis. Output: ``<name>_mask.nii.gz`` (uint8 0 / 1, the
  volume's shape, affine and header) and, with overlays, ``<name>_overlays/slice_<k>.png``
  for each slice with predicted tumour.

Every source gives a line in ``predictions.json`` (tumour pixels, slices, volume in ml).

A model trained with ``context_slices=k`` (2.5D input) gets each slice with its ``k``
neighbours on each side, stacked as in training: in a volume the neighbouring slices along its
last axis, in a folder the images named ``<volume>_slice_<j>.png`` of the same volume; edge
slices are repeated, and an image whose name gives no volume and index is its own neighbour.

With ``min_component_voxels`` the predicted tumour components smaller than that many voxels
are removed, as validation does: over a NIfTI volume, over the images of one volume in a folder
(stacked in slice order), or within an image whose name gives no volume.
"""

from __future__ import annotations

import json
import logging
import shutil
from collections import defaultdict
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import nibabel as nib
import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, UnidentifiedImageError
from torch import nn

from medseg.data.msd import (
    CONVERSION_RECORD,
    from_display,
    read_conversion_record,
    read_scaled_volume,
    slice_to_image,
    to_display,
    window,
)
from medseg.data.nifti import is_nifti, nifti_stem
from medseg.data.png_slices import SLICE_NAME, context_indices
from medseg.data.slice_transforms import image_transform
from medseg.engine.checkpoint import rebuilt_model
from medseg.engine.precision import Precision
from medseg.errors import ConfigError, DataError, DiskFullError
from medseg.files import reporting_full_disk
from medseg.tasks.lung_tumor import remove_small_components, tumor_probability
from medseg.viz.overlays import mask_overlay_rgb

log = logging.getLogger("medseg")

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff")
PREDICTABLE_MODES = ("L", "RGB", "RGBA")


def find_sources(source: str | Path) -> list[Path]:
    """The file ``source``, or the images and NIfTI volumes directly inside the folder."""
    source = Path(source)
    if source.is_file():
        if not (is_nifti(source) or source.suffix.lower() in IMAGE_SUFFIXES):
            raise ConfigError(f"source {source} is neither an image "
                              f"({', '.join(IMAGE_SUFFIXES)}) nor a NIfTI volume (.nii, .nii.gz)")
        return [source]
    if not source.is_dir():
        raise ConfigError(f"source {source} does not exist; give an image, a NIfTI volume or a "
                          "folder of them")
    found = sorted(p for p in source.iterdir()
                   if p.is_file() and (is_nifti(p) or p.suffix.lower() in IMAGE_SUFFIXES))
    if not found:
        raise DataError(f"{source} holds no images ({', '.join(IMAGE_SUFFIXES)}) and no NIfTI "
                        "volumes")
    return found


def training_window(trained_config: dict[str, Any] | None) -> tuple[float, float, Path] | None:
    """The CT window (centre, width in HU) the training slices were converted with, and the
    ``conversion.json`` that recorded it: that of the ``dataset_path`` in a checkpoint's
    config. ``None`` when the config names no folder or the folder has no such record."""
    dataset_path = (trained_config or {}).get("dataset_path")
    if not dataset_path:
        return None
    record = read_conversion_record(dataset_path)
    if record is None or not {"window_center", "window_width"} <= set(record):
        return None
    return (float(record["window_center"]), float(record["window_width"]),
            Path(dataset_path) / CONVERSION_RECORD)


@dataclass
class SlicePredictor:
    """Tumour probabilities of grey slices at their own size."""

    model: nn.Module
    image_size: tuple[int, int]
    device: torch.device
    precision: Precision
    threshold: float = 0.5
    batch_size: int = 8
    context_slices: int = 0   # neighbours on each side stacked as channels (2.5D input)
    min_component_voxels: int = 0   # smaller predicted components are removed

    def __post_init__(self) -> None:
        self.transform = image_transform(self.image_size)
        self.model.to(self.device).eval()

    def stacks(self, slices: list[np.ndarray]) -> list[np.ndarray]:
        """The consecutive slices of one volume [H, W] -> each with its neighbours
        [2 * context_slices + 1, H, W] (edge slices repeated)."""
        return [np.stack([slices[j] for j in context_indices(
                    k, lambda j: 0 <= j < len(slices), self.context_slices)])
                for k in range(len(slices))]

    def probabilities(self, slices: list[np.ndarray]) -> list[np.ndarray]:
        """float32 slices in [0, 1], [H, W] or with neighbours [C, H, W] -> tumour
        probabilities [H, W] of the same sizes."""
        results = []
        for start in range(0, len(slices), self.batch_size):
            chunk = [s if s.ndim == 3 else s[None] for s in slices[start:start + self.batch_size]]
            batch = torch.stack([self.transform({"image": s})["image"] for s in chunk])
            with torch.no_grad(), self.precision.autocast():
                logits = self.model(batch.to(self.device))
            probability = tumor_probability(logits).float()
            for item, original in zip(probability, chunk):
                resized = F.interpolate(item[None], size=original.shape[1:], mode="bilinear",
                                        align_corners=False)
                results.append(resized[0, 0].cpu().numpy())
        return results

    def masks(self, slices: list[np.ndarray]) -> list[np.ndarray]:
        return [p > self.threshold for p in self.probabilities(slices)]


def read_grey(path: Path) -> np.ndarray:
    """An image as uint8 [H, W] grey."""
    try:
        with Image.open(path) as image:
            if image.mode not in PREDICTABLE_MODES:
                raise DataError(f"{path} is a {image.mode!r} image; expected 8-bit grey (mode L) "
                                "slices windowed as `convert` writes them, or RGB")
            return np.asarray(image.convert("L"))
    except (UnidentifiedImageError, OSError) as error:
        raise DataError(f"{path} could not be read as an image ({error})") from None


def image_neighbours(images: list[Path], context_slices: int) -> dict[Path, list[Path]]:
    """For each image, the images stacked as its channels: those of its volume
    ``<volume>_slice_<j>.png`` in its folder from ``j - context_slices`` to
    ``j + context_slices`` (edge slices repeated; an image given alone finds its neighbours
    too); itself alone without ``context_slices``, and in place of every neighbour when its
    name gives no volume and index."""
    named = {}
    folders = {path.parent for path in images} if context_slices else set()
    pool = [p for folder in sorted(folders) for p in sorted(folder.iterdir())
            if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES]
    for path in pool:
        if match := SLICE_NAME.match(path.name):
            named[(path.parent, match["volume"], int(match["index"]))] = path
    stacks, unnamed = {}, []
    for path in images:
        match = SLICE_NAME.match(path.name)
        if not context_slices or match is None:
            stacks[path] = [path] * (2 * context_slices + 1)
            if context_slices:
                unnamed.append(path.name)
            continue
        volume, index = (path.parent, match["volume"]), int(match["index"])
        stacks[path] = [named[(*volume, j)] for j in context_indices(
            index, lambda j: (*volume, j) in named, context_slices)]
    if unnamed:
        log.warning("predict: the checkpoint takes %d neighbouring slices on each side, but "
                    "%s do not follow <volume>_slice_<k>.png, so each is its own neighbour",
                    context_slices, ", ".join(unnamed[:3]) + (", ..." if len(unnamed) > 3 else ""))
    return stacks


def image_mask(predictor: SlicePredictor, path: Path,
               neighbours: list[Path] | None = None) -> np.ndarray:
    """The predicted tumour mask [H, W] of the image ``path`` (with ``neighbours`` as its
    channels when the model takes neighbouring slices)."""
    grey = read_grey(path)
    stack = [read_grey(p) if p != path else grey for p in (neighbours or [path])]
    if any(image.shape != grey.shape for image in stack):
        odd = next(p for p, image in zip(neighbours, stack) if image.shape != grey.shape)
        raise DataError(f"{odd} is not the size of its neighbour {path}; the slices stacked "
                        "for a model trained with context_slices must have one size")
    return predictor.masks([np.stack(stack).astype(np.float32) / 255.0])[0]


def clean_image_masks(masks: dict[Path, np.ndarray], min_voxels: int) -> dict[Path, np.ndarray]:
    """``masks`` of images without their small tumour components
    (:func:`~medseg.tasks.lung_tumor.remove_small_components`): the images named
    ``<volume>_slice_<k>.png`` of one volume stacked in slice order (3D components), any
    other image on its own (2D)."""
    if not min_voxels:
        return masks
    cleaned, volumes = {}, defaultdict(list)
    for path, mask in masks.items():
        match = SLICE_NAME.match(path.name)
        if match is None:
            cleaned[path] = remove_small_components(mask, min_voxels)
        else:
            volumes[(match["volume"], mask.shape)].append((int(match["index"]), path))
    for members in volumes.values():
        paths = [path for _, path in sorted(members)]
        stack = remove_small_components(np.stack([masks[p] for p in paths]), min_voxels)
        cleaned.update(zip(paths, stack))
    return cleaned


def write_image_prediction(path: Path, mask: np.ndarray, output_dir: Path,
                           save_overlay: bool) -> dict[str, Any]:
    name = nifti_stem(path)
    mask_path = output_dir / f"{name}_mask.png"
    Image.fromarray(mask.astype(np.uint8) * 255).save(mask_path)
    record = {"source": str(path), "mask": str(mask_path), "tumour_pixels": int(mask.sum())}
    if save_overlay:
        overlay_path = output_dir / f"{name}_overlay.png"
        Image.fromarray(mask_overlay_rgb(read_grey(path), mask)).save(overlay_path)
        record["overlay"] = str(overlay_path)
    return record


def predict_volume(predictor: SlicePredictor, path: Path, output_dir: Path, save_overlay: bool,
                   *, window_center: float, window_width: float) -> dict[str, Any]:
    hu, source = read_scaled_volume(path)
    # Slices as `convert` shows them (display orientation), the mask back in stored order.
    grey = window(to_display(hu, source.affine), window_center, window_width)
    slices = [slice_to_image(grey[:, :, k]) for k in range(grey.shape[2])]
    masks = predictor.masks(predictor.stacks([s.astype(np.float32) / 255.0 for s in slices]))
    masks = list(remove_small_components(np.stack(masks), predictor.min_component_voxels))
    volume = from_display(np.stack([slice_to_image(m) for m in masks], axis=-1),
                          source.affine).astype(np.uint8)
    name = nifti_stem(path)
    header = source.header.copy()
    header.set_data_dtype(np.uint8)
    header.set_slope_inter(1, 0)
    mask_path = output_dir / f"{name}_mask.nii.gz"
    nib.save(nib.Nifti1Image(volume, source.affine, header), mask_path)
    tumor_slices = [k for k, m in enumerate(masks) if m.any()]  # display order
    voxel_ml = float(np.prod(source.header.get_zooms()[:3])) / 1000.0
    record = {"source": str(path), "mask": str(mask_path), "tumour_voxels": int(volume.sum()),
              "tumour_slices": tumor_slices, "tumour_volume_ml": round(volume.sum() * voxel_ml, 3)}
    if save_overlay:
        folder = output_dir / f"{name}_overlays"
        folder.mkdir(exist_ok=True)
        for k in tumor_slices:
            overlay = mask_overlay_rgb(slices[k], masks[k])
            Image.fromarray(overlay).save(folder / f"slice_{k:04d}.png")
        record["overlays"] = str(folder)
    return record


def run_prediction(predictor: SlicePredictor, sources: list[Path], output_dir: str | Path, *,
                   save_overlay: bool, window_center: float, window_width: float,
                   provenance: dict[str, Any] | None = None) -> Path:
    """Predict every source into ``output_dir``; return the path of ``predictions.json``, which
    also holds ``provenance`` (the checkpoint used, ...)."""
    output_dir = Path(output_dir)
    consequence = "the predictions this command had written were removed"
    with reporting_full_disk(output_dir, consequence):
        output_dir.mkdir(parents=True, exist_ok=True)
    existing = set(output_dir.rglob("*"))
    try:
        with reporting_full_disk(output_dir, consequence):
            records = []
            images = [p for p in sources if not is_nifti(p)]
            neighbours = image_neighbours(images, predictor.context_slices)
            # Every image's mask first: a volume's slices are cleaned together.
            masks = clean_image_masks({p: image_mask(predictor, p, neighbours[p]) for p in images},
                                      predictor.min_component_voxels)
            for path in sources:
                if is_nifti(path):
                    records.append(predict_volume(predictor, path, output_dir, save_overlay,
                                                  window_center=window_center,
                                                  window_width=window_width))
                else:
                    records.append(write_image_prediction(path, masks[path], output_dir,
                                                          save_overlay))
            summary = output_dir / "predictions.json"
            summary.write_text(json.dumps({**(provenance or {}), "threshold": predictor.threshold,
                                           "image_size": list(predictor.image_size),
                                           "context_slices": predictor.context_slices,
                                           "min_tumor_voxels": predictor.min_component_voxels,
                                           "predictions": records}, indent=1))
    except DiskFullError:  # half the outputs and no predictions.json: none of them, then
        for path in sorted(set(output_dir.rglob("*")) - existing, reverse=True):
            if path.is_dir():
                shutil.rmtree(path, ignore_errors=True)
            else:
                path.unlink(missing_ok=True)
        raise
    return summary


def predict_with_checkpoint(weights: str | Path, sources: list[Path], output_dir: str | Path, *,
                            build: Callable[[dict[str, Any] | None], nn.Module],
                            image_size: Sequence[int], threshold: float, save_overlay: bool,
                            window_center: float, window_width: float, device: torch.device,
                            precision: Precision, context_slices: int = 0,
                            min_component_voxels: int = 0) -> Path:
    """:func:`run_prediction` with the network of the checkpoint ``weights``: ``build`` gets
    the model config stored in it (``None`` when it has none) and the slices are resized to
    the size it was trained at (its ``training.image_size``, else ``image_size``), each with
    ``context_slices`` neighbours on each side (what the checkpoint was trained with), and
    predicted components smaller than ``min_component_voxels`` removed."""
    model, state = rebuilt_model(weights, build)
    trained_size = ((state.get("config") or {}).get("training") or {}).get("image_size")
    predictor = SlicePredictor(model, tuple(trained_size or image_size), device, precision,
                               threshold=threshold, context_slices=context_slices,
                               min_component_voxels=min_component_voxels)
    return run_prediction(predictor, sources, output_dir, save_overlay=save_overlay,
                          window_center=window_center, window_width=window_width,
                          provenance={"weights": str(weights), "epoch": state.get("epoch"),
                                      "window_center": window_center,
                                      "window_width": window_width})
