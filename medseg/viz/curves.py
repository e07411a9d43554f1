"""Training curves from the per-epoch history the trainer keeps."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path

import matplotlib.pyplot as plt


def plot_training_curves(history: Sequence[Mapping[str, float]], path: str | Path,
                         monitor: str | None = None, metrics: Sequence[str] = ()) -> Path:
    """Loss (train and validation), the monitored metric with ``metrics`` beside it, and the
    learning rate per epoch."""
    path = Path(path)
    epochs = [row["epoch"] for row in history]
    figure, axes = plt.subplots(1, 3, figsize=(15, 4))
    _plot(axes[0], epochs, history, ["train_loss_epoch", "val_loss"], "loss")
    metric = monitor if monitor and monitor != "val_loss" else _first_metric(history)
    shown = list(dict.fromkeys([metric, *metrics] if metric else metrics))
    if shown:
        _plot(axes[1], epochs, history, shown, "validation metrics" if len(shown) > 1 else metric)
    _plot(axes[2], epochs, history, ["lr"], "learning rate")
    axes[2].set_yscale("log")
    figure.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, dpi=100)
    plt.close(figure)
    return path


def _first_metric(history: Sequence[Mapping[str, float]]) -> str | None:
    names = [k for k in history[0] if k.startswith("val_") and k != "val_loss"] if history else []
    return names[0] if names else None


def _plot(axis, epochs, history, names, title) -> None:
    for name in names:
        values = [row.get(name, float("nan")) for row in history]
        axis.plot(epochs, values, marker="o", markersize=3, label=name)
    axis.set_title(title)
    axis.set_xlabel("epoch")
    axis.grid(alpha=0.3)
    axis.legend()


def plot_series(x: Sequence[float], y: Sequence[float], path: str | Path, *, xlabel: str,
                ylabel: str, title: str, baseline: float | None = None,
                baseline_label: str = "baseline") -> Path:
    """One line of ``y`` against ``x`` (and a horizontal baseline), saved as a PNG."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    figure, axis = plt.subplots(figsize=(5, 3.5))
    axis.plot(list(x), list(y), marker="o")
    if baseline is not None:
        axis.axhline(baseline, color="grey", linestyle="--", label=baseline_label)
        axis.legend()
    axis.set(xlabel=xlabel, ylabel=ylabel, title=title, ylim=(0, 1))
    axis.set_xticks(list(x))
    figure.tight_layout()
    figure.savefig(path, dpi=100)
    plt.close(figure)
    return path
