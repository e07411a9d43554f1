"""TensorBoard logging through ``torch.utils.tensorboard`` (the ``tensorboard`` package).

:class:`TensorBoardReporter` is a :class:`~medseg.engine.reporting.Reporter` that passes every
scalar to another reporter (the Sacred run) and also writes it to one of two event folders,
training or validation, under the tag a pipeline's users know (``Loss/batch``,
``Loss/epoch_val`` ...). :class:`TensorBoardImages` adds per-epoch parameter and gradient
histograms and validation image triplets (image, label, prediction); the triplets also go to
the wrapped reporter as PNGs.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from torch.utils.tensorboard import SummaryWriter

from medseg.engine.reporting import Reporter
from medseg.engine.trainer import Callback, Trainer
from medseg.viz.triplets import plot_triplets


def writable_folder(path: str | Path) -> bool:
    """Whether ``path`` exists as a writable folder or could be created (its nearest existing
    parent is a writable folder)."""
    path = Path(path).expanduser().absolute()
    for candidate in (path, *path.parents):
        if candidate.exists():
            return candidate.is_dir() and os.access(candidate, os.W_OK | os.X_OK)
    return False


class TensorBoardReporter:
    """Scalars to ``inner`` and to TensorBoard. ``tags`` maps a scalar's name to
    ``(writer, tag)`` with writer ``"train"`` or ``"val"`` (a name may map to several tags);
    names not in ``tags`` go to the validation writer when they start with ``val_``, else to
    the training writer, under their own name."""

    def __init__(self, inner: Reporter, train_dir: str | Path, val_dir: str | Path,
                 tags: Mapping[str, list[tuple[str, str]]] | None = None) -> None:
        self.inner = inner
        self.writers = {"train": SummaryWriter(str(train_dir)), "val": SummaryWriter(str(val_dir))}
        self.tags = dict(tags or {})

    def log_scalar(self, name: str, value: float, step: int) -> None:
        self.inner.log_scalar(name, value, step)
        default = [("val" if name.startswith("val_") else "train", name)]
        for writer, tag in self.tags.get(name, default):
            self.writers[writer].add_scalar(tag, float(value), step)

    def add_artifact(self, path: str | Path, name: str | None = None) -> None:
        self.inner.add_artifact(path, name)

    def set_info(self, key: str, value: Any) -> None:
        self.inner.set_info(key, value)

    def add_text(self, tag: str, text: str) -> None:
        self.writers["train"].add_text(tag, text)

    def add_hparams(self, hparams: Mapping[str, Any]) -> None:
        """The run's settings as ``hparams/json`` text (the original's) and in the HPARAMS
        tab (scalars and strings only)."""
        self.add_text("hparams/json", json.dumps(hparams, indent=2, default=str))
        flat = {k: v if isinstance(v, (int, float, str, bool)) else str(v)
                for k, v in hparams.items()}
        self.writers["train"].add_hparams(flat, {}, run_name=".")

    def flush(self) -> None:
        for writer in self.writers.values():
            writer.flush()

    def close(self) -> None:
        for writer in self.writers.values():
            writer.close()


class TensorBoardImages(Callback):
    """After each epoch: ``Params/<name>`` and ``Grads/<name>`` histograms (the gradients of
    the epoch's last step), and ``val/img/i``, ``val/lbl/i``, ``val/pred/i`` of the first
    validation batch from the trainer's ``task.triplets``; the triplets also as
    ``output_dir/val_images_epoch_NNN.png`` artifacts of the wrapped reporter."""

    def __init__(self, reporter: TensorBoardReporter, output_dir: str | Path) -> None:
        self.reporter = reporter
        self.output_dir = Path(output_dir)
        self._grads: dict[str, torch.Tensor] = {}

    def on_before_optimizer_step(self, trainer: Trainer) -> None:
        if (trainer.global_step + 1) % max(len(trainer.train_loader), 1) == 0:
            self._grads = {name: p.grad.detach().float().cpu()
                           for name, p in trainer.model.named_parameters() if p.grad is not None}

    def on_epoch_end(self, trainer: Trainer, epoch: int, metrics) -> None:
        writer = self.reporter.writers["train"]
        for name, parameter in trainer.model.named_parameters():
            writer.add_histogram(f"Params/{name}", parameter.detach().float().cpu(), epoch)
        for name, grad in self._grads.items():
            writer.add_histogram(f"Grads/{name}", grad, epoch)
        self._images(trainer, epoch)
        self.reporter.flush()

    def _images(self, trainer: Trainer, epoch: int) -> None:
        batch = next(iter(trainer.val_loader), None)
        if batch is None:
            return
        model = trainer.model
        model.eval()
        triplets = trainer.task.triplets(model, batch, trainer.device)
        model.train()
        writer = self.reporter.writers["val"]
        for index, (image, label, prediction) in enumerate(triplets):
            for kind, picture in (("img", image), ("lbl", label), ("pred", prediction)):
                writer.add_image(f"val/{kind}/{index}", picture.float()[None].clamp(0, 1),
                                 epoch)
        path = plot_triplets(triplets, self.output_dir / f"val_images_epoch_{epoch:03d}.png",
                             title=f"epoch {epoch}")
        self.reporter.add_artifact(path)
