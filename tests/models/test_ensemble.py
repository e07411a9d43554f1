"""The probability-averaging ensemble."""

import pytest
import torch
from torch import nn

from medseg.models.ensemble import ProbabilityEnsemble


class Constant(nn.Module):
    def __init__(self, logit: float) -> None:
        super().__init__()
        self.logit = logit

    def forward(self, x):
        return torch.full_like(x[:, :1], self.logit)


def test_the_ensemble_averages_probabilities_and_returns_logits():
    x = torch.zeros(2, 1, 3, 4, 4)
    out = ProbabilityEnsemble([Constant(0.0), Constant(torch.logit(torch.tensor(0.9)).item())])(x)
    assert out.shape == (2, 1, 3, 4, 4)
    assert torch.sigmoid(out).flatten()[0].item() == pytest.approx((0.5 + 0.9) / 2, abs=1e-5)


def test_one_member_is_that_member():
    x = torch.randn(1, 1, 2, 4, 4)
    member = nn.Conv3d(1, 1, 3, padding=1)
    out = ProbabilityEnsemble([member])(x)
    assert torch.allclose(torch.sigmoid(out), torch.sigmoid(member(x)), atol=1e-5)
    with pytest.raises(ValueError, match="at least one"):
        ProbabilityEnsemble([])
