"""Prediction overlays: image slices with ground-truth and predicted masks."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path

import matplotlib.pyplot as plt
import numpy as np
from matplotlib import colormaps
from scipy.ndimage import binary_erosion


def _label_map(masks: np.ndarray) -> np.ndarray:
    """[S, H, W] binary masks -> [H, W] label image (0 background, s+1 structure s)."""
    labels = np.zeros(masks.shape[1:], dtype=np.int32)
    for index in range(masks.shape[0]):
        labels[masks[index] > 0.5] = index + 1
    return labels


def _overlay(axis, image: np.ndarray, masks: np.ndarray, title: str) -> None:
    axis.imshow(image, cmap="gray")
    labels = np.ma.masked_equal(_label_map(masks), 0)
    axis.imshow(labels, cmap=colormaps["tab20"], vmin=1, vmax=20, alpha=0.5,
                interpolation="nearest")
    axis.set_title(title, fontsize=9)
    axis.axis("off")


def central_slice(volume: np.ndarray, masks: np.ndarray | None = None) -> int:
    """The slice (last axis) with the most foreground, or the middle one."""
    if masks is not None and masks.sum() > 0:
        return int(np.argmax(masks.reshape(-1, masks.shape[-1]).sum(axis=0)))
    return volume.shape[-1] // 2


def plot_segmentation_panel(image: np.ndarray, true_masks: np.ndarray, pred_masks: np.ndarray,
                            path: str | Path, *, attention: np.ndarray | None = None,
                            structure_names: Sequence[str] = (), title: str = "") -> Path:
    """One case: image, ground truth, prediction and (optionally) the attention maps; axis 0
    of a slice runs down the page (anterior at the top for the generated data).

    ``image`` [H, W, D]; masks and attention [S, H, W, D]; the slice with most foreground.
    A 2D case (``image`` [H, W], masks [S, H, W]) is drawn as a volume of one slice.
    """
    path = Path(path)
    if image.ndim == 2:
        image, true_masks = image[..., None], true_masks[..., None]
        pred_masks = pred_masks[..., None]
        attention = None if attention is None else attention[..., None]
    k = central_slice(image, true_masks)
    columns = 3 + (1 if attention is not None else 0)
    figure, axes = plt.subplots(1, columns, figsize=(4 * columns, 4.2))
    axes[0].imshow(image[..., k], cmap="gray")
    axes[0].set_title(f"image (slice {k})" if image.shape[-1] > 1 else "image", fontsize=9)
    axes[0].axis("off")
    _overlay(axes[1], image[..., k], true_masks[..., k], "ground truth")
    _overlay(axes[2], image[..., k], pred_masks[..., k], "prediction")
    if attention is not None:
        axes[3].imshow(attention[..., k].max(axis=0), cmap="magma", vmin=0, vmax=1)
        axes[3].set_title("attention (max over structures)", fontsize=9)
        axes[3].axis("off")
    if title:
        figure.suptitle(title, fontsize=10)
    figure.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, dpi=90)
    plt.close(figure)
    return path


def plot_attention_maps(attention: np.ndarray, path: str | Path, structure_names: Sequence[str],
                        image: np.ndarray | None = None) -> Path:
    """Each structure's attention map on the central slice, in a grid; ``attention`` [S, H, W, D]
    and ``image`` [H, W, D], or [S, H, W] and [H, W] for a 2D case."""
    path = Path(path)
    if attention.ndim == 3:
        attention = attention[..., None]
        image = None if image is None else image[..., None]
    count = attention.shape[0]
    columns = min(count, 5)
    rows = int(np.ceil(count / columns))
    k = attention.shape[-1] // 2 if image is None else central_slice(image)
    figure, axes = plt.subplots(rows, columns, figsize=(3 * columns, 3 * rows), squeeze=False)
    for index, axis in enumerate(axes.flat):
        axis.axis("off")
        if index >= count:
            continue
        if image is not None:
            axis.imshow(image[..., k], cmap="gray")
        axis.imshow(attention[index, ..., k], cmap="magma", vmin=0, vmax=1,
                    alpha=0.6 if image is not None else 1.0)
        name = structure_names[index] if index < len(structure_names) else str(index)
        axis.set_title(name, fontsize=8)
    figure.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, dpi=80)
    plt.close(figure)
    return path


def plot_metric_bars(values: Mapping[str, float], path: str | Path, title: str) -> Path:
    """A horizontal bar per structure (NaN shown as an empty bar)."""
    path = Path(path)
    names = list(values)
    figure, axis = plt.subplots(figsize=(7, 0.35 * len(names) + 1.2))
    axis.barh(names, [0 if np.isnan(v) else v for v in values.values()], color="tab:blue")
    axis.set_xlim(0, 1)
    axis.invert_yaxis()
    axis.set_title(title)
    axis.grid(axis="x", alpha=0.3)
    figure.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, dpi=90)
    plt.close(figure)
    return path


def plot_prediction_grid(panels: Sequence[tuple[np.ndarray, np.ndarray, np.ndarray, str]],
                         path: str | Path) -> Path:
    """2D slices in columns, with rows image / ground truth / prediction.

    ``panels``: ``(image [H, W], true mask [H, W], predicted mask [H, W], title)`` each.
    """
    path = Path(path)
    columns = max(len(panels), 1)
    figure, axes = plt.subplots(3, columns, figsize=(2.6 * columns, 8), squeeze=False)
    for column, (image, truth, pred, title) in enumerate(panels):
        axes[0, column].imshow(image, cmap="gray")
        axes[0, column].set_title(title, fontsize=7)
        _overlay(axes[1, column], image, truth[None], "ground truth")
        _overlay(axes[2, column], image, pred[None], "prediction")
    for axis in axes.flat:
        axis.axis("off")
    figure.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, dpi=90)
    plt.close(figure)
    return path


def mask_overlay_rgb(image: np.ndarray, mask: np.ndarray, *, colour=(255, 40, 40),
                     alpha: float = 0.45) -> np.ndarray:
    """A grey image [H, W] (uint8) with ``mask`` [H, W] tinted and outlined: RGB uint8."""
    grey = np.repeat(image.astype(np.float32)[..., None], 3, axis=-1)
    mask = mask.astype(bool)
    tinted = grey.copy()
    tinted[mask] = (1 - alpha) * grey[mask] + alpha * np.asarray(colour, dtype=np.float32)
    outline = mask & ~binary_erosion(mask)
    tinted[outline] = colour
    return np.clip(tinted, 0, 255).astype(np.uint8)
