"""The SMALabeller task: slices of volumes, the three losses, validation Dice and loss terms."""

from __future__ import annotations

import pytest
import torch
from monai.losses import DiceCELoss

from medseg.engine.precision import Precision
from medseg.models.unet import UNet
from medseg.tasks.smalabeller import (SegmentationLoss, SMALabellerSettings, SMALabellerTask,
                                      build, from_slices,
                                      to_slices, volume_dice)


def test_volumes_become_their_slices_and_back():
    volumes = torch.arange(2 * 1 * 3 * 4 * 5, dtype=torch.float32).reshape(2, 1, 3, 4, 5)
    slices = to_slices(volumes)
    assert slices.shape == (10, 1, 3, 4)
    assert torch.equal(slices[1 * 5 + 2], volumes[1, :, :, :, 2])
    assert torch.equal(from_slices(slices, 5), volumes)
    with pytest.raises(ValueError, match=r"volumes must be \[B, C, H, W, D\]"):
        to_slices(torch.zeros(2, 3, 4))


def test_combination_is_monais_dice_ce_with_its_terms():
    torch.manual_seed(0)
    logits, target = torch.randn(4, 1, 8, 8), (torch.rand(4, 1, 8, 8) > 0.7).float()
    total, terms = SegmentationLoss("combination")(logits, target)
    assert torch.allclose(total, DiceCELoss(sigmoid=True, smooth_nr=1e-5, smooth_dr=1e-5, batch=True)(
        logits, target))
    assert torch.allclose(total, terms["dice"] + terms["bce"])
    bce, no_terms = SegmentationLoss("cross_entropy")(logits, target)
    assert torch.allclose(bce, terms["bce"]) and no_terms == {}
    dice, _ = SegmentationLoss("dice")(logits, target)
    assert torch.allclose(dice, terms["dice"])
    with pytest.raises(ValueError, match="name must be one of dice, cross_entropy"):
        SegmentationLoss("focal")


def test_volume_dice():
    pred = torch.zeros(2, 1, 4, 4, 2, dtype=torch.bool)
    truth = pred.clone()
    pred[0, 0, :2] = True
    truth[0, 0, :1] = True
    dice = volume_dice(pred, truth)
    assert dice[0] == pytest.approx(2 * 8 / (16 + 8)) and dice[1] != dice[1]  # NaN: both empty


@pytest.mark.parametrize("dims", [2, 3])
def test_validation_reports_loss_terms_and_dice(dims):
    task = SMALabellerTask(SegmentationLoss("combination"), spatial_dims=dims)
    assert task.metric_names() == ["loss", "dice", "loss_dice", "loss_bce"]
    batch = {"image": torch.rand(2, 1, 8, 8, 4), "label": (torch.rand(2, 1, 8, 8, 4) > 0.5).float()}
    model = UNet(dims, channels=[2, 4]).eval()
    with torch.no_grad():
        metrics = task.validate(model, [batch], torch.device("cpu"), Precision("cpu", None))
    assert set(metrics) == {"loss", "dice", "loss_dice", "loss_bce"}
    assert metrics["loss"] == pytest.approx(metrics["loss_dice"] + metrics["loss_bce"], rel=1e-5)
    step = task.training_step(model.train(), batch, torch.device("cpu"))
    assert step.batch_size == (8 if dims == 2 else 2)  # slices (2D) or volumes (3D)
    triplets = task.triplets(model.eval(), batch, torch.device("cpu"))
    assert len(triplets) == 3 and all(t.shape == (8, 8) for t in triplets[0])


def test_initial_foreground_is_the_untrained_models_output_bias():
    model, _ = build(SMALabellerSettings(channels=[2, 4], initial_foreground=0.02))
    assert model.head.bias.item() == pytest.approx(torch.logit(torch.tensor(0.02)).item(), abs=1e-5)
    plain, _ = build(SMALabellerSettings(channels=[2, 4], initial_foreground=0.5))
    assert plain.head.bias.item() != pytest.approx(model.head.bias.item())
    with pytest.raises(ValueError, match=r"initial_foreground must be in \(0, 1\)"):
        SMALabellerSettings(initial_foreground=1.0)
