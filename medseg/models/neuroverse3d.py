"""Neuroverse3D: 3D in-context-learning segmentation with mini-context processing.

The network segments a target volume the way a set of context (image, label) pairs is
segmented: it is never told which structure to find, the context labels show it.

Three sub-networks (all convolutions with bias, no normalisation layers, GELU):

- :class:`TargetEncoder` runs once on the target and keeps one skip per level;
- :class:`ContextUNet` runs on every context pair (image and label as two channels), its
  encoder reading the target's skip at each level ("target to context"), and returns one
  feature map per decoder scale (bottleneck included);
- :class:`TargetDecoder` fuses the *mean* context feature of each scale into the target path
  at every decoder scale (U-shaped fusion).

Mini-contexts (:meth:`Neuroverse3D.forward`, argument ``gs``): the L context pairs are split
into consecutive groups of ``gs`` (the last may be smaller), visited in shuffled order while
training. Every group but the last is run without gradients and folded into a running mean
weighted by group size; the last group runs with gradients, its group mean passing through
:func:`scale_gradient` (identity forward, gradient times the number of groups K). The fused
means are the exact mean over all L pairs, so predictions do not depend on ``gs``; memory holds
the target branch and one group only, so it does not grow with L; the context tensors may stay
on the CPU and each group is moved to the model's device in turn.
"""

from __future__ import annotations

import random
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

DEFAULT_CHANNELS = (32, 64, 128, 256, 512)


def _conv(spatial_dims: int, cin: int, cout: int, kernel: int, stride: int = 1,
          padding: int = 0) -> nn.Module:
    cls = nn.Conv3d if spatial_dims == 3 else nn.Conv2d
    return cls(cin, cout, kernel, stride=stride, padding=padding)


class ResidualUnit(nn.Module):
    """``GELU(x + f(x))`` with ``f`` = ``conv_layers`` 3-convolutions (C -> C) with GELU
    between them. Shape preserved: ``[N, C, *spatial]``."""

    def __init__(self, spatial_dims: int, channels: int, conv_layers: int = 2) -> None:
        super().__init__()
        layers: list[nn.Module] = []
        for index in range(conv_layers):
            layers.append(_conv(spatial_dims, channels, channels, 3, padding=1))
            if index < conv_layers - 1:
                layers.append(nn.GELU())
        self.body = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.gelu(x + self.body(x))


class _FuseBlock(nn.Module):
    """``r = ResidualUnit(x)``; ``GELU(r + conv1x1(cat(r, other)))``: ``x`` ``[N, C, ...]``
    takes in ``other`` ``[N, C, ...]`` (the target's skip in the context branch, the mean
    context feature in the target decoder)."""

    def __init__(self, spatial_dims: int, channels: int, conv_layers: int) -> None:
        super().__init__()
        self.unit = ResidualUnit(spatial_dims, channels, conv_layers)
        self.mix = _conv(spatial_dims, 2 * channels, channels, 1)

    def forward(self, x: torch.Tensor, other: torch.Tensor) -> torch.Tensor:
        r = self.unit(x)
        return F.gelu(r + self.mix(torch.cat([r, other], dim=1)))


def _down(spatial_dims: int, cin: int, cout: int) -> nn.Module:
    """Halve the size: a 4-convolution of stride 2 (a max-pool when the channels stay)."""
    if cin == cout:
        return (nn.MaxPool3d if spatial_dims == 3 else nn.MaxPool2d)(2)
    return _conv(spatial_dims, cin, cout, 4, stride=2, padding=1)


def _up(x: torch.Tensor) -> torch.Tensor:
    mode = "trilinear" if x.dim() == 5 else "bilinear"
    return F.interpolate(x, scale_factor=2, mode=mode, align_corners=False)


class TargetEncoder(nn.Module):
    """``[B, in, *S]`` -> (skips ``[B, c_i, *S/2^i]`` for i < levels-1, bottom
    ``[B, c_last, *S/2^(levels-1)]``)."""

    def __init__(self, spatial_dims: int, in_channels: int, channels: Sequence[int],
                 conv_layers: int) -> None:
        super().__init__()
        self.stem = _conv(spatial_dims, in_channels, channels[0], 1)
        self.units = nn.ModuleList(ResidualUnit(spatial_dims, c, conv_layers) for c in channels[:-1])
        self.downs = nn.ModuleList(_down(spatial_dims, a, b) for a, b in zip(channels, channels[1:]))

    def forward(self, x: torch.Tensor) -> tuple[list[torch.Tensor], torch.Tensor]:
        x = self.stem(x)
        skips = []
        for unit, down in zip(self.units, self.downs):
            x = unit(x)
            skips.append(x)
            x = down(x)
        return skips, x


