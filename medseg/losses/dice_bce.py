"""Losses of the lung-tumour pipeline, chosen by name (the seed's ``loss.type``).

=============  ===================================================================
``dice_bce``   balanced cross-entropy + Dice (the seed's recommendation)
``dice``       Dice of the foreground classes only
``ce``         plain cross-entropy
``balanced_ce``  cross-entropy with each class weighted by its inverse area in the batch
``tversky``    Tversky loss of the foreground classes, missed tumour pixels weighted 0.7 and
               false alarms 0.3 (MONAI ``TverskyLoss``, alpha 0.3, beta 0.7)
=============  ===================================================================

Tumour pixels are about 0.4 % of a slice. Plain cross-entropy then rewards predicting
background everywhere; the balanced form gives the tumour pixels of a batch together the same
weight as the background pixels together. Dice is computed over the whole batch (MONAI's
``batch=True``) rather than per slice, so slices without tumour do not each contribute a
Dice of an empty target, which is undefined and makes per-slice Dice jumpy.

Dice weighs a missed tumour pixel and a false alarm alike. A network trained on it for small
tumours tends to under-segment (on the lung CPU recipe 74-100 % of the predicted pixels were
tumour but only 25-98 % of the tumour was found); Tversky's beta > alpha moves the balance
towards recall. 0.3/0.7 is the weighting Salehi et al. (2017) found best for small lesions.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from monai.losses import DiceLoss, TverskyLoss
from monai.losses import DeepSupervisionLoss as MonaiDeepSupervisionLoss
from torch import nn


LOSS_TYPES = ("dice_bce", "dice", "ce", "balanced_ce", "tversky")
TVERSKY_ALPHA, TVERSKY_BETA = 0.3, 0.7  # weights of false positives and of false negatives


def balanced_cross_entropy(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Mean over the classes present in the batch of each class's mean pixel cross-entropy.

    ``logits`` [B, C, ...], ``target`` [B, ...] class indices. Equal to cross-entropy with
    per-pixel weights ``N / (C_present * N_c)`` for a pixel of class ``c``.
    """
    per_pixel = F.cross_entropy(logits, target, reduction="none").flatten()
    classes = target.flatten()
    counts = torch.bincount(classes, minlength=logits.shape[1]).to(per_pixel.dtype)
    sums = torch.zeros_like(counts).index_add_(0, classes, per_pixel)
    present = counts > 0
    return (sums[present] / counts[present]).mean()


class SegmentationLoss(nn.Module):
    """A loss of :data:`LOSS_TYPES` on logits [B, C, H, W] and a class-index mask [B, 1, H, W].

    ``forward`` returns ``(total, terms)``: the loss to minimise and its unweighted terms,
    detached, for logging.
    """

    def __init__(self, loss_type: str = "dice_bce") -> None:
        super().__init__()
        if loss_type not in LOSS_TYPES:
            raise ValueError(f"loss_type must be one of {', '.join(map(repr, LOSS_TYPES))}, "
                             f"got {loss_type!r}")
        self.loss_type = loss_type
        self.dice = DiceLoss(include_background=False, to_onehot_y=True, softmax=True, batch=True)
        self.tversky = TverskyLoss(include_background=False, to_onehot_y=True, softmax=True,
                                   batch=True, alpha=TVERSKY_ALPHA, beta=TVERSKY_BETA)

    def forward(self, logits: torch.Tensor,
                target: torch.Tensor) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        logits = logits.float()
        indices = target[:, 0].long()
        terms: dict[str, torch.Tensor] = {}
        if self.loss_type in ("dice_bce", "balanced_ce"):
            terms["balanced_ce"] = balanced_cross_entropy(logits, indices)
        if self.loss_type == "ce":
            terms["ce"] = F.cross_entropy(logits, indices)
        if self.loss_type in ("dice_bce", "dice"):
            terms["dice"] = self.dice(logits, target)
        if self.loss_type == "tversky":
            terms["tversky"] = self.tversky(logits, target)
        total = torch.stack(list(terms.values())).sum()
        return total, {name: value.detach() for name, value in terms.items()}


class DeepSupervisionLoss(MonaiDeepSupervisionLoss):
    """MONAI's deep-supervision weighting (1, 0.5, 0.25, ... with ``weight_mode="exp"``, the
    target resized to each output with nearest neighbours) around a loss that also returns
    its terms. A single tensor (evaluation mode) is scored by the wrapped loss alone."""

    def forward(self, outputs: torch.Tensor | Sequence[torch.Tensor],
                target: torch.Tensor) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        if isinstance(outputs, torch.Tensor):
            return self.loss(outputs, target)
        weights = self.get_weights(len(outputs))
        total, terms = self.loss(outputs[0], target)
        total = total * weights[0]
        auxiliary = torch.zeros((), device=total.device)
        for weight, output in zip(weights[1:], outputs[1:]):
            level_total, _ = self.get_loss(output, target)
            auxiliary = auxiliary + weight * level_total
        terms["deep_supervision"] = auxiliary.detach()
        return total + auxiliary, terms


def build_loss(loss_type: str, *, deep_supervision: bool) -> nn.Module:
    loss = SegmentationLoss(loss_type)
    return DeepSupervisionLoss(loss, weight_mode="exp") if deep_supervision else loss
