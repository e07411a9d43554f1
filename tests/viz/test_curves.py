"""training_curves.png: loss, the validation metrics and the learning rate per epoch."""

from __future__ import annotations

import matplotlib.pyplot as plt

from medseg.viz import curves

HISTORY = [{"epoch": e, "train_loss_epoch": 1 / e, "val_loss": 1.1 / e, "lr": 1e-3 / e,
            "val_tumor_dice": 0.1 * e, "val_tumor_iou": 0.05 * e, "val_pixel_accuracy": 0.9}
           for e in range(1, 4)]


def plotted_labels(monkeypatch, tmp_path, **kwargs) -> list[list[str]]:
    figures = []
    monkeypatch.setattr(curves.plt, "close", lambda figure: figures.append(figure))
    path = curves.plot_training_curves(HISTORY, tmp_path / "curves.png", **kwargs)
    assert path.read_bytes().startswith(b"\x89PNG")
    labels = [axis.get_legend_handles_labels()[1] for axis in figures[0].axes]
    plt.close(figures[0])
    return labels


def test_the_monitored_metric_alone_by_default(monkeypatch, tmp_path):
    labels = plotted_labels(monkeypatch, tmp_path, monitor="val_tumor_dice")
    assert labels == [["train_loss_epoch", "val_loss"], ["val_tumor_dice"], ["lr"]]


def test_more_metrics_beside_the_monitored_one(monkeypatch, tmp_path):
    labels = plotted_labels(monkeypatch, tmp_path, monitor="val_tumor_dice",
                            metrics=["val_tumor_dice", "val_tumor_iou", "val_pixel_accuracy"])
    assert labels[1] == ["val_tumor_dice", "val_tumor_iou", "val_pixel_accuracy"]