class ContextUNet(nn.Module):
    """Context pairs ``[B, n, in+out, *S]`` and the target's skips -> one feature map per
    scale, coarsest first: ``[B, n, c_last, ...]``, ..., ``[B, n, c_0, *S]``. The n pairs
    are folded into the batch axis (shared weights)."""

    def __init__(self, spatial_dims: int, in_channels: int, channels: Sequence[int],
                 conv_layers: int) -> None:
        super().__init__()
        self.stem = _conv(spatial_dims, in_channels, channels[0], 1)
        self.encoders = nn.ModuleList(_FuseBlock(spatial_dims, c, conv_layers) for c in channels[:-1])
        self.downs = nn.ModuleList(_down(spatial_dims, a, b) for a, b in zip(channels, channels[1:]))
        self.bottleneck = ResidualUnit(spatial_dims, channels[-1], conv_layers)
        self.merges = nn.ModuleList(_conv(spatial_dims, a + b, a, 1)
                                    for a, b in zip(channels[:-1], channels[1:]))
        self.decoders = nn.ModuleList(ResidualUnit(spatial_dims, c, conv_layers) for c in channels[:-1])

    def forward(self, pairs: torch.Tensor, target_skips: Sequence[torch.Tensor]) -> list[torch.Tensor]:
        batch, n = pairs.shape[:2]
        x = self.stem(pairs.flatten(0, 1))
        skips = []
        for encoder, down, target in zip(self.encoders, self.downs, target_skips):
            x = encoder(x, target.repeat_interleave(n, dim=0))
            skips.append(x)
            x = down(x)
        x = self.bottleneck(x)
        features = [x]
        for level in reversed(range(len(skips))):
            x = self.merges[level](torch.cat([_up(x), skips[level]], dim=1))
            x = self.decoders[level](x)
            features.append(x)
        return [f.unflatten(0, (batch, n)) for f in features]


class TargetDecoder(nn.Module):
    """Target bottom ``[B, c_last, ...]``, mean context features (coarsest first, each
    ``[B, c, ...]``) and target skips -> output ``[B, out, *S]``."""

    def __init__(self, spatial_dims: int, out_channels: int, channels: Sequence[int],
                 conv_layers: int) -> None:
        super().__init__()
        self.fuse_bottom = _FuseBlock(spatial_dims, channels[-1], conv_layers)
        self.merges = nn.ModuleList(_conv(spatial_dims, a + b, a, 1)
                                    for a, b in zip(channels[:-1], channels[1:]))
        self.fuses = nn.ModuleList(_FuseBlock(spatial_dims, c, conv_layers) for c in channels[:-1])
        self.head_unit = ResidualUnit(spatial_dims, channels[0], conv_layers)
        self.head = _conv(spatial_dims, channels[0], out_channels, 1)

    def forward(self, bottom: torch.Tensor, context: Sequence[torch.Tensor],
                skips: Sequence[torch.Tensor]) -> torch.Tensor:
        x = self.fuse_bottom(bottom, context[0])
        for step, level in enumerate(reversed(range(len(skips)))):
            x = self.merges[level](torch.cat([_up(x), skips[level]], dim=1))
            x = self.fuses[level](x, context[step + 1])
        return self.head(self.head_unit(x))


class _ScaleGradient(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, factor):
        ctx.factor = factor
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad):
        return grad * ctx.factor, None


def scale_gradient(x: torch.Tensor, factor: float) -> torch.Tensor:
    """Identity in the forward pass; the gradient is multiplied by ``factor`` going back."""
    return _ScaleGradient.apply(x, factor)


def mini_context_groups(num_context: int, gs: int) -> list[tuple[int, int]]:
    """``[(start, stop), ...]`` of consecutive groups of ``gs`` pairs (the last may be smaller)."""
    if num_context < 1:
        raise ValueError(f"the context must hold at least one pair, got {num_context}")
    if not isinstance(gs, int) or isinstance(gs, bool) or gs < 1:
        raise ValueError(f"gs must be an integer >= 1, got {gs!r}")
    return [(start, min(start + gs, num_context)) for start in range(0, num_context, gs)]


