"""How the lung-tumour model trains and is scored on 2D slices, its figures, and the overfit
sanity check.

Tumour Dice is reported the three ways users compare it (a slice, a volume or a pixel as the
unit), each ``2 TP / (2 TP + FP + FN)``:

- ``tumor_dice_pooled`` (also ``tumor_dice``, the monitored default): over every validation
  pixel at once, so a slice without tumour adds its false positives instead of an undefined
  Dice of its own. The seed's ``SegmentationMetrics`` accumulates one confusion matrix over
  the validation batches, so its reported Dice is most likely this one.
- ``tumor_dice_per_volume``: each validation volume's Dice over all its slices, averaged over
  the volumes where it is defined (tumour in the label or in the prediction; a volume
  without tumour and without predicted tumour counts for nothing).
- ``tumor_dice_per_slice``: each slice's Dice averaged over the slices whose label holds
  tumour (false positives on slices without tumour do not count).

With ``min_component_voxels`` (:func:`remove_small_components`) each validation volume's
predicted tumour is cleaned before any of them is counted: its slices are stacked in slice order
and the 3D connected components smaller than that many voxels are removed, the specks a
slice-wise model leaves on vessel cross-sections and noise. A tumour-free volume with one such
speck scores a per-volume Dice of 0; cleaned, it counts for nothing.

Under torchrun each rank scores its share of the validation batches; the ranks' pixel counts
(pooled and per volume: a volume's slices may lie on several ranks) are added before any
Dice is computed, so the figures are one process's.
"""

from __future__ import annotations

import json
import math
from collections import defaultdict
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from scipy import ndimage
from torch import nn
from torch.utils.data import Dataset

from medseg.data.png_slices import PNGSliceDataset, scan_slices, slice_images
from medseg.data.slice_transforms import slice_transforms
from medseg.engine.evaluation import (EvaluationReport, LossMeter, ShardedValidation,
                                     validation_pass)
from medseg.engine.precision import Precision
from medseg.engine.reporting import Reporter
from medseg.engine.trainer import StepOutput, image_mask_step
from medseg.errors import DataError
from medseg.viz.overlays import plot_prediction_grid, plot_segmentation_panel

TUMOR = 1
METRICS = ("loss", "tumor_dice", "tumor_dice_pooled", "tumor_dice_per_volume",
           "tumor_dice_per_slice", "tumor_iou", "pixel_accuracy")
#: ``tumor_dice`` is ``tumor_dice_pooled`` under the name runs have always had (and monitor).
CURVE_METRICS = tuple(name for name in METRICS if name not in ("loss", "tumor_dice"))


