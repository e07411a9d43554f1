"""Dice + cross-entropy with a positive-voxel weight."""

import pytest
import torch
from monai.losses import DiceLoss

from medseg.losses.aneurysm import WeightedDiceCELoss


def example():
    torch.manual_seed(0)
    logits = torch.randn(2, 1, 4, 8, 8, requires_grad=True)
    target = (torch.rand(2, 1, 4, 8, 8) > 0.9).float()
    return logits, target


def test_terms_are_monai_dice_over_the_batch_and_weighted_bce():
    logits, target = example()
    total, terms = WeightedDiceCELoss(pos_weight=5.0, dice=2.0, ce=0.5)(logits, target)
    dice = DiceLoss(sigmoid=True, batch=True)(logits, target)
    weight = torch.tensor([5.0]).view(1, 1, 1, 1, 1)
    ce = torch.nn.BCEWithLogitsLoss(pos_weight=weight)(logits, target)
    assert terms["dice"] == pytest.approx(float(dice.detach()))
    assert terms["ce"] == pytest.approx(float(ce.detach()))
    expected = 2.0 * float(dice.detach()) + 0.5 * float(ce.detach())
    assert float(total.detach()) == pytest.approx(expected)
    total.backward()
    assert logits.grad is not None and torch.isfinite(logits.grad).all()


def test_pos_weight_scales_only_the_positive_voxels():
    logits, target = example()
    positives_only = torch.where(target > 0, logits, torch.full_like(logits, -30.0))
    positives_only = positives_only.detach()
    low = WeightedDiceCELoss(pos_weight=1.0)(positives_only, target)[1]["ce"]
    high = WeightedDiceCELoss(pos_weight=128.0)(positives_only, target)[1]["ce"]
    assert float(high) == pytest.approx(128 * float(low), rel=1e-4)
    dice_low = WeightedDiceCELoss(pos_weight=1.0)(logits, target)[1]["dice"]
    dice_high = WeightedDiceCELoss(pos_weight=128.0)(logits, target)[1]["dice"]
    assert float(dice_low) == pytest.approx(float(dice_high))  # unlike MONAI's DiceCELoss weight


def test_a_zero_weight_leaves_its_term_out():
    logits, target = example()
    total, terms = WeightedDiceCELoss(dice=0.0, ce=1.0)(logits, target)
    assert total.item() == pytest.approx(terms["ce"].item())
    total, terms = WeightedDiceCELoss(dice=1.0, ce=0.0)(logits, target)
    assert total.item() == pytest.approx(terms["dice"].item())
    with pytest.raises(ValueError, match="not both 0"):
        WeightedDiceCELoss(dice=0.0, ce=0.0)


def test_total_equals_monai_dice_ce_with_the_weight_as_bce_pos_weight():
    from monai.losses import DiceCELoss
    logits, target = example()
    total, _ = WeightedDiceCELoss(pos_weight=128.0, dice=1.5, ce=0.5)(logits, target)
    monai_total = DiceCELoss(sigmoid=True, batch=True, lambda_dice=1.5, lambda_ce=0.5,
                             weight=torch.tensor([128.0]))(logits, target)
    assert float(total.detach()) == pytest.approx(float(monai_total.detach()))
