"""How the aneurysm-cubes model trains and is scored.

Training sees random crops; validation scores each whole cube with sliding-window inference
(windows the size of the training crop). From the predicted probability map every cube gets

- a Dice score against the binarised mask, on positive cubes only (a negative cube has no
  target to overlap);
- a classification: positive when some voxel's probability exceeds ``pos_thr``, and a
  score that ranks cubes for the ROC curve, either the ``max`` probability or the
  ``fraction`` of voxels above ``pos_thr`` (both agree on which cubes are called positive).

Overall, positive and negative accuracy and AUC-ROC are computed over the cubes.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from monai.inferers import sliding_window_inference
from torch import nn
from torch.utils.data import Dataset

from medseg.data.nifti import nifti_stem
from medseg.data.npz_cubes import CubeRecord
from medseg.data.prepare_cubes import read_prediction_input, save_probability
from medseg.engine.checkpoint import rebuilt_model
from medseg.engine.evaluation import EvaluationReport, LossMeter, validation_pass
from medseg.engine.precision import Precision
from medseg.engine.trainer import StepOutput, image_mask_step
from medseg.errors import DataError
from medseg.losses.aneurysm import WeightedDiceCELoss
from medseg.metrics.classification import BinaryClassificationScores, roc_curve
from medseg.metrics.segmentation import per_structure_dice
from medseg.models.ensemble import ProbabilityEnsemble
from medseg.viz.cubes import plot_cube_prediction, plot_cube_sample, plot_roc_curve

SCORE_METHODS = ("max", "fraction")
BLEND_MODES = ("gaussian", "constant")
MASK_THRESHOLD = 0.5
HEADLINE = ["dice", "auc", "accuracy", "pos_accuracy", "neg_accuracy"]
METRICS = ["loss", *HEADLINE]


def volume_score(probability: torch.Tensor, method: str, pos_thr: float) -> float:
    """The score that ranks a cube: its largest probability, or the share of its voxels
    whose probability exceeds ``pos_thr``."""
    if method == "max":
        return float(probability.max())
    if method == "fraction":
        return float((probability > pos_thr).float().mean())
    raise ValueError(f"score method must be one of {SCORE_METHODS}, got {method!r}")


@dataclass
class CubeResult:
    name: str
    label: int
    score: float
    max_probability: float
    fraction_above_pos_thr: float
    predicted: bool
    dice: float
    loss: float
    loss_terms: dict[str, float]


class AneurysmTask:
    """Args:
        loss: the training loss (also reported on whole validation cubes).
        roi_size: sliding-window size (the training crop), (D, H, W).
        sw_batch_size: windows per forward pass.
        sw_overlap: overlap of neighbouring windows (0 to <1).
        sw_mode: how overlapping windows blend, ``gaussian`` or ``constant``.
        pos_thr: probability above which a voxel makes its cube positive.
        score_method: ``max`` or ``fraction`` (see the module docstring).
    """

    def __init__(self, loss: WeightedDiceCELoss, *, roi_size: Sequence[int], sw_batch_size: int = 4,
                 sw_overlap: float = 0.25, sw_mode: str = "gaussian", pos_thr: float = 0.1,
                 score_method: str = "max") -> None:
        if score_method not in SCORE_METHODS:
            raise ValueError(f"score_method must be one of {SCORE_METHODS}, got {score_method!r}")
        self.loss = loss
        self.roi_size = tuple(roi_size)
        self.sw_batch_size = sw_batch_size
        self.sw_overlap = sw_overlap
        self.sw_mode = sw_mode
        self.pos_thr = pos_thr
        self.score_method = score_method

    def metric_names(self) -> list[str]:
        return list(METRICS)

    def training_step(self, model: nn.Module, batch, device: torch.device) -> StepOutput:
        return image_mask_step(self.loss, model, batch, device)

    def infer(self, model: nn.Module, image: torch.Tensor, precision: Precision) -> torch.Tensor:
        """Logits [B, 1, D, H, W] (float32) of a normalised image of any size."""
        with precision.autocast():
            logits = sliding_window_inference(image, self.roi_size, self.sw_batch_size, model,
                                              overlap=self.sw_overlap, mode=self.sw_mode)
        return logits.float()

    def score_cube(self, probability: torch.Tensor) -> tuple[float, bool]:
        """Ranking score and positive call of one probability map."""
        predicted = bool(probability.max() > self.pos_thr)
        return volume_score(probability, self.score_method, self.pos_thr), predicted

    def score_loader(self, model: nn.Module, loader: Iterable, device: torch.device,
                     precision: Precision, on_case=None) -> list[CubeResult]:
        """Score every cube of ``loader`` (batches of one whole cube)."""
        results = []

        def score(batch, logits, loss, terms) -> None:
            terms = {name: float(value) for name, value in terms.items()}
            image, mask = batch["image"], batch["mask"]
            for i in range(image.shape[0]):
                probability = torch.sigmoid(logits[i:i + 1])
                result = self._cube_result(probability, mask[i:i + 1], float(loss), terms,
                                           str(batch["name"][i]), int(batch["label"][i]))
                results.append(result)
                if on_case is not None:
                    on_case(result, image[i, 0], mask[i, 0], probability[0, 0])

        # The loss is averaged per cube in summarise(), as before; the pass's own mean is
        # per batch and not used here.
        validation_pass(model, loader, device=device, precision=precision, on_batch=score,
                        loss=lambda logits, batch: self.loss(logits, batch["mask"]),
                        forward=lambda image: self.infer(model, image, precision))
        return results

    def _cube_result(self, probability: torch.Tensor, mask: torch.Tensor, loss: float,
                     loss_terms: dict[str, float], name: str, label: int) -> CubeResult:
        score, predicted = self.score_cube(probability)
        dice = math.nan
        if label == 1:
            dice = float(per_structure_dice(probability > MASK_THRESHOLD, mask > 0.5)[0, 0])
        return CubeResult(name=name, label=label, score=score,
                          max_probability=float(probability.max()),
                          fraction_above_pos_thr=volume_score(probability, "fraction",
                                                              self.pos_thr),
                          predicted=predicted, dice=dice, loss=loss,
                          loss_terms=loss_terms)

    def validate(self, model: nn.Module, loader: Iterable, device: torch.device,
                 precision: Precision) -> dict[str, float]:
        return summarise(self.score_loader(model, loader, device, precision))

    #: Under torchrun each rank scores its share of the cubes; the ranks' records are joined.
    validation_state = score_loader

    def summarise_validation(self, states: Sequence[list[CubeResult]]) -> dict[str, float]:
        return summarise([result for results in states for result in results])

    def render_prediction(self, model: nn.Module, batch, device: torch.device, path: Path) -> Path:
        """The first cube of ``batch`` with its prediction (``logging.visualize_predictions``)."""
        image = batch["image"][:1].to(device)
        probability = torch.sigmoid(self.infer(model, image, Precision(device.type, None)))
        return plot_cube_prediction(image[0, 0].cpu().numpy(), batch["mask"][0, 0].numpy(),
                                    probability[0, 0].cpu().numpy(), path,
                                    title=f"{batch['name'][0]} (label {int(batch['label'][0])})")


def summarise(results: Sequence[CubeResult]) -> dict[str, float]:
    """Mean loss and its terms, Dice over positive cubes, and the classification metrics."""
    classification = BinaryClassificationScores()
    for result in results:
        classification.add(result.score, result.predicted, result.label)
    losses = LossMeter()
    for result in results:
        losses.add(result.loss, result.loss_terms)
    dice = [r.dice for r in results if r.label == 1 and not math.isnan(r.dice)]
    return {**losses.summary(), "dice": float(np.mean(dice)) if dice else math.nan,
            **classification.summary()}


def evaluate_cubes(model: nn.Module, loader: Iterable, *, task: AneurysmTask,
                   device: torch.device, precision: Precision, output_dir: Path, split: str,
                   num_figures: int = 3) -> EvaluationReport:
    """Score whole cubes; write ``per_cube_metrics.json``, the ROC curve and the first
    ``num_figures`` positive and negative cubes with their predictions."""
    output_dir = Path(output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    figures: list[Path] = []
    drawn = {0: 0, 1: 0}

    def draw(result: CubeResult, image, mask, probability) -> None:
        if drawn[result.label] >= num_figures:
            return
        drawn[result.label] += 1
        stem = Path(result.name).stem
        figures.append(plot_cube_prediction(
            image.float().cpu().numpy(), mask.cpu().numpy(), probability.cpu().numpy(),
            output_dir / f"{stem}.png",
            title=f"{split}: {result.name}  score {result.score:.3f}  dice {result.dice:.3f}"))

    results = task.score_loader(model, loader, device, precision, on_case=draw)
    metrics = summarise(results)
    per_cube = output_dir / "per_cube_metrics.json"
    per_cube.write_text(json.dumps({"split": split, "score_method": task.score_method,
                                    "pos_thr": task.pos_thr,
                                    "cubes": [_record(r) for r in results]}, indent=1))
    fpr, tpr = roc_curve([r.score for r in results], [r.label for r in results])
    roc = plot_roc_curve(fpr, tpr, metrics["auc"], output_dir / "roc_curve.png",
                         title=f"{split}: ROC ({task.score_method} score)")
    confusion = BinaryClassificationScores()
    for result in results:
        confusion.add(result.score, result.predicted, result.label)
    return EvaluationReport(metrics=metrics, headline=HEADLINE, artifacts=[per_cube, roc, *figures],
                            info={"cubes": len(results), "confusion": confusion.confusion()})


def _record(result: CubeResult) -> dict[str, Any]:
    record = dict(result.__dict__)
    for key, value in record.items():
        if isinstance(value, float) and math.isnan(value):
            record[key] = None
    return record


def predict_probability(model: nn.Module, volume: np.ndarray, *, task: AneurysmTask,
                        cube_shape: Sequence[int], device: torch.device,
                        precision: Precision) -> np.ndarray:
    """Probability map (float32, the volume's shape) of a uint8 volume [D, H, W] of any size.

    Training cubes are z-scored one cube at a time, so a larger volume is visited in
    cube-sized windows, each z-scored on its own and scored as validation scores a cube; the
    windows' probabilities are blended where they overlap.
    """
    image = torch.from_numpy(np.ascontiguousarray(volume, dtype=np.float32))[None, None].to(device)

    def cube_probability(windows: torch.Tensor) -> torch.Tensor:
        flat = windows.flatten(1)
        mean = flat.mean(1).view(-1, 1, 1, 1, 1)
        std = flat.std(1, correction=0).clamp_min(1e-8)  # as MONAI's z-score.view(-1, 1, 1, 1, 1)
        return torch.sigmoid(task.infer(model, (windows - mean) / std, precision))

    with torch.no_grad():
        probability = sliding_window_inference(image, tuple(cube_shape), 1, cube_probability,
                                               overlap=task.sw_overlap, mode=task.sw_mode)
    return probability[0, 0].float().cpu().numpy()


def load_models(paths: Sequence[str | Path], build: Callable[[dict], nn.Module],
                device: torch.device) -> list[nn.Module]:
    """Models from checkpoints, each built with ``build(model_config)`` from the model config
    stored in its checkpoint (so fold models of different architectures can be mixed)."""
    def build_stored(model_config: dict | None) -> nn.Module:
        if not isinstance(model_config, dict):
            raise DataError(f"checkpoint {path} holds no model config; expected a checkpoint "
                            "written by the aneurysm_cubes experiment")
        return build(model_config)

    models = []
    for path in paths:
        model, _ = rebuilt_model(path, build_stored)
        models.append(model.to(device).eval())
    return models


def ensemble_of(models: Sequence[nn.Module]) -> nn.Module:
    """One model as it is, several as the mean of their probabilities (a fold ensemble)."""
    return models[0] if len(models) == 1 else ProbabilityEnsemble(models)


def predict_file(model: nn.Module, path: str | Path, output_dir: str | Path, *,
                 task: AneurysmTask, cube_shape: Sequence[int],
                 intensity_window: Sequence[float] | None,
                 target_spacing: Sequence[float] | None, device: torch.device,
                 precision: Precision,
                 checkpoints: Sequence[str] = ()) -> tuple[dict[str, Any], list[Path]]:
    """Probability map and classification score of an NPZ cube or a NIfTI volume.

    A NIfTI volume is normalised as ``prepare`` normalises cubes (``intensity_window``,
    ``target_spacing``). Writes ``<stem>_probability.nii.gz`` (float32, the input's grid) and
    ``<stem>_prediction.json`` (score, call, ``checkpoints`` for provenance) into
    ``output_dir``; returns that JSON's record and the two files' paths.
    """
    source = read_prediction_input(path, intensity_window=intensity_window,
                                   target_spacing=target_spacing)
    probability = predict_probability(model, source.volume, task=task, cube_shape=cube_shape,
                                      device=device, precision=precision)
    score, positive = task.score_cube(torch.from_numpy(probability))
    stem = nifti_stem(path)  # also "<name>.npz" -> "<name>"
    output = Path(output_dir)
    map_path = save_probability(probability, source, output / f"{stem}_probability.nii.gz")
    record = {"input": str(path), "checkpoints": list(checkpoints),
              "probability_map": str(map_path), "score_method": task.score_method,
              "score": score, "max_probability": float(probability.max()),
              "pos_thr": task.pos_thr, "predicted_label": int(positive),
              "label": source.label}
    json_path = output / f"{stem}_prediction.json"
    json_path.write_text(json.dumps(record, indent=2))
    return record, [map_path, json_path]


def panel_records(records: Sequence[CubeRecord], count: int) -> list[CubeRecord]:
    """Up to ``count`` cubes for sample panels: positives and negatives in turn, then the
    rest of whichever kind is left."""
    positives = [r for r in records if r.label == 1]
    negatives = [r for r in records if r.label == 0]
    chosen = [r for pair in zip(positives, negatives) for r in pair]
    chosen += positives[len(chosen) // 2:] + negatives[len(chosen) // 2:]
    return chosen[:count]


def write_sample_panels(stored: Dataset, transform, directory: str | Path, *,
                        seed: int) -> list[Path]:
    """One PNG per cube of ``stored`` (cubes as saved, no transform): the cube and its mask
    beside the crop ``transform`` (the training augmentation, seeded with ``seed``) makes
    of it."""
    transform.set_random_state(seed)
    paths = []
    for index in range(len(stored)):
        sample = stored[index]
        augmented = transform(dict(sample))
        name = f"sample_{index:02d}_{Path(sample['name']).stem}.png"
        paths.append(plot_cube_sample(sample["image"][0], sample["mask"][0],
                                      augmented["image"][0].numpy(), augmented["mask"][0].numpy(),
                                      Path(directory) / name,
                                      title=f"{sample['name']} (label {int(sample['label'])})"))
    return paths
