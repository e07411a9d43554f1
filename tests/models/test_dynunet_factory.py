"""The DynUNet the aneurysm pipeline builds (MONAI's network, the seed's settings)."""

import math

import pytest
import torch
from monai.networks.nets import DynUNet

from ingredients.model import DynUNetModelIngredient, build_dynunet


@pytest.mark.parametrize("norm", ["instance", "batch", "group"])
def test_one_channel_logits_of_the_input_size(norm):
    model = build_dynunet([4, 8, 16, 32], 3, [1, 2, 2, 2], 0.1, norm, False)
    assert isinstance(model, DynUNet)
    x = torch.randn(2, 1, 8, 16, 16)
    assert model(x).shape == (2, 1, 8, 16, 16)


def test_the_output_starts_at_the_foreground_prior():
    model = build_dynunet([4, 8, 16, 32], 3, [1, 2, 2, 2], 0.0, "instance", False,
                          initial_foreground_probability=0.01)
    assert model.output_block.conv.conv.bias.item() == pytest.approx(math.log(0.01 / 0.99))
    model.eval()
    with torch.no_grad():
        probability = torch.sigmoid(model(torch.randn(1, 1, 8, 16, 16)))
    assert 0.001 < float(probability.median()) < 0.1


def test_checkpoint_configs_without_newer_entries_still_build():
    stored = {"filters": [4, 8, 16, 32], "kernel_size": 3, "strides": [1, 2, 2, 2],
              "dropout": 0.1, "norm_name": "instance", "res_block": False}
    model = DynUNetModelIngredient.from_config(stored)
    assert model.output_block.conv.conv.bias.item() != pytest.approx(math.log(0.01 / 0.99))
