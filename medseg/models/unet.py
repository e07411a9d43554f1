"""The SMALabeller U-Net, 2D (slice-wise) or 3D.

Encoder levels of two ``conv 3 (no bias) -> BatchNorm -> LeakyReLU -> Dropout`` blocks with
max-pooling between them; decoder levels of a stride-2 transposed convolution, concatenation
with the encoder's features at that level and two ``conv -> BatchNorm -> LeakyReLU`` blocks
(no dropout); a 1x1 convolution to ``out_channels`` logits.

Inputs of any size are accepted: the input is zero-padded up to a multiple of
``2 ** (levels - 1)`` and the logits cropped back, so every output pixel has its own
prediction (the original padded the *output* with zeros instead, which gives the border pixels
a fixed probability of 0.5).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

SEED_CHANNELS = {2: (64, 128, 256, 512, 1024), 3: (64, 128, 256, 512)}


def _layers(spatial_dims: int):
    if spatial_dims == 2:
        return nn.Conv2d, nn.BatchNorm2d, nn.Dropout2d, nn.MaxPool2d, nn.ConvTranspose2d
    if spatial_dims == 3:
        return nn.Conv3d, nn.BatchNorm3d, nn.Dropout3d, nn.MaxPool3d, nn.ConvTranspose3d
    raise ValueError(f"spatial_dims must be 2 or 3, got {spatial_dims}")


class _DoubleConv(nn.Sequential):
    def __init__(self, spatial_dims: int, in_channels: int, out_channels: int,
                 dropout: float) -> None:
        conv, norm, drop, _, _ = _layers(spatial_dims)
        layers: list[nn.Module] = []
        for channels_in in (in_channels, out_channels):
            layers += [conv(channels_in, out_channels, 3, padding=1, bias=False),
                       norm(out_channels), nn.LeakyReLU(inplace=True)]
            if dropout > 0:
                layers.append(drop(dropout))
        super().__init__(*layers)


class UNet(nn.Module):
    """``[B, in_channels, *spatial] -> [B, out_channels, *spatial]`` logits.

    Args:
        spatial_dims: 2 (slices) or 3 (volumes).
        in_channels, out_channels: image channels and label channels (1 for a binary label
            read through a sigmoid).
        channels: features per level, the last the bottleneck (the original: 64 ... 1024 in
            2D, 64 ... 512 in 3D).
        dropout: probability of the encoder's dropout layers (0: none).
        output_bias: initial bias of the head's logits (0: PyTorch's zero bias, a sigmoid
            of 0.5 everywhere). For a rare foreground, the logit of its prior probability
            (``log(p / (1 - p))``, the "prior" initialisation of Lin et al., focal loss):
            Adam moves a bias by about its learning rate per step, so from 0 it takes
            thousands of steps to reach a prior of 1 % while every background pixel is
            predicted foreground.
    """

    def __init__(self, spatial_dims: int = 2, in_channels: int = 1, out_channels: int = 1,
                 channels: Sequence[int] | None = None, dropout: float = 0.0,
                 output_bias: float = 0.0) -> None:
        super().__init__()
        _, _, _, pool, up = _layers(spatial_dims)
        channels = tuple(channels or SEED_CHANNELS[spatial_dims])
        if len(channels) < 2:
            raise ValueError(f"channels needs at least 2 levels, got {list(channels)}")
        if not 0 <= dropout < 1:
            raise ValueError(f"dropout must be in [0, 1), got {dropout}")
        self.spatial_dims = spatial_dims
        self.multiple = 2 ** (len(channels) - 1)
        self.encoders = nn.ModuleList()
        previous = in_channels
        for width in channels:
            self.encoders.append(_DoubleConv(spatial_dims, previous, width, dropout))
            previous = width
        self.pool = pool(2)
        self.upsamplers = nn.ModuleList()
        self.decoders = nn.ModuleList()
        for width in reversed(channels[:-1]):
            self.upsamplers.append(up(previous, width, kernel_size=2, stride=2))
            self.decoders.append(_DoubleConv(spatial_dims, 2 * width, width, 0.0))
            previous = width
        conv = _layers(spatial_dims)[0]
        self.head = conv(previous, out_channels, kernel_size=1)
        if output_bias:
            nn.init.constant_(self.head.bias, output_bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        size = x.shape[2:]
        padding: list[int] = []
        for extent in reversed(size):  # F.pad lists the last axis first
            padding += [0, (-extent) % self.multiple]
        x = F.pad(x, padding)
        skips = []
        for index, encoder in enumerate(self.encoders):
            x = encoder(x if index == 0 else self.pool(x))
            skips.append(x)
        for upsample, decoder, skip in zip(self.upsamplers, self.decoders, reversed(skips[:-1])):
            x = decoder(torch.cat([skip, upsample(x)], dim=1))
        logits = self.head(x)
        return logits[(slice(None), slice(None), *(slice(0, s) for s in size))]
