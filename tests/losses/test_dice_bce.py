"""The lung-tumour losses: balanced CE, Dice, their sum, and deep supervision."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from medseg.losses.dice_bce import (
    DeepSupervisionLoss,
    SegmentationLoss,
    balanced_cross_entropy,
    build_loss,
)


def small_tumour_batch():
    target = torch.zeros(2, 1, 16, 16)
    target[0, 0, 4:7, 4:7] = 1  # 9 of 512 pixels are tumour
    return target


def test_balanced_ce_weighs_both_classes_equally():
    target = small_tumour_batch()
    indices = target[:, 0].long()
    # Background predicted right with confidence, tumour predicted as background.
    logits = torch.zeros(2, 2, 16, 16)
    logits[:, 0] = 4.0
    plain = F.cross_entropy(logits, indices)
    balanced = balanced_cross_entropy(logits, indices)
    per_pixel = F.cross_entropy(logits, indices, reduction="none")
    expected = (per_pixel[indices == 0].mean() + per_pixel[indices == 1].mean()) / 2
    assert balanced == pytest.approx(float(expected))
    assert balanced > 10 * plain  # the missed tumour dominates only in the balanced form


def test_balanced_ce_equals_class_weighted_ce():
    torch.manual_seed(0)
    logits = torch.randn(2, 2, 16, 16)
    indices = small_tumour_batch()[:, 0].long()
    counts = torch.bincount(indices.flatten(), minlength=2).float()
    weights = counts.sum() / (2 * counts)
    assert balanced_cross_entropy(logits, indices) == pytest.approx(
        float(F.cross_entropy(logits, indices, weight=weights)), rel=1e-5)


def test_balanced_ce_without_tumour_is_plain_ce():
    logits = torch.randn(1, 2, 8, 8)
    indices = torch.zeros(1, 8, 8, dtype=torch.long)
    assert balanced_cross_entropy(logits, indices) == pytest.approx(
        float(F.cross_entropy(logits, indices)))


@pytest.mark.parametrize("loss_type, terms", [("dice_bce", ["balanced_ce", "dice"]),
                                              ("dice", ["dice"]), ("ce", ["ce"]),
                                              ("balanced_ce", ["balanced_ce"]),
                                              ("tversky", ["tversky"])])
def test_each_type_returns_its_terms_and_their_sum(loss_type, terms):
    torch.manual_seed(1)
    logits = torch.randn(2, 2, 16, 16, requires_grad=True)
    total, parts = SegmentationLoss(loss_type)(logits, small_tumour_batch())
    assert sorted(parts) == terms
    assert float(total.detach()) == pytest.approx(sum(float(v) for v in parts.values()), rel=1e-6)
    total.backward()
    assert logits.grad is not None and torch.isfinite(logits.grad).all()


def test_losses_are_low_for_the_right_answer_and_high_for_the_wrong_one():
    target = small_tumour_batch()
    right = torch.cat([1 - target, target], dim=1) * 20 - 10
    wrong = -right
    for loss_type in ("dice_bce", "dice", "ce", "balanced_ce", "tversky"):
        loss = SegmentationLoss(loss_type)
        assert float(loss(right, target)[0]) < 0.05 < 0.5 < float(loss(wrong, target)[0]), loss_type


def test_tversky_costs_a_missed_tumour_pixel_more_than_a_false_alarm():
    # Tversky's beta 0.7 > alpha 0.3 makes missed pixels dearer than Dice does: a network
    # trained on it leans towards finding all of a small tumour.
    target = small_tumour_batch()
    tumour = target.bool()
    missed, false_alarm = tumour.clone(), tumour.clone()
    missed.view(-1)[tumour.view(-1).nonzero()[:4]] = False  # four tumour pixels not found
    background = (~tumour).view(-1).nonzero()[:4]
    false_alarm.view(-1)[background] = True                  # four background pixels called tumour

    def logits(mask):
        return torch.cat([~mask, mask], dim=1).float() * 20 - 10

    def ratio(loss_type):  # the cost of the misses over the cost of the false alarms
        loss = SegmentationLoss(loss_type)
        return float(loss(logits(missed), target)[0]) / float(loss(logits(false_alarm), target)[0])

    assert ratio("tversky") > 1.5 * ratio("dice")


def test_dice_ignores_the_background_class():
    target = small_tumour_batch()
    # Perfect background, tumour missed: foreground Dice loss stays near 1.
    logits = torch.zeros(2, 2, 16, 16)
    logits[:, 0] = 10
    assert float(SegmentationLoss("dice")(logits, target)[0]) > 0.95


def test_unknown_type_names_the_argument():
    with pytest.raises(ValueError, match="loss_type must be one of 'dice_bce', 'dice', 'ce', "
                                          "'balanced_ce', 'tversky', got 'focal'"):
        SegmentationLoss("focal")


def test_deep_supervision_adds_halving_weighted_lower_levels():
    torch.manual_seed(2)
    target = small_tumour_batch()
    outputs = [torch.randn(2, 2, 16, 16), torch.randn(2, 2, 8, 8), torch.randn(2, 2, 4, 4)]
    base = SegmentationLoss("dice_bce")
    total, terms = DeepSupervisionLoss(base)(outputs, target)
    lower = [base(o, F.interpolate(target, size=o.shape[2:], mode="nearest-exact"))[0]
             for o in outputs[1:]]
    expected = base(outputs[0], target)[0] + 0.5 * lower[0] + 0.25 * lower[1]
    assert float(total) == pytest.approx(float(expected), rel=1e-5)
    auxiliary = float(0.5 * lower[0] + 0.25 * lower[1])
    assert float(terms["deep_supervision"]) == pytest.approx(auxiliary, rel=1e-5)


def test_deep_supervision_on_a_single_output_is_the_plain_loss():
    logits = torch.randn(2, 2, 16, 16)
    loss = build_loss("dice", deep_supervision=True)
    assert float(loss(logits, small_tumour_batch())[0]) == pytest.approx(
        float(SegmentationLoss("dice")(logits, small_tumour_batch())[0]))
