"""Binary classification of whole volumes from a score: accuracy per class and ROC AUC.

Conventions: a class with no case leaves its accuracy undefined (NaN), and AUC is NaN unless
both classes are present; NaN scores are left out of every mean by the caller.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
import torch
from monai.metrics import compute_roc_auc


def roc_auc(scores: Sequence[float], labels: Sequence[int]) -> float:
    """Area under the ROC curve of ``scores`` for binary ``labels`` (MONAI's), NaN when only
    one class is present (MONAI warns and returns NaN; here it is expected, not a warning)."""
    labels = np.asarray(labels, dtype=int)
    if len(labels) == 0 or labels.min() == labels.max():
        return math.nan
    return float(compute_roc_auc(torch.as_tensor(np.asarray(scores, dtype=np.float64)),
                                 torch.as_tensor(labels)))


def roc_curve(scores: Sequence[float], labels: Sequence[int]) -> tuple[np.ndarray, np.ndarray]:
    """False- and true-positive rates at every distinct score threshold, from (0, 0) to (1, 1)."""
    scores = np.asarray(scores, dtype=float)
    labels = np.asarray(labels, dtype=int)
    thresholds = np.r_[np.inf, np.unique(scores)[::-1]]
    positives, negatives = max(labels.sum(), 1), max((1 - labels).sum(), 1)
    tpr = np.array([((scores >= t) & (labels == 1)).sum() / positives for t in thresholds])
    fpr = np.array([((scores >= t) & (labels == 0)).sum() / negatives for t in thresholds])
    return fpr, tpr


class BinaryClassificationScores:
    """Collects per-volume scores, predicted and true labels.

    ``summary`` returns ``accuracy`` (all volumes), ``pos_accuracy`` (sensitivity: positives
    called positive), ``neg_accuracy`` (specificity) and ``auc`` of the scores.
    """

    def __init__(self) -> None:
        self.scores: list[float] = []
        self.predicted: list[int] = []
        self.labels: list[int] = []

    def add(self, score: float, predicted: bool, label: int) -> None:
        self.scores.append(float(score))
        self.predicted.append(int(bool(predicted)))
        self.labels.append(int(label))

    def __len__(self) -> int:
        return len(self.labels)

    def summary(self) -> dict[str, float]:
        labels, predicted = np.asarray(self.labels), np.asarray(self.predicted)
        correct = labels == predicted
        return {
            "accuracy": _mean(correct),
            "pos_accuracy": _mean(correct[labels == 1]),
            "neg_accuracy": _mean(correct[labels == 0]),
            "auc": roc_auc(self.scores, self.labels),
        }

    def confusion(self) -> dict[str, int]:
        labels, predicted = np.asarray(self.labels), np.asarray(self.predicted)
        return {"tp": int(((labels == 1) & (predicted == 1)).sum()),
                "fp": int(((labels == 0) & (predicted == 1)).sum()),
                "tn": int(((labels == 0) & (predicted == 0)).sum()),
                "fn": int(((labels == 1) & (predicted == 0)).sum())}


def _mean(values: np.ndarray) -> float:
    return float(values.mean()) if values.size else math.nan
