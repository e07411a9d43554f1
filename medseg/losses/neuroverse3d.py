"""The Neuroverse3D loss: ``scale x`` mean smooth L3/L1 distance between the linear output and
the target (a binary mask for segmentation).

Per voxel, with ``d = |pred - target|``: ``d^3 / (3 beta^2)`` below ``beta``, ``d - 2 beta / 3``
above (value and slope continuous at ``beta``). The original uses one L1-type loss for
segmentation and image generation alike (``utils/losses.py``: scale 50, beta 1); near zero the
cubic term gives small errors a small gradient, far away the L1 branch keeps outliers bounded.
"""

from __future__ import annotations

import torch
from torch import nn


class SmoothL3L1Loss(nn.Module):
    """``forward(pred, target) -> (total, {"smooth_l3_l1": unscaled mean})``; any equal shapes."""

    def __init__(self, beta: float = 1.0, scale: float = 50.0) -> None:
        super().__init__()
        if beta <= 0:
            raise ValueError(f"beta must be > 0, got {beta}")
        if scale <= 0:
            raise ValueError(f"scale must be > 0, got {scale}")
        self.beta, self.scale = float(beta), float(scale)

    def forward(self, pred: torch.Tensor, target: torch.Tensor):
        if pred.shape != target.shape:
            raise ValueError(f"pred {list(pred.shape)} and target {list(target.shape)} must have "
                             "the same shape")
        d = (pred.float() - target.float()).abs()
        per_voxel = torch.where(d < self.beta, d.pow(3) / (3 * self.beta ** 2), d - 2 * self.beta / 3)
        mean = per_voxel.mean()
        return self.scale * mean, {"smooth_l3_l1": mean.detach()}
