"""The SMALabeller U-Net: shapes for any input size, the original's widths, dropout used."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from medseg.models.unet import UNet


@pytest.mark.parametrize("dims, size", [(2, (37, 30)), (3, (20, 17, 9))])
def test_any_input_size_gives_logits_of_that_size(dims, size):
    model = UNet(dims, 1, 1, channels=[4, 8, 16])
    assert model(torch.randn(2, 1, *size)).shape == (2, 1, *size)


def test_default_widths_are_the_originals():
    widths = [m.out_channels for m in UNet(2).modules() if isinstance(m, nn.Conv2d)][::2][:5]
    assert widths == [64, 128, 256, 512, 1024]
    widths3 = [m.out_channels for m in UNet(3).modules() if isinstance(m, nn.Conv3d)][::2][:4]
    assert widths3 == [64, 128, 256, 512]


def test_dropout_rate_is_used_by_the_encoder():
    torch.manual_seed(0)
    model = UNet(2, 1, 1, channels=[4, 8], dropout=0.4)
    rates = {m.p for m in model.modules() if isinstance(m, nn.Dropout2d)}
    assert rates == {0.4}
    x = torch.randn(2, 1, 16, 16)
    model.train()
    assert not torch.allclose(model(x), model(x))
    model.eval()
    assert torch.allclose(model(x), model(x))
    assert not any(isinstance(m, nn.Dropout2d) for m in UNet(2, channels=[4, 8]).modules())


@pytest.mark.parametrize("kwargs, message", [({"spatial_dims": 4}, "spatial_dims must be 2 or 3"),
                                             ({"dropout": 1.0}, "dropout must be in"),
                                             ({"channels": [4]}, "at least 2 levels")])
def test_bad_arguments_are_named(kwargs, message):
    with pytest.raises(ValueError, match=message):
        UNet(**kwargs)


def test_output_bias_sets_the_untrained_models_foreground_probability():
    torch.manual_seed(0)
    x = torch.rand(4, 1, 16, 16)
    prior = torch.logit(torch.tensor(0.01)).item()
    with torch.no_grad():
        plain = torch.sigmoid(UNet(2, channels=[4, 8]).eval()(x)).mean()
        rare = torch.sigmoid(UNet(2, channels=[4, 8], output_bias=prior).eval()(x)).mean()
    # Zero bias: about half of every image is predicted foreground before any training.
    assert 0.3 < plain < 0.7 and rare < 0.05