class Neuroverse3D(nn.Module):
    """In-context segmentation of a target volume from L context pairs.

    Args:
        spatial_dims: 3 for volumes (2 for slices).
        in_channels: channels of the target and context images.
        out_channels: channels of the context labels and of the output.
        channels: feature channels per level; levels halve the size, so every spatial size
            must be a multiple of ``2 ** (len(channels) - 1)``. The original's
            ``(32, 64, 128, 256, 512)`` has 70,854,913 parameters.
        conv_layers_per_stage: 3-convolutions in each residual unit.
        gs: mini-context size used when :meth:`forward` is not given one.
        shuffle_groups: visit the mini-contexts in random order while training, so the group
            that back-propagates is a random one.

    Shapes: ``target_in`` ``[B, in, *S]``, ``context_in`` ``[B, L, in, *S]``,
    ``context_out`` ``[B, L, out, *S]`` -> ``[B, out, *S]``, linear (no sigmoid; a
    segmentation is ``output > 0.5``).
    """

    def __init__(self, spatial_dims: int = 3, in_channels: int = 1, out_channels: int = 1,
                 channels: Sequence[int] = DEFAULT_CHANNELS, conv_layers_per_stage: int = 2,
                 gs: int = 3, shuffle_groups: bool = True) -> None:
        super().__init__()
        if spatial_dims not in (2, 3):
            raise ValueError(f"spatial_dims must be 2 or 3, got {spatial_dims!r}")
        if len(channels) < 2 or any(int(c) < 1 for c in channels):
            raise ValueError(f"channels must list at least two positive counts, got {list(channels)}")
        if conv_layers_per_stage < 1:
            raise ValueError(f"conv_layers_per_stage must be >= 1, got {conv_layers_per_stage}")
        mini_context_groups(1, gs)
        channels = [int(c) for c in channels]
        self.spatial_dims, self.in_channels, self.out_channels = spatial_dims, in_channels, out_channels
        self.channels, self.gs, self.shuffle_groups = channels, gs, shuffle_groups
        self.target_encoder = TargetEncoder(spatial_dims, in_channels, channels, conv_layers_per_stage)
        self.context_unet = ContextUNet(spatial_dims, in_channels + out_channels, channels,
                                        conv_layers_per_stage)
        self.target_decoder = TargetDecoder(spatial_dims, out_channels, channels, conv_layers_per_stage)

    @property
    def size_multiple(self) -> int:
        return 2 ** (len(self.channels) - 1)

    def _check(self, target_in, context_in, context_out) -> None:
        d = self.spatial_dims
        if target_in.dim() != d + 2 or target_in.shape[1] != self.in_channels:
            raise ValueError(f"target_in must be [B, {self.in_channels}, *spatial] with {d} spatial "
                             f"axes, got {list(target_in.shape)}")
        if context_in.dim() != d + 3 or context_out.dim() != d + 3:
            raise ValueError(f"context_in and context_out must be [B, L, C, *spatial], got "
                             f"{list(context_in.shape)} and {list(context_out.shape)}")
        if context_in.shape[1] == 0:
            raise ValueError("the context must hold at least one pair, got L = 0")
        spatial = tuple(target_in.shape[2:])
        if (tuple(context_in.shape[3:]) != spatial or tuple(context_out.shape[3:]) != spatial
                or context_in.shape[:2] != context_out.shape[:2]
                or context_in.shape[0] != target_in.shape[0]):
            raise ValueError(f"target_in {list(target_in.shape)}, context_in "
                             f"{list(context_in.shape)} and context_out {list(context_out.shape)} "
                             "must share batch and spatial size (and L)")
        if any(s % self.size_multiple for s in spatial):
            raise ValueError(f"spatial size {list(spatial)} must be a multiple of "
                             f"{self.size_multiple} ({len(self.channels)} levels)")

    def context_means(self, target_skips: Sequence[torch.Tensor], context_in: torch.Tensor,
                      context_out: torch.Tensor, gs: int) -> list[torch.Tensor]:
        """The mean over the L context pairs of each scale's context feature, computed group
        by group as the class docstring describes (``[B, c, ...]`` per scale, coarsest first)."""
        groups = mini_context_groups(context_in.shape[1], gs)
        if self.training and self.shuffle_groups:
            random.shuffle(groups)
        device = target_skips[0].device
        running: list[torch.Tensor] | None = None
        seen = 0
        for index, (start, stop) in enumerate(groups):
            last = index == len(groups) - 1
            pairs = torch.cat([context_in[:, start:stop], context_out[:, start:stop]], dim=2)
            pairs = pairs.to(device=device, dtype=target_skips[0].dtype, non_blocking=True)
            with torch.set_grad_enabled(last and torch.is_grad_enabled()):
                means = [f.mean(dim=1) for f in self.context_unet(pairs, target_skips)]
                if last and len(groups) > 1 and torch.is_grad_enabled():
                    means = [scale_gradient(m, float(len(groups))) for m in means]
            size = stop - start
            if running is None:
                running = means
            else:
                keep, add = seen / (seen + size), size / (seen + size)
                running = [r * keep + m * add for r, m in zip(running, means)]
            seen += size
            if not last:
                running = [r.detach() for r in running]
        assert running is not None
        return running

    def forward(self, target_in: torch.Tensor, context_in: torch.Tensor,
                context_out: torch.Tensor, gs: int | None = None) -> torch.Tensor:
        gs = self.gs if gs is None else gs
        self._check(target_in, context_in, context_out)
        device = next(self.parameters()).device
        skips, bottom = self.target_encoder(target_in.to(device, non_blocking=True))
        context = self.context_means(skips, context_in, context_out, gs)
        return self.target_decoder(bottom, context, skips)
