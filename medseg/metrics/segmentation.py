"""Per-structure segmentation and presence-detection scores.

Conventions for a structure whose target is empty in a case (absent structure):

- prediction also empty: Dice and IoU are undefined, returned as NaN and left out of every mean;
- prediction not empty: Dice and IoU are 0, a false-positive segmentation.

:class:`SegmentationScores` reports Dice two ways: ``dice`` by these conventions (a
false-positive mask on an absent structure counts 0, a correct "absent" is left out), and
``dice_present`` over the cases where the structure is present only (the definition of the
other public SADAAN implementation), which ignores what is predicted where it is absent.
"""

from __future__ import annotations

import math
import re
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
from monai.metrics import compute_dice, compute_iou, get_confusion_matrix


def per_structure_dice(pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Dice of binary masks ``pred`` and ``target`` [B, S, ...] -> [B, S] float, with NaN where
    both are empty (see the module conventions)."""
    _check_masks(pred, target)
    dice = compute_dice(pred.float(), target.float(), include_background=True, ignore_empty=False)
    return _undefined_where_both_empty(dice.float(), pred, target)


def per_structure_iou(pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """IoU of binary masks ``pred`` and ``target`` [B, S, ...] -> [B, S] float, with NaN where
    both are empty (see the module conventions)."""
    _check_masks(pred, target)
    iou = compute_iou(pred.float(), target.float(), include_background=True, ignore_empty=False)
    return _undefined_where_both_empty(iou.float(), pred, target)


def metric_key(structure_name: str) -> str:
    """``structure_name`` as it appears in metric names: characters other than letters, digits
    and ``_`` become ``_`` (trackers split metric names on dots)."""
    return re.sub(r"\W", "_", structure_name)


@dataclass
class PresenceConfusion:
    """Per-structure counts [S] of presence predictions against the truth."""

    tp: torch.Tensor
    fp: torch.Tensor
    tn: torch.Tensor
    fn: torch.Tensor

    def __add__(self, other: PresenceConfusion) -> PresenceConfusion:
        return PresenceConfusion(self.tp + other.tp, self.fp + other.fp, self.tn + other.tn,
                                 self.fn + other.fn)


def presence_confusion(pred_presence: torch.Tensor,
                       true_presence: torch.Tensor) -> PresenceConfusion:
    """Counts over the cases of ``pred_presence`` and ``true_presence`` [B, S] (bool)."""
    if pred_presence.shape != true_presence.shape or pred_presence.ndim != 2:
        raise ValueError(f"presence predictions {tuple(pred_presence.shape)} and labels "
                         f"{tuple(true_presence.shape)} must both be [B, S]")
    counts = get_confusion_matrix(pred_presence.float(), true_presence.float()).sum(0).long()
    return PresenceConfusion(*counts.unbind(-1))


def balanced_accuracy(pred_presence: torch.Tensor, true_presence: torch.Tensor) -> torch.Tensor:
    """Per-structure balanced accuracy [S] of ``pred_presence`` against ``true_presence``
    [B, S] (bool): the mean of sensitivity and specificity over the classes that occur among
    the cases (scikit-learn's ``balanced_accuracy_score`` for each column); NaN without cases."""
    pred, true = pred_presence.bool(), true_presence.bool()
    present, absent = true.sum(0).float(), (~true).sum(0).float()
    # 0/0 is NaN for a class that never occurs, which nanmean then leaves out.
    sensitivity = (pred & true).sum(0).float() / present
    specificity = (~pred & ~true).sum(0).float() / absent
    return torch.stack([sensitivity, specificity]).nanmean(0)


class SegmentationScores:
    """Accumulates per-case, per-structure scores over batches.

    Args:
        structure_names: one name per structure; metric names use :func:`metric_key` of it.

    ``update`` takes thresholded masks [B, S, ...] and presence [B, S]; ``summary`` returns:

    - ``dice``, ``iou``: mean over structures of each structure's mean over the cases where it
      is defined; ``presence_accuracy``: fraction of correct presence calls;
    - ``dice_present``: like ``dice``, but each structure's mean covers only the cases whose
      target holds it (false-positive masks on absent structures are not counted);
    - ``presence_balanced_accuracy``: mean over structures of each structure's balanced
      accuracy, the mean of its sensitivity (present called present) and specificity (absent
      called absent) over those of the two classes that occur in its cases (sensitivity
      alone for a structure never absent, as scikit-learn's ``balanced_accuracy_score``);
    - ``dice_<name>``, ``iou_<name>``, ``presence_accuracy_<name>``, ``dice_present_<name>``,
      ``presence_balanced_accuracy_<name>`` per structure.

    A score with no defined case is NaN.
    """

    def __init__(self, structure_names: Sequence[str]) -> None:
        self.structure_names = list(structure_names)
        self._keys = [metric_key(name) for name in self.structure_names]
        if len(set(self._keys)) != len(self._keys):
            raise ValueError(f"structure names {self.structure_names} collide as metric names "
                             f"{self._keys}")
        self.reset()

    def reset(self) -> None:
        self._dice: list[torch.Tensor] = []
        self._iou: list[torch.Tensor] = []
        self._dice_present: list[torch.Tensor] = []
        self._pred_presence: list[torch.Tensor] = []
        self._true_presence: list[torch.Tensor] = []

    def update(self, pred_masks: torch.Tensor, true_masks: torch.Tensor,
               pred_presence: torch.Tensor, true_presence: torch.Tensor) -> None:
        if pred_masks.shape[1] != len(self.structure_names):
            raise ValueError(f"masks have {pred_masks.shape[1]} structures, but "
                             f"{len(self.structure_names)} structure names were given")
        dice = per_structure_dice(pred_masks, true_masks)
        self._dice.append(dice.cpu())
        target_present = true_masks.flatten(2).any(-1)
        self._dice_present.append(dice.masked_fill(~target_present, math.nan).cpu())
        self._iou.append(per_structure_iou(pred_masks, true_masks).cpu())
        self._pred_presence.append(pred_presence.bool().cpu())
        self._true_presence.append(true_presence.bool().cpu())

    def extend(self, other: SegmentationScores) -> None:
        """Add the cases ``other`` scored (another rank's share of a validation pass)."""
        self._dice += other._dice
        self._iou += other._iou
        self._dice_present += other._dice_present
        self._pred_presence += other._pred_presence
        self._true_presence += other._true_presence

    @property
    def num_cases(self) -> int:
        return sum(len(batch) for batch in self._dice)

    def summary(self) -> dict[str, float]:
        dice = self._stacked(self._dice).nanmean(0)
        iou = self._stacked(self._iou).nanmean(0)
        dice_present = self._stacked(self._dice_present).nanmean(0)
        pred, true = self._stacked(self._pred_presence), self._stacked(self._true_presence)
        accuracy = (pred == true).float().mean(0)
        balanced = balanced_accuracy(pred, true)
        scores = {"dice": _nanmean(dice), "iou": _nanmean(iou),
                  "presence_accuracy": _nanmean(accuracy),
                  "dice_present": _nanmean(dice_present),
                  "presence_balanced_accuracy": _nanmean(balanced)}
        for index, name in enumerate(self._keys):
            scores[f"dice_{name}"] = float(dice[index])
            scores[f"iou_{name}"] = float(iou[index])
            scores[f"presence_accuracy_{name}"] = float(accuracy[index])
            scores[f"dice_present_{name}"] = float(dice_present[index])
            scores[f"presence_balanced_accuracy_{name}"] = float(balanced[index])
        return scores

    def confusion(self) -> dict[str, dict[str, int]]:
        """Presence confusion counts per structure name: ``{"liver": {"tp": 3, ...}, ...}``."""
        counts = presence_confusion(self._stacked(self._pred_presence),
                                    self._stacked(self._true_presence))
        fields = ("tp", "fp", "tn", "fn")
        return {name: {field: int(getattr(counts, field)[index]) for field in fields}
                for index, name in enumerate(self.structure_names)}

    def per_case(self) -> list[dict[str, Any]]:
        """One JSON-ready record per case seen, in order; undefined scores are ``None``."""
        dice, iou = self._stacked(self._dice), self._stacked(self._iou)
        pred, true = self._stacked(self._pred_presence), self._stacked(self._true_presence)
        return [{
            "case": case,
            "dice": _by_name(self.structure_names, dice[case]),
            "iou": _by_name(self.structure_names, iou[case]),
            "presence_predicted": dict(zip(self.structure_names, pred[case].tolist())),
            "presence_true": dict(zip(self.structure_names, true[case].tolist())),
        } for case in range(len(dice))]

    def _stacked(self, batches: list[torch.Tensor]) -> torch.Tensor:
        if not batches:
            return torch.empty(0, len(self.structure_names))
        return torch.cat(batches)


def _nanmean(values: torch.Tensor) -> float:
    return float(values.nanmean())


def _by_name(names: Sequence[str], values: torch.Tensor) -> dict[str, float | None]:
    return {name: None if math.isnan(value) else value
            for name, value in zip(names, values.tolist())}


def _undefined_where_both_empty(scores: torch.Tensor, pred: torch.Tensor,
                                target: torch.Tensor) -> torch.Tensor:
    both_empty = ~(pred.flatten(2).any(-1) | target.flatten(2).any(-1))
    return scores.masked_fill(both_empty, math.nan)


def _check_masks(pred: torch.Tensor, target: torch.Tensor) -> None:
    if pred.shape != target.shape or pred.ndim < 3:
        raise ValueError(f"predicted masks {tuple(pred.shape)} and target masks "
                         f"{tuple(target.shape)} must have the same shape [B, S, ...]")
