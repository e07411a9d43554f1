"""Rows of (image, label, prediction) slices, saved as one PNG."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402


def plot_triplets(triplets: Sequence[tuple], path: str | Path, *, title: str = "") -> Path:
    """``triplets``: (image, label, probability) 2D arrays or tensors; one row each."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    rows = max(len(triplets), 1)
    figure, axes = plt.subplots(rows, 3, figsize=(6, 2 * rows), squeeze=False)
    for row, triplet in enumerate(triplets):
        for column, (picture, name) in enumerate(zip(triplet, ("image", "label", "prediction"))):
            axes[row, column].imshow(_array(picture).T, cmap="gray", origin="lower",
                                     vmin=0, vmax=1)
            axes[row, column].set_axis_off()
            if row == 0:
                axes[row, column].set_title(name)
    if title:
        figure.suptitle(title)
    figure.tight_layout()
    figure.savefig(path, dpi=80)
    plt.close(figure)
    return path


def _array(picture):
    return picture.detach().float().cpu().numpy() if hasattr(picture, "detach") else picture
