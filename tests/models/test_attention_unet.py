"""The Attention U-Net: MONAI's network, with deep-supervision outputs when asked."""

from __future__ import annotations

import pytest
import torch
from monai.networks.nets import AttentionUnet

from medseg.models.attention_unet import AttentionUNet


def test_output_shape_and_seed_channel_layout():
    net = AttentionUNet(spatial_dims=2, in_channels=1, num_classes=2,
                        channels=[64, 128, 256, 512, 512])
    net.eval()
    with torch.no_grad():
        out = net(torch.randn(1, 1, 32, 32))
    assert out.shape == (1, 2, 32, 32)
    assert net.downsampling == 16
    convs = [m for m in net.modules() if isinstance(m, torch.nn.Conv2d)]
    assert max(c.out_channels for c in convs) == 512


def test_without_deep_supervision_the_weights_are_monais():
    ours = AttentionUNet(2, 1, 2, [8, 16, 32])
    monai = AttentionUnet(spatial_dims=2, in_channels=1, out_channels=2, channels=[8, 16, 32],
                          strides=[2, 2])
    monai.load_state_dict(ours.state_dict())
    x = torch.randn(2, 1, 16, 16)
    ours.eval(), monai.eval()
    assert torch.allclose(ours(x), monai(x))


def test_deep_supervision_returns_one_logit_map_per_decoder_level_in_training():
    torch.manual_seed(0)
    net = AttentionUNet(2, 1, 2, [8, 16, 32, 64, 64], deep_supervision=True)
    x = torch.randn(2, 1, 32, 32)
    net.train()
    outputs = net(x)
    assert [tuple(o.shape) for o in outputs] == [(2, 2, 32, 32), (2, 2, 16, 16), (2, 2, 8, 8),
                                                 (2, 2, 4, 4)]
    # The full-resolution output is exactly MONAI's forward pass.
    assert torch.allclose(outputs[0], AttentionUnet.forward(net, x), atol=1e-6)
    sum(o.mean() for o in outputs).backward()
    assert all(p.grad is not None for p in net.supervision_heads.parameters())
    net.eval()
    assert net(x).shape == (2, 2, 32, 32)


def test_works_on_volumes_too():
    net = AttentionUNet(3, 1, 2, [4, 8, 16], deep_supervision=True)
    outputs = net(torch.randn(1, 1, 16, 16, 8))
    assert [tuple(o.shape[2:]) for o in outputs] == [(16, 16, 8), (8, 8, 4)]


def test_needs_two_levels():
    with pytest.raises(ValueError, match="at least 2 levels"):
        AttentionUNet(2, 1, 2, [8])
