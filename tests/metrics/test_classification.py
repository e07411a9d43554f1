"""Volume-level classification metrics."""

import math

import numpy as np
import pytest

from medseg.metrics.classification import BinaryClassificationScores, roc_auc, roc_curve


def rank_auc(scores, labels):
    """The probability that a random positive outscores a random negative (ties count half)."""
    pos = [s for s, y in zip(scores, labels) if y]
    neg = [s for s, y in zip(scores, labels) if not y]
    wins = sum((p > n) + 0.5 * (p == n) for p in pos for n in neg)
    return wins / (len(pos) * len(neg))


def test_auc_matches_the_rank_definition_with_ties():
    rng = np.random.default_rng(0)
    labels = rng.integers(0, 2, 40)
    scores = np.round(rng.random(40) + 0.4 * labels, 1)
    assert roc_auc(scores, labels) == pytest.approx(rank_auc(scores, labels))
    assert roc_auc([0.1, 0.2, 0.8, 0.9], [0, 0, 1, 1]) == 1.0
    assert roc_auc([0.9, 0.8, 0.2, 0.1], [0, 0, 1, 1]) == 0.0


def test_auc_is_nan_without_both_classes():
    assert math.isnan(roc_auc([0.2, 0.4], [1, 1]))
    assert math.isnan(roc_auc([], []))


def test_accuracies_per_class():
    scores = BinaryClassificationScores()
    for score, predicted, label in [(0.9, 1, 1), (0.8, 1, 1), (0.2, 0, 1), (0.7, 1, 0),
                                    (0.1, 0, 0)]:
        scores.add(score, predicted, label)
    summary = scores.summary()
    assert summary["accuracy"] == pytest.approx(3 / 5)
    assert summary["pos_accuracy"] == pytest.approx(2 / 3)
    assert summary["neg_accuracy"] == pytest.approx(1 / 2)
    assert summary["auc"] == pytest.approx(rank_auc([0.9, 0.8, 0.2, 0.7, 0.1], [1, 1, 1, 0, 0]))
    assert scores.confusion() == {"tp": 2, "fp": 1, "tn": 1, "fn": 1}


def test_a_missing_class_leaves_its_accuracy_undefined():
    scores = BinaryClassificationScores()
    scores.add(0.9, True, 1)
    summary = scores.summary()
    assert summary["pos_accuracy"] == 1.0 and math.isnan(summary["neg_accuracy"])
    assert math.isnan(summary["auc"])


def test_roc_curve_runs_from_origin_to_one():
    fpr, tpr = roc_curve([0.1, 0.4, 0.35, 0.8], [0, 0, 1, 1])
    assert (fpr[0], tpr[0]) == (0, 0) and (fpr[-1], tpr[-1]) == (1, 1)
    assert np.all(np.diff(fpr) >= 0) and np.all(np.diff(tpr) >= 0)
