"""SMALabeller: a U-Net trained on the slices of 3D MRI volumes (or on the volumes, 3D), its
losses, validation Dice, batch scalars, and :func:`fit`, the whole training without Sacred.

Slice-wise 2D: a batch ``[B, C, H, W, D]`` becomes ``[B*D, C, H, W]`` (``permute(0, 4, 1,
2, 3)``); all slices go through the model at once; losses are computed in fp32 outside
autocast. Validation scores whole (padded) volumes: the loss averaged over batches, each term
of it, and Dice of the thresholded sigmoid per volume, averaged over volumes.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from monai.losses import DiceCELoss, DiceLoss
from torch import nn

from medseg.data.mri_transforms import make_dataset, make_loader
from medseg.data.nifti_pairs import CasePair
from medseg.engine.bn_calibration import BatchNormCalibration
from medseg.engine.checkpoint import CheckpointManager, load_checkpoint
from medseg.engine.evaluation import (LossMeter, ShardedValidation, mean_case_score,
                                     validation_pass)
from medseg.engine.precision import Precision
from medseg.engine.reporting import Reporter
from medseg.engine.schedulers import LRSchedule
from medseg.engine.trainer import Callback, StepOutput, Trainer, TrainerSettings
from medseg.models.unet import UNet

log = logging.getLogger(__name__)

LOSSES = ("dice", "cross_entropy", "combination")
DIMENSIONS = {"2D": 2, "3D": 3}
#: The checkpoint keys the SMALabeller documentation lists.
CHECKPOINT_KEYS = {"model": "model_state", "optimizer": "optimizer_state",
                   "scheduler": "scheduler_state", "scaler": "scaler_state"}


def to_slices(volumes: torch.Tensor) -> torch.Tensor:
    """``[B, C, H, W, D] -> [B*D, C, H, W]`` (slice ``d`` of volume ``b`` at ``b*D + d``)."""
    if volumes.dim() != 5:
        raise ValueError(f"volumes must be [B, C, H, W, D], got shape {list(volumes.shape)}")
    b, c, h, w, d = volumes.shape
    return volumes.permute(0, 4, 1, 2, 3).reshape(b * d, c, h, w)


def from_slices(slices: torch.Tensor, depth: int) -> torch.Tensor:
    """The inverse of :func:`to_slices`: ``[B*D, C, H, W] -> [B, C, H, W, D]``."""
    n, c, h, w = slices.shape
    return slices.reshape(n // depth, depth, c, h, w).permute(0, 2, 3, 4, 1)


class SegmentationLoss(nn.Module):
    """``name``: ``dice`` (MONAI DiceLoss), ``cross_entropy`` (BCE with logits) or
    ``combination`` (MONAI DiceCELoss: Dice + BCE for one channel). Returns
    ``(total, terms)``; the terms of ``combination`` are ``dice`` and ``bce``."""

    def __init__(self, name: str) -> None:
        super().__init__()
        if name not in LOSSES:
            raise ValueError(f"name must be one of {', '.join(LOSSES)}, got {name!r}")
        self.name = name
        # batch=True: Dice over all slices of the batch at once. Per slice (MONAI's default,
        # the original's), each of the many slices without the ribbon scores a loss of about 1
        # whatever is predicted there (1e-5 / (sum of probabilities + 1e-5)), which drowns the
        # slices that hold it.
        smooth = {"smooth_nr": 1e-5, "smooth_dr": 1e-5, "batch": True}
        # include_background=True: with one output channel the foreground *is* channel 0
        # (MONAI ignores include_background=False for one channel, with a warning).
        if name == "dice":
            self.loss = DiceLoss(sigmoid=True, **smooth)
        elif name == "cross_entropy":
            self.loss = nn.BCEWithLogitsLoss()
        else:
            self.loss = DiceCELoss(sigmoid=True, **smooth)

    def term_names(self) -> list[str]:
        return ["dice", "bce"] if self.name == "combination" else []

    def forward(self, logits: torch.Tensor, target: torch.Tensor):
        logits, target = logits.float(), target.float()
        if self.name != "combination":
            return self.loss(logits, target), {}
        dice, bce = self.loss.dice(logits, target), self.loss.bce(logits, target)
        total = self.loss.lambda_dice * dice + self.loss.lambda_ce * bce
        return total, {"dice": dice.detach(), "bce": bce.detach()}


def volume_dice(pred: torch.Tensor, target: torch.Tensor) -> list[float]:
    """Dice per volume of bool ``[B, 1, ...]`` masks (NaN where both are empty)."""
    dims = tuple(range(1, pred.dim()))
    tp = (pred & target).sum(dims).double()
    denominator = pred.sum(dims).double() + target.sum(dims).double()
    return [float(2 * t / d) if d > 0 else math.nan for t, d in zip(tp, denominator)]


class SMALabellerTask(ShardedValidation):
    """How a batch of ``image``/``label`` volumes becomes a loss and how validation scores."""

    def __init__(self, loss: SegmentationLoss, *, spatial_dims: int = 2) -> None:
        if spatial_dims not in (2, 3):
            raise ValueError(f"spatial_dims must be 2 or 3, got {spatial_dims}")
        self.loss = loss
        self.spatial_dims = spatial_dims

    def metric_names(self) -> list[str]:
        return ["loss", "dice", *(f"loss_{term}" for term in self.loss.term_names())]

    def model_input(self, volumes: torch.Tensor) -> torch.Tensor:
        return to_slices(volumes) if self.spatial_dims == 2 else volumes

    def batch_inputs(self, batch: Mapping[str, torch.Tensor], device: torch.device) -> torch.Tensor:
        """The model's input for a loader batch (BatchNorm calibration forwards these)."""
        return self.model_input(torch.as_tensor(batch["image"]).to(device, non_blocking=True))

    def forward(self, model: nn.Module, batch, device: torch.device):
        """(logits, target) in the model's layout."""
        image = torch.as_tensor(batch["image"]).to(device, non_blocking=True)
        label = torch.as_tensor(batch["label"]).to(device, non_blocking=True)
        return model(self.model_input(image)), self.model_input(label)

    def training_step(self, model: nn.Module, batch, device: torch.device) -> StepOutput:
        logits, target = self.forward(model, batch, device)
        with torch.autocast(device_type=device.type, enabled=False):
            total, terms = self.loss(logits, target)
        return StepOutput(total, terms, int(logits.shape[0]))

    def validation_state(self, model: nn.Module, loader: Iterable, device: torch.device,
                         precision: Precision) -> tuple[LossMeter, list[float]]:
        """Loss sums and each volume's Dice over ``loader`` (one rank's share of the
        volumes under torchrun; :meth:`summarise_validation` joins the ranks')."""
        dices: list[float] = []

        def score(batch, logits, *_) -> None:
            volumes = batch["label"].shape[0]
            pred = self.as_volumes(logits > 0, volumes)
            truth = self.as_volumes(self.model_input(batch["label"]) > 0.5, volumes)
            dices.extend(volume_dice(pred, truth))

        def forward(image):
            with precision.autocast():
                return model(self.model_input(image))

        losses = validation_pass(
            model, loader, device=device, precision=precision, on_batch=score,
            loss=lambda logits, batch: self.loss(logits, self.model_input(batch["label"])),
            keys=("image", "label"), forward=forward)
        return losses, dices

    def summarise_validation(self, states: Sequence[tuple[LossMeter, list[float]]]
                             ) -> dict[str, float]:
        """The loss averaged over batches, Dice over the volumes where it is defined."""
        return mean_case_score(states)

    def as_volumes(self, output: torch.Tensor, volumes: int) -> torch.Tensor:
        if self.spatial_dims == 3:
            return output
        return from_slices(output, output.shape[0] // volumes)

    @torch.no_grad()
    def triplets(self, model: nn.Module, batch, device: torch.device,
                 count: int = 3) -> list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
        """(image, label, probability) 2D slices ``D/2 + i`` of the batch's first volume."""
        image = torch.as_tensor(batch["image"])[:1]
        label = torch.as_tensor(batch["label"])[:1]
        logits, _ = self.forward(model, {"image": image, "label": label}, device)
        probability = self.as_volumes(torch.sigmoid(logits.float()), 1).cpu()
        depth = image.shape[-1]
        chosen = [min(depth // 2 + i, depth - 1) for i in range(count)]
        return [(image[0, 0, ..., d], label[0, 0, ..., d], probability[0, 0, ..., d])
                for d in chosen]


class BatchScalars(Callback):
    """Every optimizer step: the learning rate (``train_lr``) and the wall time since the
    previous step (``train_iter_time_s``)."""

    def __init__(self, reporter: Reporter) -> None:
        self.reporter = reporter
        self._last: float | None = None

    def on_fit_start(self, trainer: Trainer) -> None:
        self._last = time.perf_counter()

    def on_optimizer_step(self, trainer: Trainer) -> None:
        now = time.perf_counter()
        step = trainer.global_step
        self.reporter.log_scalar("train_lr", trainer.schedule.current_lr(), step)
        if self._last is not None:
            self.reporter.log_scalar("train_iter_time_s", now - self._last, step)
        self._last = now


class EarlyStoppingScalars(Callback):
    """Every epoch: ``best_val_loss``, ``patience_used`` and ``best_epoch`` (the original's
    Checkpoint/ and EarlyStopping/ scalars)."""

    def __init__(self, reporter: Reporter) -> None:
        self.reporter = reporter

    def on_epoch_end(self, trainer: Trainer, epoch: int, metrics) -> None:
        stopping = trainer.early_stopping
        self.reporter.log_scalar("best_val_loss", stopping.best, epoch)
        self.reporter.log_scalar("patience_used", stopping.bad_epochs, epoch)
        self.reporter.log_scalar("best_epoch", stopping.best_epoch, epoch)


@dataclass
class SMALabellerSettings:
    """Everything :func:`fit` needs, with the original's defaults (``channels=None``: the
    original's widths, 64 ... 1024 in 2D and 64 ... 512 in 3D)."""

    unet_dimensions: str = "2D"
    epochs: int = 1
    batch_size: int = 2
    num_workers: int = 0
    lr: float = 2.3173e-5
    max_lr: float = 5.1206e-3
    loss_function: str = "cross_entropy"
    augmentations: bool = True
    dropout_rate: float = 0.45012
    channels: Sequence[int] | None = None
    #: The foreground probability the untrained model predicts (its output bias is the logit
    #: of it): about the ribbon's share of the crops, instead of 0.5 (zero bias) everywhere.
    initial_foreground: float = 0.01
    crop_size: Sequence[int] = (128, 128, 64)
    crops_per_volume: int = 3
    spacing: Sequence[float] = (1.0, 1.0, 1.0)
    cache: str = "memory"
    cache_dir: str | None = None
    bn_calibration: bool = True
    warmup_batches: int = 8
    slice_batch: int = 16
    patience: int = 15
    log_frequency: int = 1
    progress_bar: bool = True
    seed: int = 0

    def __post_init__(self) -> None:
        if self.unet_dimensions not in DIMENSIONS:
            raise ValueError(f"unet_dimensions must be '2D' or '3D', got {self.unet_dimensions!r}")
        if not 0 < self.initial_foreground < 1:
            raise ValueError(f"initial_foreground must be in (0, 1), got {self.initial_foreground}")


@dataclass
class FitOutcome:
    result: dict[str, Any]
    model: nn.Module
    task: SMALabellerTask
    val_loader: Any
    history: list[dict[str, float]]


def build(settings: SMALabellerSettings) -> tuple[nn.Module, SMALabellerTask]:
    dims = DIMENSIONS[settings.unet_dimensions]
    prior = settings.initial_foreground
    model = UNet(dims, 1, 1, channels=settings.channels, dropout=settings.dropout_rate,
                 output_bias=math.log(prior / (1 - prior)))
    return model, SMALabellerTask(SegmentationLoss(settings.loss_function), spatial_dims=dims)


def make_loaders(settings: SMALabellerSettings, train_pairs: Sequence[CasePair],
                 val_pairs: Sequence[CasePair], device: torch.device):
    """(train, validation) loaders: cached preprocessing, crops and augmentation for training."""
    s = settings
    loaders = []
    for pairs, train in ((train_pairs, True), (val_pairs, False)):
        dataset = make_dataset([p.as_dict() for p in pairs], s.spacing, train=train,
                               augment=s.augmentations, crop_size=s.crop_size,
                               crops_per_volume=s.crops_per_volume, cache=s.cache,
                               cache_dir=s.cache_dir)
        loaders.append(make_loader(dataset, batch_size=s.batch_size, shuffle=train,
                                   num_workers=s.num_workers, seed=s.seed,
                                   pin_memory=device.type == "cuda"))
    return loaders[0], loaders[1]


def make_optimization(settings: SMALabellerSettings, model: nn.Module, *,
                      steps_per_epoch: int) -> tuple[torch.optim.Optimizer, LRSchedule]:
    """AdamW starting at ``lr``; OneCycleLR per step to ``max_lr`` (``div_factor = max_lr/lr``)."""
    s = settings
    optimizer = torch.optim.AdamW(model.parameters(), lr=s.lr)
    schedule = LRSchedule(optimizer, "onecycle", num_epochs=s.epochs,
                          steps_per_epoch=steps_per_epoch, max_lr=s.max_lr,
                          div_factor=s.max_lr / s.lr)
    return optimizer, schedule


def bn_calibration(settings: SMALabellerSettings,
                   task: SMALabellerTask) -> BatchNormCalibration | None:
    s = settings
    if not s.bn_calibration:
        return None
    return BatchNormCalibration(task.batch_inputs, warmup_batches=s.warmup_batches,
                                slice_batch=s.slice_batch)


def trainer_settings(settings: SMALabellerSettings) -> TrainerSettings:
    s = settings
    return TrainerSettings(num_epochs=s.epochs, early_stopping_patience=s.patience,
                           monitor="val_loss", monitor_mode="min", gradient_clip_norm=0.0,
                           log_grad_norm=True, log_frequency=s.log_frequency,
                           progress_bar=s.progress_bar)


def fit(settings: SMALabellerSettings, train_pairs: Sequence[CasePair],
        val_pairs: Sequence[CasePair], *, reporter: Reporter, device: torch.device,
        precision: Precision, checkpoints: CheckpointManager | None = None,
        resume: str | Path | None = None, config: Mapping[str, Any] | None = None,
        callbacks: Sequence[Callback] = ()) -> FitOutcome:
    """Train a SMALabeller U-Net: AdamW starting at ``lr``, OneCycleLR stepped every batch to
    ``max_lr`` (``div_factor = max_lr / lr``), early stopping on the validation loss with the
    best model and optimizer restored, checkpoints, optional BatchNorm calibration."""
    s = settings
    train_loader, val_loader = make_loaders(s, train_pairs, val_pairs, device)
    model, task = build(s)
    optimizer, schedule = make_optimization(s, model, steps_per_epoch=len(train_loader))
    extra: list[Callback] = [BatchScalars(reporter), EarlyStoppingScalars(reporter)]
    calibration = bn_calibration(s, task)
    if calibration is not None:
        extra.insert(0, calibration)
    reporter.set_info("model", {"class": "UNet", "spatial_dims": task.spatial_dims,
                                "parameters": sum(p.numel() for p in model.parameters())})
    trainer = Trainer(model, task, optimizer, schedule, train_loader, val_loader, device=device,
                      precision=precision, settings=trainer_settings(s), reporter=reporter,
                      checkpoints=checkpoints, callbacks=[*extra, *callbacks], config=config)
    if resume:
        trainer.resume(resume)
    outcome = trainer.fit()
    _restore_best_optimizer(trainer, checkpoints)
    result = {"best_epoch": outcome.best_epoch, "best_val_loss": outcome.best_metric,
              "epochs_run": outcome.epochs_run, "stopped_early": outcome.stopped_early,
              "stop_reason": trainer.stop_reason}
    if trainer.history:
        result["final_val_dice"] = trainer.history[-1].get("val_dice")
        best = [h for h in trainer.history if h["epoch"] == outcome.best_epoch]
        result["best_val_dice"] = best[0].get("val_dice") if best else None
    return FitOutcome(result, trainer.model, task, val_loader, trainer.history)


def _restore_best_optimizer(trainer: Trainer, checkpoints: CheckpointManager | None) -> None:
    """The original's EarlyStopping restored the best epoch's model *and* optimizer."""
    if checkpoints is None or not checkpoints.best_path.is_file():
        return
    best = load_checkpoint(checkpoints.best_path, map_location=trainer.device)
    trainer.optimizer.load_state_dict(best["optimizer"])
    log.info("Restored best model from epoch %s (validation loss %.4f)", best["epoch"],
             best["monitor_value"])
