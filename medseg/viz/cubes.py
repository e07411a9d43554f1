"""Figures for aneurysm cubes: training samples, predictions and ROC curves.

Volumes are [D, H, W] = (z, y, x); panels show the axial slice (y, x) where the mask (or the
prediction) is largest, and a maximum-intensity projection along z, which shows vessels and
sacs whatever slice they lie in.
"""

from __future__ import annotations

from pathlib import Path

import matplotlib.pyplot as plt
import numpy as np


def peak_slice(*volumes: np.ndarray) -> int:
    """The z index where the first non-empty volume has most mass, or the middle slice."""
    for volume in volumes:
        if volume is not None and volume.max() > 0:
            return int(np.argmax(volume.reshape(volume.shape[0], -1).sum(axis=1)))
    return volumes[0].shape[0] // 2


def _image(axis, image: np.ndarray, title: str, contour: np.ndarray | None = None) -> None:
    axis.imshow(image, cmap="gray")
    if contour is not None and contour.max() > 0.5:
        axis.contour(contour, levels=[0.5], colors="red", linewidths=1)
    axis.set_title(title, fontsize=9)
    axis.axis("off")


def _save(figure, path: str | Path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.tight_layout()
    figure.savefig(path, dpi=90)
    plt.close(figure)
    return path


def plot_cube_sample(volume: np.ndarray, mask: np.ndarray, crop: np.ndarray,
                     crop_mask: np.ndarray, path: str | Path, title: str = "") -> Path:
    """A training sample: the cube (slice and projection) with its mask, and the augmented
    crop the model sees with its mask."""
    k, kc = peak_slice(mask), peak_slice(crop_mask)
    figure, axes = plt.subplots(1, 4, figsize=(15, 4))
    _image(axes[0], volume[k], f"volume, slice {k}")
    axes[1].imshow(volume.max(axis=0), cmap="gray")
    axes[1].imshow(np.ma.masked_less_equal(mask.max(axis=0), 0), cmap="autumn", alpha=0.5,
                   vmin=0, vmax=1)
    axes[1].set_title("projection + mask", fontsize=9)
    axes[1].axis("off")
    _image(axes[2], crop[kc], f"augmented crop, slice {kc}", crop_mask[kc])
    _image(axes[3], crop.max(axis=0), "crop projection + mask", crop_mask.max(axis=0))
    if title:
        figure.suptitle(title, fontsize=10)
    return _save(figure, path)


def plot_cube_prediction(image: np.ndarray, mask: np.ndarray, probability: np.ndarray,
                         path: str | Path, title: str = "") -> Path:
    """A scored cube: the slice with most target (else most prediction), the target's
    outline, and the predicted probability."""
    k = peak_slice(mask, probability * (probability > 0.5))
    figure, axes = plt.subplots(1, 3, figsize=(12, 4.2))
    _image(axes[0], image[k], f"image, slice {k}")
    _image(axes[1], image.max(axis=0), "projection, target outline", mask.max(axis=0))
    shown = axes[2].imshow(probability.max(axis=0), cmap="magma", vmin=0, vmax=1)
    axes[2].set_title("predicted probability (max over z)", fontsize=9)
    axes[2].axis("off")
    figure.colorbar(shown, ax=axes[2], fraction=0.046)
    if title:
        figure.suptitle(title, fontsize=10)
    return _save(figure, path)


def plot_roc_curve(fpr: np.ndarray, tpr: np.ndarray, auc: float, path: str | Path,
                   title: str = "ROC") -> Path:
    figure, axis = plt.subplots(figsize=(4.5, 4.5))
    axis.plot(fpr, tpr, drawstyle="steps-post", label=f"AUC {auc:.3f}")
    axis.plot([0, 1], [0, 1], color="grey", linestyle=":")
    axis.set_xlabel("false-positive rate")
    axis.set_ylabel("true-positive rate")
    axis.set_title(title, fontsize=10)
    axis.legend(loc="lower right")
    axis.grid(alpha=0.3)
    return _save(figure, path)
