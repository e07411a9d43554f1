"""Prediction overlays: image slices with ground-truth and predicted masks."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path

import matplotlib.pyplot as plt
import numpy as np
from matplotlib import colormaps


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
    """
    path = Path(path)
    k = central_slice(image, true_masks)
    columns = 3 + (1 if attention is not None else 0)
    figure, axes = plt.subplots(1, columns, figsize=(4 * columns, 4.2))
    axes[0].imshow(image[..., k], cmap="gray")
    axes[0].set_title(f"image (slice {k})", fontsize=9)
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
    """Each structure's attention map on the central slice, in a grid."""
    path = Path(path)
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