def centre_channel(image: torch.Tensor) -> torch.Tensor:
    """The slice itself of an input [..., C, H, W] that may hold its neighbours too (the
    middle channel of ``2 * context_slices + 1``)."""
    return image[..., image.shape[-3] // 2, :, :]


def tumor_probability(logits: torch.Tensor) -> torch.Tensor:
    """Logits [B, 2, H, W] -> the tumour class's softmax probability [B, 1, H, W]."""
    return torch.softmax(logits.float(), dim=1)[:, TUMOR:TUMOR + 1]


@dataclass
class Counts:
    tp: int = 0
    fp: int = 0
    fn: int = 0
    tn: int = 0

    def add(self, pred: torch.Tensor, target: torch.Tensor) -> None:
        self.tp += int((pred & target).sum())
        self.fp += int((pred & ~target).sum())
        self.fn += int((~pred & target).sum())
        self.tn += int((~pred & ~target).sum())

    def merge(self, other: Counts) -> None:
        self.tp, self.fp = self.tp + other.tp, self.fp + other.fp
        self.fn, self.tn = self.fn + other.fn, self.tn + other.tn

    @property
    def dice(self) -> float:
        denominator = 2 * self.tp + self.fp + self.fn
        return 2 * self.tp / denominator if denominator else math.nan

    @property
    def iou(self) -> float:
        denominator = self.tp + self.fp + self.fn
        return self.tp / denominator if denominator else math.nan

    @property
    def accuracy(self) -> float:
        total = self.tp + self.fp + self.fn + self.tn
        return (self.tp + self.tn) / total if total else math.nan


def remove_small_components(mask: np.ndarray, min_voxels: int) -> np.ndarray:
    """``mask`` (bool, 2D or 3D) without its connected components (faces, edges and corners
    touching) of fewer than ``min_voxels`` voxels. scipy's labelling rather than MONAI's
    ``RemoveSmallObjects``, which needs scikit-image, not otherwise a dependency."""
    if min_voxels < 0:
        raise ValueError(f"min_voxels must be >= 0, got {min_voxels}")
    if min_voxels <= 1 or not mask.any():
        return mask
    labels, _ = ndimage.label(mask, structure=np.ones((3,) * mask.ndim, dtype=bool))
    sizes = np.bincount(labels.ravel())
    keep = sizes >= min_voxels
    keep[0] = False
    return keep[labels]


@dataclass
class TumorScores:
    """Pixel counts pooled over all slices, per volume, and each tumour slice's Dice.

    With ``min_component_voxels`` the slices are held (bit-packed) per volume until
    :meth:`resolve`, which removes each volume's small 3D components and then counts."""

    pooled: Counts = field(default_factory=Counts)
    volumes: dict[str, Counts] = field(default_factory=lambda: defaultdict(Counts))
    tumor_slice_dice: list[float] = field(default_factory=list)
    min_component_voxels: int = 0
    held: dict[str, dict[int, tuple]] = field(default_factory=lambda: defaultdict(dict))

    def update(self, pred: torch.Tensor, target: torch.Tensor, volumes: Sequence[str],
               slices: Sequence[int] | None = None) -> None:
        """``pred`` and ``target`` bool [B, 1, H, W]; ``volumes`` the volume of each slice
        and ``slices`` its index in the volume (needed with ``min_component_voxels``)."""
        if self.min_component_voxels:
            if slices is None:
                raise ValueError("min_component_voxels needs the slice index of each slice")
            for index, (volume, k) in enumerate(zip(volumes, slices)):
                p, t = pred[index, 0].cpu().numpy(), target[index, 0].cpu().numpy()
                self.held[volume][int(k)] = (np.packbits(p), np.packbits(t), p.shape)
            return
        for index, volume in enumerate(volumes):
            self._count(volume, pred[index], target[index])

    def _count(self, volume: str, pred, target) -> None:
        counts = Counts()
        counts.add(torch.as_tensor(pred), torch.as_tensor(target))
        self.pooled.merge(counts)
        self.volumes[volume].merge(counts)
        if counts.tp + counts.fn:  # the label holds tumour
            self.tumor_slice_dice.append(counts.dice)

    def resolve(self) -> None:
        """Count the held volumes: each one's slices stacked in slice order, its predicted
        components smaller than ``min_component_voxels`` removed."""
        for volume, held in sorted(self.held.items()):
            order = sorted(held)
            unpack = [[np.unpackbits(held[k][i], count=math.prod(held[k][2])).reshape(
                held[k][2]).astype(bool) for k in order] for i in (0, 1)]
            pred = remove_small_components(np.stack(unpack[0]), self.min_component_voxels)
            for p, t in zip(pred, unpack[1]):
                self._count(volume, p, t)
        self.held.clear()

    def merge(self, other: TumorScores) -> None:
        """Add what ``other`` scored (another rank's share of the validation slices; a
        volume split between ranks adds up to the same counts, or the same held slices)."""
        self.pooled.merge(other.pooled)
        for volume, counts in other.volumes.items():
            self.volumes[volume].merge(counts)
        self.tumor_slice_dice += other.tumor_slice_dice
        for volume, held in other.held.items():
            self.held[volume].update(held)

    def summary(self) -> dict[str, float]:
        self.resolve()
        per_volume = [c.dice for c in self.volumes.values() if not math.isnan(c.dice)]
        return {"tumor_dice": self.pooled.dice, "tumor_dice_pooled": self.pooled.dice,
                "tumor_dice_per_volume": float(np.mean(per_volume)) if per_volume else math.nan,
                "tumor_dice_per_slice": (float(np.mean(self.tumor_slice_dice))
                                         if self.tumor_slice_dice else math.nan),
                "tumor_iou": self.pooled.iou, "pixel_accuracy": self.pooled.accuracy}


class LungTumorTask(ShardedValidation):
    """Two-class (background, tumour) segmentation of slices; a pixel is tumour when its
    tumour probability exceeds ``threshold``."""

    def __init__(self, loss: nn.Module, *, threshold: float = 0.5,
                 min_component_voxels: int = 0) -> None:
        if min_component_voxels < 0:
            raise ValueError(f"min_component_voxels must be >= 0, got {min_component_voxels}")
        self.loss = loss
        self.threshold = threshold
        self.min_component_voxels = min_component_voxels

    def metric_names(self) -> list[str]:
        return list(METRICS)

    def training_step(self, model: nn.Module, batch, device: torch.device) -> StepOutput:
        return image_mask_step(self.loss, model, batch, device)

    def predict(self, logits: torch.Tensor) -> torch.Tensor:
        return tumor_probability(logits) > self.threshold

    def validation_state(self, model: nn.Module, loader: Iterable, device: torch.device,
                         precision: Precision) -> tuple[TumorScores, LossMeter]:
        """Pixel counts and loss sums over ``loader`` (one rank's share under torchrun;
        :meth:`summarise_validation` joins the ranks')."""
        scores = TumorScores(min_component_voxels=self.min_component_voxels)

        def score(batch, logits, *_) -> None:
            slices = batch.get("slice")
            scores.update(self.predict(logits), batch["mask"] > 0.5, batch["volume"],
                          None if slices is None else [int(k) for k in slices])

        losses = validation_pass(model, loader, device=device, precision=precision,
                                 loss=lambda logits, batch: self.loss(logits, batch["mask"]),
                                 on_batch=score)
        return scores, losses

    def summarise_validation(self, states: Sequence[tuple[TumorScores, LossMeter]]
                             ) -> dict[str, float]:
        scores = TumorScores(min_component_voxels=self.min_component_voxels)
        losses = LossMeter()
        for rank_scores, rank_losses in states:
            scores.merge(rank_scores)
            losses.extend(rank_losses)
        return {**losses.summary(), **scores.summary()}

    def render_prediction(self, model: nn.Module, batch, device: torch.device, path: Path) -> Path:
        """The first slice of ``batch``: image, ground truth and prediction."""
        image = batch["image"][:1].to(device)
        pred = self.predict(model(image))[0].cpu().numpy()
        return plot_segmentation_panel(centre_channel(image[0]).float().cpu().numpy(),
                                       batch["mask"][0].numpy(), pred, path,
                                       structure_names=["tumour"],
                                       title=f"{batch['volume'][0]} slice {int(batch['slice'][0])}")


def evaluate_lung(model: nn.Module, loader: Iterable, *, task: LungTumorTask,
                  device: torch.device, precision: Precision, output_dir: Path,
                  split: str) -> EvaluationReport:
    """The validation metrics of ``loader`` (its loss terms and the three tumour Dice) and
    ``per_volume_dice.json``: each volume's Dice over all its slices, with its pixel counts."""
    output_dir = Path(output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    scores, meter = task.validation_state(model, loader, device, precision)
    scores.resolve()
    losses = meter.summary()
    volumes = {name: {"dice": None if math.isnan(c.dice) else round(c.dice, 6),
                      "tumour_pixels": c.tp + c.fn, "predicted_pixels": c.tp + c.fp,
                      "true_positives": c.tp}
               for name, c in sorted(scores.volumes.items())}
    path = output_dir / "per_volume_dice.json"
    path.write_text(json.dumps(volumes, indent=1) + "\n")
    return EvaluationReport({**losses, **scores.summary()},
                            headline=["tumor_dice_per_volume", "tumor_dice_pooled",
                                      "tumor_dice_per_slice"],
                            artifacts=[path], info={"split": split, "volumes": len(volumes)})


def choose_examples(dataset: Dataset, count: int, *, include_empty: bool = True) -> list[int]:
    """Indices of up to ``count`` slices: tumour slices spread over the volumes (largest tumour
    of each first), and with ``include_empty`` one without tumour to show false positives."""
    records = dataset.records
    with_tumor = sorted((i for i, r in enumerate(records) if r.tumor_pixels),
                        key=lambda i: (-records[i].tumor_pixels, records[i].volume))
    by_volume: dict[str, list[int]] = defaultdict(list)
    for index in with_tumor:
        by_volume[records[index].volume].append(index)
    queues = list(by_volume.values())
    spread = []
    while any(queues):  # one slice of each volume in turn
        spread += [queue.pop(0) for queue in queues if queue]
    empty = [i for i, r in enumerate(records) if not r.tumor_pixels][:1] if include_empty else []
    chosen = spread[:max(count - len(empty), 0)] + empty
    return chosen[:count]


def render_validation_predictions(model: nn.Module, task: LungTumorTask, dataset: Dataset,
                                  device: torch.device, precision: Precision, path: Path,
                                  count: int = 8) -> Path:
    """``val_predictions.png``: chosen validation slices with ground truth and prediction."""
    model.eval()
    panels = []
    with torch.no_grad():
        for index in choose_examples(dataset, count):
            sample = dataset[index]
            image = sample["image"][None].to(device)
            with precision.autocast():
                logits = model(image)
            pred = task.predict(logits)[0, 0].cpu()
            target = sample["mask"][0] > 0.5
            counts = Counts()
            counts.add(pred, target)
            dice = "n/a" if math.isnan(counts.dice) else f"{counts.dice:.2f}"
            panels.append((centre_channel(sample["image"]).numpy(), target.numpy(), pred.numpy(),
                           f"{sample['volume']} slice {sample['slice']}  Dice {dice}"))
    return plot_prediction_grid(panels, path)


@dataclass
class OverfitResult:
    dice: float
    loss: float
    steps: int
    slices: int
    target_dice: float
    history: list[tuple[int, float, float]]

    @property
    def passed(self) -> bool:
        return self.dice >= self.target_dice

    def report(self, reporter: Reporter) -> None:
        """Log the history as ``overfit_loss`` and ``overfit_dice`` by step."""
        for step, loss, dice in self.history:
            reporter.log_scalar("overfit_loss", loss, step)
            reporter.log_scalar("overfit_dice", dice, step)


def overfit_check(model: nn.Module, task: LungTumorTask, batch: dict, *, steps: int,
                  learning_rate: float, target_dice: float, device: torch.device,
                  precision: Precision, report_every: int = 25) -> OverfitResult:
    """Train on one fixed batch of slices, without augmentation, until its Dice reaches
    ``target_dice`` or ``steps`` run out.

    A model, loss and data pipeline without bugs memorise a handful of slices; a Dice that
    stays low points at the labels, the loss or the learning rate before a long run is spent.
    Dice is measured in evaluation mode (BatchNorm running statistics), as validation does.
    """
    model.to(device)
    optimizer = torch.optim.AdamW(model.parameters(), lr=learning_rate, weight_decay=0.0)
    image, mask = batch["image"].to(device), batch["mask"].to(device)
    scaler = precision.grad_scaler()  # fp16 on CUDA: small gradients would underflow
    history: list[tuple[int, float, float]] = []
    dice, loss_value = math.nan, math.nan
    for step in range(1, steps + 1):
        model.train()
        with precision.autocast():
            loss, _ = task.loss(model(image), mask)
        optimizer.zero_grad(set_to_none=True)
        scaler.scale(loss).backward()
        scaler.step(optimizer)
        scaler.update()
        loss_value = float(loss.detach())
        if step % report_every == 0 or step == steps:
            dice = _batch_dice(model, task, image, mask, precision)
            history.append((step, loss_value, dice))
            if dice >= target_dice:
                break
    return OverfitResult(dice, loss_value, step, int(image.shape[0]), target_dice, history)


def _batch_dice(model, task, image, mask, precision) -> float:
    model.eval()
    with torch.no_grad(), precision.autocast():
        pred = task.predict(model(image))
    counts = Counts()
    counts.add(pred, mask > 0.5)
    return counts.dice


def overfit_slices(model: nn.Module, task: LungTumorTask, dataset_path: str | Path, *,
                   image_size: Sequence[int], samples: int, steps: int, learning_rate: float,
                   target_dice: float, device: torch.device, precision: Precision,
                   context_slices: int = 0) -> tuple[OverfitResult, list[str]]:
    """:func:`overfit_check` on up to ``samples`` tumour slices of the PNG slice folder
    ``dataset_path`` (spread over the volumes, resized to ``image_size``, not augmented, each
    with ``context_slices`` neighbours on each side); returns the result and the slices'
    names (``<volume>_slice_<index>``)."""
    slices = PNGSliceDataset(scan_slices(dataset_path), slice_transforms(image_size, train=False),
                             context_slices=context_slices,
                             neighbours=slice_images(dataset_path) if context_slices else None)
    chosen = choose_examples(slices, samples, include_empty=False)
    if not chosen:
        raise DataError(f"{dataset_path} has no slice with tumour to overfit on")
    chosen_slices = [slices[i] for i in chosen]
    batch = {key: torch.stack([s[key] for s in chosen_slices]) for key in ("image", "mask")}
    result = overfit_check(model, task, batch, steps=steps, learning_rate=learning_rate,
                           target_dice=target_dice, device=device, precision=precision)
    return result, [f"{slices.records[i].volume}_slice_{slices.records[i].index}" for i in chosen]
