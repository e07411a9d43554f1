"""The SADAAN training loss: seven weighted terms over masks, attention, presence and confidence."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from monai.losses import DiceLoss, FocalLoss
from torch import nn

from medseg.models.sadaan import SADAANOutput

TERMS = ("segmentation", "dice", "focal_seg", "absence", "attention_supervision",
         "false_positive_suppression", "confidence")

# A false positive is measured over the most confident 1% of the voxels: a compact false blob
# then counts fully instead of being diluted by the empty rest of the volume.
FALSE_POSITIVE_FRACTION = 0.01


class SADAANLoss(nn.Module):
    """``total = sum(weight * term)`` over the seven terms of the SADAAN pipeline.

    - ``segmentation``: voxel-wise BCE of the mask logits, every structure.
    - ``dice``: soft Dice (sigmoid) of the structures present in each case; Dice of an empty
      target says nothing.
    - ``focal_seg``: sigmoid focal loss (gamma 2) of the mask logits: the hard voxels.
    - ``absence``: BCE of the presence logits against the presence labels; with
      ``presence_rate`` each structure's absent and present cases weigh alike (see below).
    - ``attention_supervision``: soft Dice of the attention against the mask dilated by
      ``attention_margin`` voxels, present structures only: the attention must cover the
      structure (with a margin), while where to look for an absent one is left to the prior.
    - ``false_positive_suppression``: for absent structures, the mean probability of the most
      confident 1% of the voxels.
    - ``confidence``: squared error of the confidence against the quality actually achieved
      (detached): the soft Dice for present structures, one minus the false-positive mass for
      absent ones.

    Args:
        segmentation, dice, focal_seg, absence, attention_supervision,
        false_positive_suppression, confidence: non-negative weights; a zero weight skips the
            term entirely (not computed, not reported).
        attention_margin: how many voxels the attention target extends beyond the structure.
        presence_rate: the share of training cases in which each structure is present [S], or
            ``None`` (plain BCE, the seed's). Given, a present case of structure ``s`` weighs
            ``1 / (2 rate_s)`` and an absent one ``1 / (2 (1 - rate_s))`` in the ``absence``
            term, so a structure missing from 5 % of the cases is not learnt as "always
            present"; a structure always (or never) present keeps weight 1.

    ``forward(output, masks, presence)`` takes a :class:`SADAANOutput`, masks [B, S, H, W, D] and
    presence labels [B, S] (float, 0 or 1) and returns ``(total, terms)``: the scalar loss and
    each computed term unweighted and detached. Computed in float32, also under autocast.
    """

    def __init__(
        self,
        segmentation: float = 1.0,
        dice: float = 2.0,
        focal_seg: float = 1.0,
        absence: float = 1.0,
        attention_supervision: float = 0.5,
        false_positive_suppression: float = 0.5,
        confidence: float = 0.1,
        *,
        attention_margin: int = 2,
        presence_rate: torch.Tensor | None = None,
    ) -> None:
        super().__init__()
        weights = dict(zip(TERMS, (segmentation, dice, focal_seg, absence, attention_supervision,
                                   false_positive_suppression, confidence)))
        for name, weight in weights.items():
            if not weight >= 0:
                raise ValueError(f"loss weight {name} must be >= 0, got {weight}")
        if not any(weights.values()):
            raise ValueError("at least one SADAAN loss weight must be positive")
        if attention_margin < 0:
            raise ValueError(f"attention_margin must be >= 0, got {attention_margin}")
        self.weights = {name: float(weight) for name, weight in weights.items() if weight > 0}
        self.attention_margin = attention_margin
        self.presence_weights = None if presence_rate is None else _balancing_weights(presence_rate)
        self.dice = DiceLoss(sigmoid=True, reduction="none")
        self.attention_dice = DiceLoss(reduction="none")
        self.focal = FocalLoss(gamma=2.0, use_softmax=False)

    def forward(self, output: SADAANOutput, masks: torch.Tensor,
                presence: torch.Tensor) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        _check_shapes(output, masks, presence)
        with torch.autocast(device_type=masks.device.type, enabled=False):
            terms = self._terms(output, masks.float(), presence.float())
        total = sum(self.weights[name] * value for name, value in terms.items())
        return total, {name: value.detach() for name, value in terms.items()}

    def _terms(self, output: SADAANOutput, masks: torch.Tensor,
               presence: torch.Tensor) -> dict[str, torch.Tensor]:
        logits = output.segmentation.float()
        present = presence > 0.5
        wanted = self.weights.keys()
        terms: dict[str, torch.Tensor] = {}
        if "segmentation" in wanted:
            terms["segmentation"] = F.binary_cross_entropy_with_logits(logits, masks)
        if "focal_seg" in wanted:
            terms["focal_seg"] = self.focal(logits, masks)
        if "absence" in wanted:
            terms["absence"] = self._absence(output.presence.float(), presence)
        if "attention_supervision" in wanted:
            terms["attention_supervision"] = self._attention_supervision(
                output.attention.float(), masks, present)

        dice_losses = false_positive_mass = None
        if wanted & {"dice", "confidence"}:
            dice_losses = self.dice(logits[present].unsqueeze(1),
                                    masks[present].unsqueeze(1)).flatten()
            if "dice" in wanted:
                terms["dice"] = _mean_or_zero(dice_losses)
        if wanted & {"false_positive_suppression", "confidence"}:
            false_positive_mass = _top_probability_mass(logits[~present])
            if "false_positive_suppression" in wanted:
                terms["false_positive_suppression"] = _mean_or_zero(false_positive_mass)
        if "confidence" in wanted:
            achieved = torch.empty_like(presence)
            achieved[present] = 1.0 - dice_losses.detach()
            achieved[~present] = 1.0 - false_positive_mass.detach()
            terms["confidence"] = F.mse_loss(output.confidence.float(), achieved)
        return {name: terms[name] for name in TERMS if name in terms}

    def _absence(self, logits: torch.Tensor, presence: torch.Tensor) -> torch.Tensor:
        if self.presence_weights is None:
            return F.binary_cross_entropy_with_logits(logits, presence)
        if self.presence_weights.shape[1] != presence.shape[1]:
            raise ValueError(f"presence_rate has {self.presence_weights.shape[1]} structures, "
                             f"the presence labels {presence.shape[1]}")
        weights = self.presence_weights.to(presence.device)
        weight = torch.where(presence > 0.5, weights[1], weights[0])
        return F.binary_cross_entropy_with_logits(logits, presence, weight=weight)

    def _attention_supervision(self, attention: torch.Tensor, masks: torch.Tensor,
                               present: torch.Tensor) -> torch.Tensor:
        target = _dilate(masks[present], self.attention_margin)
        losses = self.attention_dice(attention[present].unsqueeze(1), target.unsqueeze(1)).flatten()
        return _mean_or_zero(losses)


def _balancing_weights(presence_rate) -> torch.Tensor:
    """[S] presence rates -> [2, S] weights of the absent (row 0) and present (row 1) cases."""
    rate = torch.as_tensor(presence_rate, dtype=torch.float32).flatten()
    if rate.numel() == 0 or not bool(((rate >= 0) & (rate <= 1)).all()):
        raise ValueError(f"presence_rate must be shares in [0, 1], got {rate.tolist()}")
    both = (rate > 0) & (rate < 1)
    safe = rate.clamp(1e-6, 1 - 1e-6)
    absent = torch.where(both, 0.5 / (1 - safe), torch.ones_like(rate))
    present = torch.where(both, 0.5 / safe, torch.ones_like(rate))
    return torch.stack([absent, present])


def _top_probability_mass(logits: torch.Tensor) -> torch.Tensor:
    """[N, *spatial] -> [N]: mean probability of the most confident voxels of each map."""
    flat = logits.flatten(1)
    k = max(1, math.ceil(FALSE_POSITIVE_FRACTION * flat.shape[1]))
    # sigmoid is monotone: pick the top logits first and squash only those.
    return torch.sigmoid(flat.topk(k, dim=1).values).mean(dim=1)


def _dilate(masks: torch.Tensor, radius: int) -> torch.Tensor:
    """Binary dilation of [N, H, W, D] masks by a (2 radius + 1)^3 box, one axis at a time."""
    if radius == 0:
        return masks
    size = 2 * radius + 1
    dilated = masks.unsqueeze(1)
    for kernel in ((size, 1, 1), (1, size, 1), (1, 1, size)):
        dilated = F.max_pool3d(dilated, kernel, stride=1, padding=tuple(k // 2 for k in kernel))
    return dilated.squeeze(1)


def _mean_or_zero(values: torch.Tensor) -> torch.Tensor:
    """The mean of ``values``, or 0 when there are none (no present or no absent structure in
    the batch); still part of the graph, so a loss made of such terms alone can back-propagate."""
    return values.sum() / max(values.numel(), 1)


def _check_shapes(output: SADAANOutput, masks: torch.Tensor, presence: torch.Tensor) -> None:
    if masks.shape != output.segmentation.shape:
        raise ValueError(f"masks of shape {tuple(masks.shape)} do not match the segmentation "
                         f"output {tuple(output.segmentation.shape)}")
    if presence.shape != output.presence.shape:
        raise ValueError(f"presence labels of shape {tuple(presence.shape)} do not match the "
                         f"presence output {tuple(output.presence.shape)}")
