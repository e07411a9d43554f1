"""MONAI's Attention U-Net with optional deep supervision.

MONAI's ``AttentionUnet`` has no deep-supervision outputs; this subclass adds a 1x1
convolution on the output of each lower decoder level and, in training mode, returns those
logits after the full-resolution ones. Without deep supervision it is MONAI's network, and its
weights load into ``monai.networks.nets.AttentionUnet`` unchanged.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from monai.networks.blocks.convolutions import Convolution
from monai.networks.nets import AttentionUnet
from monai.networks.nets.attentionunet import AttentionLayer
from torch import nn


class AttentionUNet(AttentionUnet):
    """Attention U-Net (Oktay et al. 2018) for 2D slices or 3D volumes.

    Args:
        spatial_dims: 2 for slices, 3 for volumes.
        in_channels: image channels (1 for CT).
        num_classes: output classes, background included.
        channels: feature channels per level, top first; the last is the bottleneck
            (the seed's layout is 64, 128, 256, 512, 512: four attention-gated skip levels).
        dropout: dropout ratio inside the convolution blocks.
        deep_supervision: in training mode, also return logits from each lower decoder level.

    Input ``[B, in_channels, *spatial]`` with each spatial size divisible by
    ``2 ** (len(channels) - 1)``. Output ``[B, num_classes, *spatial]``; with deep supervision
    in training mode a list of ``len(channels) - 1`` such tensors, the first at full
    resolution and each next one at half the previous resolution.
    """

    def __init__(self, spatial_dims: int, in_channels: int, num_classes: int,
                 channels: Sequence[int], dropout: float = 0.0,
                 deep_supervision: bool = False) -> None:
        if len(channels) < 2:
            raise ValueError(f"channels needs at least 2 levels, got {list(channels)}")
        super().__init__(spatial_dims=spatial_dims, in_channels=in_channels,
                         out_channels=num_classes, channels=channels,
                         strides=[2] * (len(channels) - 1), dropout=dropout)
        self.deep_supervision = deep_supervision
        self.downsampling = 2 ** (len(channels) - 1)
        if deep_supervision:
            self.supervision_heads = nn.ModuleList(
                Convolution(spatial_dims, width, num_classes, kernel_size=1, conv_only=True)
                for width in channels[1:-1])

    def forward(self, x: torch.Tensor) -> torch.Tensor | list[torch.Tensor]:
        if not (self.deep_supervision and self.training):
            return super().forward(x)
        # Each decoder level is an AttentionLayer whose output is that level's features; forward
        # hooks collect them while MONAI's own forward runs, so a MONAI release that changes
        # the forward cannot silently diverge from a copy of it here.
        decoded: list[torch.Tensor] = []
        hooks = [layer.register_forward_hook(lambda _layer, _args, out: decoded.append(out))
                 for layer in self.modules() if isinstance(layer, AttentionLayer)]
        try:
            logits = super().forward(x)
        finally:
            for hook in hooks:
                hook.remove()
        lower = decoded[-2::-1]  # deepest finishes first; the levels below the top, highest first
        return [logits, *(conv(level) for conv, level in zip(self.supervision_heads, lower))]
