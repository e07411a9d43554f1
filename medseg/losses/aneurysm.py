"""Dice + binary cross-entropy with a weight on positive voxels, for aneurysm cubes."""

from __future__ import annotations

import torch
from monai.losses import DiceLoss
from torch import nn


class WeightedDiceCELoss(nn.Module):
    """``dice * DiceLoss + ce * BCEWithLogits(pos_weight)`` on one-channel logits.

    MONAI's ``DiceCELoss(weight=...)`` would also multiply its Dice term by the weight (a
    class weight there), so with the seed's ``pos_weight`` of 128 the Dice term would be
    128 times larger; here ``pos_weight`` only weights the positive voxels of the
    cross-entropy, as the seed describes it. The Dice term sums over the batch: a random crop
    of a negative cube has an empty target, whose per-sample Dice is 0 whatever the model
    predicts.

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
        self.dice_weight = dice
        self.ce_weight = ce
        self.dice = DiceLoss(sigmoid=True, batch=True)
        self.register_buffer("pos_weight", torch.tensor([float(pos_weight)]))

    def forward(self, logits: torch.Tensor,
                target: torch.Tensor) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        logits = logits.float()
        pos_weight = self.pos_weight.to(logits.device).view(1, -1, *([1] * (logits.dim() - 2)))
        dice = self.dice(logits, target)
        ce = nn.functional.binary_cross_entropy_with_logits(logits, target, pos_weight=pos_weight)
        total = self.dice_weight * dice + self.ce_weight * ce
        return total, {"dice": dice.detach(), "ce": ce.detach()}
