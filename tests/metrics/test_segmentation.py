import json
import math

import pytest
import torch
from sklearn.metrics import balanced_accuracy_score

from medseg.metrics.segmentation import (
    SegmentationScores,
    balanced_accuracy,
    metric_key,
    per_structure_dice,
    per_structure_iou,
    presence_confusion,
)


def masks_from(rows: list[list[str]]) -> torch.Tensor:
    """[B, S, N] masks from strings of 0/1, one string per (case, structure)."""
    return torch.tensor([[[int(v) for v in row] for row in case] for case in rows],
                        dtype=torch.float32)


# One case, four structures: partial overlap, missed structure, false positive on an empty
# target, both empty.
PRED = masks_from([["1100", "0000", "0010", "0000"]])
TARGET = masks_from([["0110", "1000", "0000", "0000"]])


def test_dice_by_hand():
    dice = per_structure_dice(PRED, TARGET)
    assert dice.shape == (1, 4)
    torch.testing.assert_close(dice[0, :3], torch.tensor([0.5, 0.0, 0.0]))
    assert math.isnan(dice[0, 3])


def test_iou_by_hand():
    iou = per_structure_iou(PRED, TARGET)
    torch.testing.assert_close(iou[0, :3], torch.tensor([1 / 3, 0.0, 0.0]))
    assert math.isnan(iou[0, 3])


def test_scores_on_3d_masks_and_a_single_structure():
    pred = torch.zeros(2, 1, 4, 4, 4)
    target = torch.zeros(2, 1, 4, 4, 4)
    pred[0, 0, :2] = 1  # 32 voxels
    target[0, 0, :1] = 1  # 16 voxels, all inside the prediction
    pred[1, 0, 0, 0, 0] = 1
    target[1, 0, 0, 0, 0] = 1
    torch.testing.assert_close(per_structure_dice(pred, target),
                               torch.tensor([[2 * 16 / 48], [1.0]]))
    torch.testing.assert_close(per_structure_iou(pred, target), torch.tensor([[0.5], [1.0]]))


def test_mismatched_masks_are_rejected():
    with pytest.raises(ValueError, match=r"\(1, 4, 4\).*\(1, 4, 3\)"):
        per_structure_dice(PRED, TARGET[..., :3])


def test_presence_confusion_counts():
    predicted = torch.tensor([[True, True, False], [True, False, False], [False, True, True]])
    true = torch.tensor([[True, False, False], [False, False, True], [True, True, True]])
    counts = presence_confusion(predicted, true)
    assert counts.tp.tolist() == [1, 1, 1]
    assert counts.fp.tolist() == [1, 1, 0]
    assert counts.tn.tolist() == [0, 1, 1]
    assert counts.fn.tolist() == [1, 0, 1]


def two_batches() -> SegmentationScores:
    scores = SegmentationScores(["liver", "kidney.left", "spleen"])
    # Case 0: liver half right, kidney found, spleen both empty.
    scores.update(masks_from([["1100", "0011", "0000"]]), masks_from([["0110", "0011", "0000"]]),
                  torch.tensor([[1, 1, 0]]), torch.tensor([[1, 1, 0]]))
    # Case 1: liver perfect, kidney predicted where there is none, spleen missed.
    scores.update(masks_from([["1000", "0100", "0000"]]), masks_from([["1000", "0000", "0001"]]),
                  torch.tensor([[1, 1, 0]]), torch.tensor([[1, 0, 1]]))
    return scores


def test_accumulated_scores():
    result = two_batches().summary()

    assert result["dice_liver"] == pytest.approx(0.75)
    assert result["dice_kidney_left"] == pytest.approx(0.5)
    assert result["dice_spleen"] == pytest.approx(0.0)  # the both-empty case is left out
    assert result["dice"] == pytest.approx((0.75 + 0.5 + 0.0) / 3)
    assert result["iou_liver"] == pytest.approx((1 / 3 + 1) / 2)
    assert result["presence_accuracy_liver"] == 1.0
    assert result["presence_accuracy_kidney_left"] == 0.5
    assert result["presence_accuracy_spleen"] == 0.5
    assert result["presence_accuracy"] == pytest.approx(4 / 6)
    assert not any("." in name for name in result)


def test_cases_are_counted_across_batches():
    assert two_batches().num_cases == 2


