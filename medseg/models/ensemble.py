"""Averaging the probabilities of several one-channel segmentation models."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

LOGIT_EPS = 1e-6


class ProbabilityEnsemble(nn.Module):
    """The mean of the members' sigmoid probabilities, returned as logits so that the
    ensemble is used exactly like one member (losses, sliding windows, thresholds).

    Args:
        members: models mapping [B, C, ...] to one-channel logits [B, 1, ...].

    Input [B, C, ...]; output logits [B, 1, ...] (float32).
    """

    def __init__(self, members: Sequence[nn.Module]) -> None:
        super().__init__()
        if not members:
            raise ValueError("an ensemble needs at least one model")
        self.members = nn.ModuleList(members)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        probability = torch.stack([torch.sigmoid(m(x).float()) for m in self.members]).mean(0)
        return torch.logit(probability, eps=LOGIT_EPS)
