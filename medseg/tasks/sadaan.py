"""How SADAAN trains and is scored: the task the engine runs, and the evaluation that writes
per-case metrics and figures.

A structure counts as predicted present when its presence probability exceeds
``presence_threshold``; its mask is kept only then, so an absent structure predicted
absent costs no false-positive voxels.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Sequence
from pathlib import Path

import numpy as np
import torch
from torch import nn

from medseg.data.batch_augmentation import SADAANBatchAugmentation
from medseg.engine.evaluation import EvaluationReport, LossMeter, validation_pass
from medseg.engine.precision import Precision
from medseg.engine.trainer import StepOutput
from medseg.losses.sadaan import SADAANLoss
from medseg.metrics.segmentation import SegmentationScores, metric_key
from medseg.viz.overlays import plot_attention_maps, plot_metric_bars, plot_segmentation_panel

MASK_THRESHOLD = 0.5
# Each also per structure as ``<metric>_<name>``; definitions in medseg.metrics.segmentation.
PER_STRUCTURE_METRICS = ("dice", "iou", "presence_accuracy", "dice_present",
                         "presence_balanced_accuracy")


class SADAANTask:
    def __init__(self, loss: SADAANLoss, structure_names: Sequence[str], *,
                 presence_threshold: float = 0.5,
                 batch_augmentation: SADAANBatchAugmentation | None = None) -> None:
        self.loss = loss
        #: Applied to each training batch on the device (``augmentation.on_device``).
        self.batch_augmentation = batch_augmentation
        self.structure_names = list(structure_names)
        self.presence_threshold = presence_threshold

    def metric_names(self) -> list[str]:
        per_structure = [f"{metric}_{metric_key(name)}" for name in self.structure_names
                         for metric in PER_STRUCTURE_METRICS]
        return ["loss", *PER_STRUCTURE_METRICS, *per_structure]

    def _inputs(self, batch, device: torch.device):
        return (batch["image"].to(device, non_blocking=True),
                batch["mask"].to(device, non_blocking=True),
                batch["presence"].to(device, non_blocking=True))

    def training_step(self, model: nn.Module, batch, device: torch.device) -> StepOutput:
        image, mask, presence = self._inputs(batch, device)
        if self.batch_augmentation is not None:
            image, mask = self.batch_augmentation(image, mask)
        total, terms = self.loss(model(image), mask, presence)
        return StepOutput(total, terms, image.shape[0])

    def predict(self, output) -> tuple[torch.Tensor, torch.Tensor]:
        """Binary masks [B,S,...] gated by predicted presence [B,S]."""
        present = torch.sigmoid(output.presence.float()) > self.presence_threshold
        masks = torch.sigmoid(output.segmentation.float()) > MASK_THRESHOLD
        gate = present.reshape(*present.shape, *([1] * (masks.dim() - 2)))
        return masks & gate, present

    def _score(self, model, loader: Iterable, device, precision: Precision,
               on_case=None) -> tuple[SegmentationScores, dict[str, float]]:
        """Scores and the loss with its terms (``{"loss", "loss_<term>"}``) over ``loader``."""
        scores, losses = self.validation_state(model, loader, device, precision, on_case)
        return scores, losses.summary()

    def validation_state(self, model, loader: Iterable, device, precision: Precision,
                         on_case=None) -> tuple[SegmentationScores, LossMeter]:
        """The per-case scores and loss sums over ``loader`` (one rank's share under
        torchrun; :meth:`summarise_validation` joins the ranks')."""
        scores = SegmentationScores(self.structure_names)

        def score(batch, output, *_) -> None:
            pred_masks, pred_presence = self.predict(output)
            scores.update(pred_masks, batch["mask"] > 0.5, pred_presence, batch["presence"] > 0.5)
            if on_case is not None:
                on_case(batch, output, pred_masks)

        losses = validation_pass(
            model, loader, device=device, precision=precision, on_batch=score,
            loss=lambda output, batch: self.loss(output, batch["mask"], batch["presence"]),
            keys=("image", "mask", "presence"))
        return scores, losses

    def summarise_validation(self, states) -> dict[str, float]:
        scores, losses = SegmentationScores(self.structure_names), LossMeter()
        for rank_scores, rank_losses in states:
            scores.extend(rank_scores)
            losses.extend(rank_losses)
        return {**losses.summary(), **scores.summary()}

    def validate(self, model: nn.Module, loader: Iterable, device: torch.device,
                 precision: Precision) -> dict[str, float]:
        scores, losses = self._score(model, loader, device, precision)
        return {**losses, **scores.summary()}

    def render_prediction(self, model: nn.Module, batch, device: torch.device, path: Path) -> Path:
        image, mask, _ = self._inputs(batch, device)
        output = model(image)
        pred_masks, _ = self.predict(output)
        return plot_segmentation_panel(
            image[0, 0].float().cpu().numpy(), mask[0].cpu().numpy(),
            pred_masks[0].cpu().numpy(), path, attention=output.attention[0].float().cpu().numpy(),
            structure_names=self.structure_names)


def evaluate_sadaan(model: nn.Module, loader: Iterable, *, task: SADAANTask, device: torch.device,
                    precision: Precision, output_dir: Path, split: str,
                    num_figures: int = 4) -> EvaluationReport:
    """Per-structure Dice/IoU (also over present structures only), presence accuracy and
    balanced accuracy and confusion counts on ``loader``; writes
    ``per_case_metrics.json``, Dice bars and the first ``num_figures`` cases with their
    attention maps."""
    output_dir = Path(output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    figures: list[Path] = []

    def draw(batch, output, pred_masks) -> None:
        if len(figures) >= 2 * num_figures:
            return
        index = int(batch["index"][0])
        image = batch["image"][0, 0].float().cpu().numpy()
        attention = output.attention[0].float().cpu().numpy()
        scenario = batch["scenario"][0] if "scenario" in batch else ""
        figures.append(plot_segmentation_panel(
            image, batch["mask"][0].cpu().numpy(), pred_masks[0].cpu().numpy(),
            output_dir / f"case_{index:04d}_segmentation.png", attention=attention,
            structure_names=task.structure_names, title=f"{split} case {index} ({scenario})"))
        figures.append(plot_attention_maps(attention, output_dir / f"case_{index:04d}_attention.png",
                                           task.structure_names, image=image))

    scores, losses = task._score(model, loader, device, precision, on_case=draw)
    summary = {**losses, **scores.summary()}
    per_case_path = output_dir / "per_case_metrics.json"
    per_case_path.write_text(json.dumps({"split": split, "cases": scores.per_case(),
                                         "confusion": scores.confusion()}, indent=1,
                                        default=_json_default, allow_nan=True))
    dice = {name: summary.get(f"dice_{metric_key(name)}", float("nan"))
            for name in task.structure_names}
    bars = plot_metric_bars(dice, output_dir / "dice_per_structure.png", f"{split}: Dice per structure")
    return EvaluationReport(metrics=summary, headline=["loss", *PER_STRUCTURE_METRICS],
                            artifacts=[per_case_path, bars, *figures],
                            info={"confusion": scores.confusion(), "cases": scores.num_cases})


def _json_default(value):
    if isinstance(value, (np.floating, np.integer)):
        return value.item()
    if isinstance(value, torch.Tensor):
        return value.tolist()
    raise TypeError(f"cannot write {type(value).__name__} to JSON")