def test_structure_never_defined_is_nan_and_left_out_of_the_mean():
    scores = SegmentationScores(["a", "b"])
    scores.update(masks_from([["11", "00"]]), masks_from([["11", "00"]]),
                  torch.tensor([[1, 0]]), torch.tensor([[1, 0]]))
    result = scores.summary()
    assert math.isnan(result["dice_b"])
    assert result["dice"] == 1.0


def test_per_case_records_are_json_ready():
    records = two_batches().per_case()

    assert [record["case"] for record in records] == [0, 1]
    assert records[0]["dice"] == {"liver": 0.5, "kidney.left": 1.0, "spleen": None}
    assert records[1]["iou"]["kidney.left"] == 0.0
    assert records[1]["presence_predicted"] == {"liver": True, "kidney.left": True, "spleen": False}
    assert records[1]["presence_true"] == {"liver": True, "kidney.left": False, "spleen": True}
    json.loads(json.dumps(records, allow_nan=False))


def test_confusion_per_structure_and_reset():
    scores = two_batches()
    assert scores.confusion() == {
        "liver": {"tp": 2, "fp": 0, "tn": 0, "fn": 0},
        "kidney.left": {"tp": 1, "fp": 1, "tn": 0, "fn": 0},
        "spleen": {"tp": 0, "fp": 0, "tn": 1, "fn": 1},
    }
    scores.reset()
    assert scores.per_case() == []
    assert math.isnan(scores.summary()["dice"])


def test_structure_names_must_match_the_masks():
    scores = SegmentationScores(["liver"])
    with pytest.raises(ValueError, match="2 structures"):
        scores.update(masks_from([["1", "0"]]), masks_from([["1", "0"]]),
                      torch.tensor([[1, 0]]), torch.tensor([[1, 0]]))


def test_metric_key_has_no_dots():
    assert metric_key("kidney.left (L1)") == "kidney_left__L1_"
    assert metric_key("spleen_2") == "spleen_2"


def test_colliding_metric_names_are_rejected():
    with pytest.raises(ValueError, match="collide"):
        SegmentationScores(["kidney.left", "kidney_left"])


def test_dice_over_present_structures_leaves_out_false_positives_on_absent_ones():
    result = two_batches().summary()

    # The kidney's false-positive mask in case 1 (absent there) counts 0 in `dice` only.
    assert result["dice_present_kidney_left"] == pytest.approx(1.0)
    assert result["dice_kidney_left"] == pytest.approx(0.5)
    assert result["dice_present_liver"] == pytest.approx(0.75)
    # A present structure whose mask is missed still counts 0.
    assert result["dice_present_spleen"] == pytest.approx(0.0)
    assert result["dice_present"] == pytest.approx((0.75 + 1.0 + 0.0) / 3)


def test_balanced_accuracy_weighs_absent_cases_as_much_as_present_ones():
    scores = SegmentationScores(["gallbladder", "liver"])
    empty, full = "00", "11"
    # The gallbladder is absent in case 3 only and always called present; the liver is always
    # present and called so.
    for absent in (False, False, False, True):
        target = [empty if absent else full, full]
        scores.update(masks_from([[full, full]]), masks_from([target]),
                      torch.tensor([[1, 1]]), torch.tensor([[0 if absent else 1, 1]]))
    result = scores.summary()

    assert result["presence_accuracy_gallbladder"] == pytest.approx(0.75)
    assert result["presence_balanced_accuracy_gallbladder"] == pytest.approx(0.5)
    # Never absent: only its sensitivity is defined, as scikit-learn computes it.
    assert result["presence_balanced_accuracy_liver"] == pytest.approx(1.0)
    assert result["presence_balanced_accuracy"] == pytest.approx(0.75)
    assert result["presence_accuracy"] == pytest.approx(0.875)


def test_balanced_accuracy_matches_scikit_learn_per_structure():
    generator = torch.Generator().manual_seed(0)
    true = torch.rand(40, 3, generator=generator) > 0.3
    pred = torch.rand(40, 3, generator=generator) > 0.4
    ours = balanced_accuracy(pred, true)
    for column in range(3):
        expected = balanced_accuracy_score(true[:, column], pred[:, column])
        assert float(ours[column]) == pytest.approx(expected)
