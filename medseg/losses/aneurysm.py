"""Dice + binary cross-entropy with a weight on positive voxels, for aneurysm cubes."""

from __future__ import annotations

import torch
from monai.losses import DiceCELoss
from torch import nn


class WeightedDiceCELoss(nn.Module):
    """MONAI's ``DiceCELoss`` on one-channel logits, returning its two terms as well.

    ``total = dice * DiceLoss + ce * BCEWithLogits(pos_weight)``. The weight reaches only the
    cross-entropy: for a single output channel MONAI applies ``DiceCELoss(weight=...)`` as
    the BCE's ``pos_weight`` and leaves the Dice term unweighted (its class weights apply
    only to multi-channel targets), which is what the seed's ``pos_weight`` means. The Dice
    term sums over the batch: a random crop of a negative cube has an empty target, whose
    per-sample Dice is 0 whatever the model predicts. This wrapper exists because the engine
    logs each term (``train_loss_dice``, ``train_loss_ce``), which ``DiceCELoss`` does not
    hand back.

    Args:
        pos_weight: weight of positive voxels in the cross-entropy (aneurysm voxels are rare).
        dice: weight of the Dice term (0 leaves it out).
        ce: weight of the cross-entropy term (0 leaves it out).

    Input: ``logits`` and binary ``target`` [B, 1, D, H, W]. Output: the total and its
    unweighted terms ``{"dice", "ce"}`` (detached).
    """

    def __init__(self, pos_weight: float = 128.0, dice: float = 1.0, ce: float = 1.0) -> None:
        super().__init__()
        if dice < 0 or ce < 0 or dice + ce == 0:
            raise ValueError(f"loss weights must be >= 0 and not both 0, got dice={dice}, ce={ce}")
        self.dice_ce = DiceCELoss(sigmoid=True, batch=True, lambda_dice=dice, lambda_ce=ce,
                                  weight=torch.tensor([float(pos_weight)]))

    def forward(self, logits: torch.Tensor,
                target: torch.Tensor) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        if logits.shape[1] != 1:
            raise ValueError(f"logits must have one channel, got shape {tuple(logits.shape)}")
        logits = logits.float()
        self.dice_ce.to(logits.device)  # the pos_weight buffer follows the logits
        dice = self.dice_ce.dice(logits, target)
        ce = self.dice_ce.bce(logits, target.float())
        total = self.dice_ce.lambda_dice * dice + self.dice_ce.lambda_ce * ce
        return total, {"dice": dice.detach(), "ce": ce.detach()}
