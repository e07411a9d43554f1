"""SADAAN: Spatial Attention Deep Anatomical Network.

Segments many anatomical structures in a 3D image at once and says, for each, whether it is
present at all (resected organs, structures outside the field of view). One shared 3D U-Net
(MONAI DynUNet blocks) extracts features; an anatomical attention module combines a learnable
map of where each structure usually lies with where the features say it is; the attention gates
the per-structure mask logits and selects the features the presence and confidence heads read.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import NamedTuple

import torch
import torch.nn.functional as F
from monai.networks.blocks import UnetBasicBlock, UnetOutBlock, UnetUpBlock
from torch import nn

NORM = ("instance", {"affine": True})  # batches of 2-4 volumes are too small for batch statistics

# Attention is a region-level "where", so it is computed on quarter-resolution decoder features
# (wide context, cheap) and upsampled; the full-resolution mask head supplies the boundaries.
ATTENTION_LEVEL = 2


class SADAANOutput(NamedTuple):
    """What :class:`SADAAN` returns; S is the number of structures."""

    segmentation: torch.Tensor
    """Mask logits [B, S, H, W, D]."""
    attention: torch.Tensor
    """Anatomical attention [B, S, H, W, D] in (0, 1): where each structure is expected."""
    presence: torch.Tensor
    """Presence logits [B, S]."""
    confidence: torch.Tensor
    """Estimated reliability of each structure's segmentation [B, S] in (0, 1)."""


class AnatomicalAttention(nn.Module):
    """Attention log-odds = position-prior log-odds + content log-odds.

    Adding log-odds is Bayes' rule with the prior (where the structure usually lies, learned as a
    coarse ``prior_grid`` map and interpolated to any feature grid) and the evidence of the
    features (a 1x1x1 convolution) treated as independent.

    Args:
        in_channels: channels of the decoder features read.
        num_structures: S, one map per structure.
        prior_grid: resolution of the learnable position prior (H, W, D).

    ``forward(features [B, C, h, w, d])`` returns attention logits [B, S, h, w, d].
    """

    def __init__(self, in_channels: int, num_structures: int, prior_grid: Sequence[int]) -> None:
        super().__init__()
        # Zero log-odds: no location is preferred until the data says otherwise.
        self.position_prior = nn.Parameter(torch.zeros(num_structures, *prior_grid))
        self.content = nn.Conv3d(in_channels, num_structures, kernel_size=1)

    def prior_logits(self, size: Sequence[int]) -> torch.Tensor:
        """The position prior resampled to ``size``: [1, S, *size]."""
        return F.interpolate(self.position_prior.unsqueeze(0), size=tuple(size), mode="trilinear",
                             align_corners=False)

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        return self.content(features) + self.prior_logits(features.shape[2:])


class PerStructureLinear(nn.Module):
    """One linear read-out per structure: [B, S, F] -> [B, S].

    Structures differ in size and appearance, so each gets its own weights over a shared
    feature layout.
    """

    def __init__(self, num_structures: int, in_features: int) -> None:
        super().__init__()
        bound = 1.0 / math.sqrt(in_features)
        self.weight = nn.Parameter(torch.empty(num_structures, in_features).uniform_(-bound, bound))
        self.bias = nn.Parameter(torch.zeros(num_structures))

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        return torch.einsum("bsf,sf->bs", features, self.weight) + self.bias


class SADAAN(nn.Module):
    """Multi-structure 3D segmentation with anatomical attention and presence detection.

    Args:
        in_channels: image channels (1 for CT/MRI).
        num_structures: S, the anatomical structures segmented and detected.
        base_channels: feature channels at full resolution; level ``l`` has
            ``base_channels * 2**l``.
        num_levels: resolution levels of the encoder-decoder (``num_levels - 1`` halvings).
        prior_grid: grid (H, W, D) of the learnable position prior of each structure; coarse,
            because anatomy varies between patients and the prior only says roughly where to look.
        dropout: dropout probability in the convolution blocks.
        foreground_prior: share of a structure's voxels expected at initialisation; sets the
            starting bias of the mask logits (structures are small: ~0.1-4% of a volume).

    The attention is computed on the decoder features of level ``min(2, num_levels - 2)``
    (quarter resolution by default) and upsampled to the input size.

    ``forward(x)`` takes x [B, in_channels, H, W, D] with H, W, D divisible by
    ``2**(num_levels - 1)`` and returns :class:`SADAANOutput`: mask logits and attention
    [B, S, H, W, D], presence logits and confidence [B, S].
    """

    def __init__(
        self,
        in_channels: int = 1,
        num_structures: int = 13,
        base_channels: int = 8,
        num_levels: int = 5,
        prior_grid: Sequence[int] = (8, 8, 4),
        dropout: float = 0.0,
        foreground_prior: float = 0.01,
    ) -> None:
        super().__init__()
        _check_arguments(in_channels, num_structures, base_channels, num_levels, prior_grid,
                         dropout)
        if not 0 < foreground_prior < 1:
            raise ValueError(f"foreground_prior must be in (0, 1), got {foreground_prior}")
        self.in_channels = in_channels
        self.num_structures = num_structures
        self.num_levels = num_levels
        channels = [base_channels * 2**level for level in range(num_levels)]
        drop = dropout or None

        self.encoder = nn.ModuleList(
            UnetBasicBlock(3, c_in, c_out, kernel_size=3, stride=1 if level == 0 else 2,
                           norm_name=NORM, dropout=drop)
            for level, (c_in, c_out) in enumerate(zip([in_channels, *channels], channels)))
        # Ordered coarse to fine: decoder[i] produces level num_levels - 2 - i.
        self.decoder = nn.ModuleList(
            UnetUpBlock(3, channels[level + 1], channels[level], kernel_size=3, stride=1,
                        upsample_kernel_size=2, norm_name=NORM, dropout=drop)
            for level in reversed(range(num_levels - 1)))

        self.attention_level = min(ATTENTION_LEVEL, num_levels - 2)
        width = channels[self.attention_level]
        self.attention = AnatomicalAttention(width, num_structures, prior_grid)
        self.mask_head = UnetOutBlock(3, channels[0], num_structures)
        # Start every mask at the foreground rate rather than at 50%: otherwise the first
        # hundred steps only push all voxels to background, and Dice gets no gradient until
        # then (the prior-probability initialisation of focal-loss detectors). log 2 offsets
        # the gate below, which adds log(0.5) while the attention is undecided.
        nn.init.constant_(self.mask_head.conv.conv.bias,
                          math.log(foreground_prior / (1 - foreground_prior)) + math.log(2.0))
        # Through softplus: starts at 1 (each structure fully gated by its attention) and stays
        # >= 0, so more attention never lowers a mask logit.
        self.gate_strength = nn.Parameter(torch.full((num_structures,), math.log(math.expm1(1.0))))
        self.global_descriptor = nn.Sequential(nn.Linear(2 * channels[-1], width),
                                               nn.LeakyReLU(0.01))
        # Presence reads [attended features, global descriptor, their product (agreement)].
        self.presence_head = PerStructureLinear(num_structures, 3 * width)
        # Confidence also reads three summaries of the model's own prediction.
        self.confidence_head = PerStructureLinear(num_structures, 3 * width + 3)

    def forward(self, x: torch.Tensor) -> SADAANOutput:
        self._check_input(x)
        bottleneck, decoded = self._encode_decode(x)
        coarse_features = decoded[self.attention_level]
        coarse_attention_logits = self.attention(coarse_features)
        attention_logits = F.interpolate(coarse_attention_logits, size=x.shape[2:],
                                         mode="trilinear", align_corners=False)
        # log(attention) gates the masks: a voxel must look like the structure AND lie where the
        # structure is expected.
        gate = F.softplus(self.gate_strength).view(1, -1, 1, 1, 1)
        segmentation = self.mask_head(decoded[0]) + gate * F.logsigmoid(attention_logits)
        attention = torch.sigmoid(attention_logits)

        descriptors = self._structure_descriptors(
            coarse_features, torch.sigmoid(coarse_attention_logits), bottleneck)
        presence = self.presence_head(descriptors)
        evidence = _prediction_evidence(segmentation, attention, presence)
        confidence = torch.sigmoid(self.confidence_head(torch.cat([descriptors, evidence], dim=-1)))
        return SADAANOutput(segmentation, attention, presence, confidence)

    def _encode_decode(self, x: torch.Tensor) -> tuple[torch.Tensor, dict[int, torch.Tensor]]:
        """The bottleneck features and the decoder output of every level below it (0 = full
        resolution)."""
        skips = []
        features = x
        for block in self.encoder:
            features = block(features)
            skips.append(features)
        bottleneck = skips.pop()
        decoded = {}
        features = bottleneck
        for up in self.decoder:
            features = up(features, skips.pop())
            decoded[len(skips)] = features
        return bottleneck, decoded

    def _structure_descriptors(self, features: torch.Tensor, attention: torch.Tensor,
                               bottleneck: torch.Tensor) -> torch.Tensor:
        """[B, S, 3C]: what lies where each structure is expected (attention-weighted mean of
        ``features`` [B, C, h, w, d] under ``attention`` [B, S, h, w, d]), the whole-image context
        (mean and max of ``bottleneck``) and the agreement between the two."""
        weights = attention.flatten(2)
        attended = torch.einsum("bsn,bcn->bsc", weights, features.flatten(2))
        attended = attended / weights.sum(-1, keepdim=True).clamp_min(1e-6)
        # Max pooling keeps "is there a strong response anywhere", which instance normalisation
        # takes away from the mean.
        pooled = torch.cat([bottleneck.mean(dim=(2, 3, 4)), bottleneck.amax(dim=(2, 3, 4))], dim=1)
        context = self.global_descriptor(pooled).unsqueeze(1).expand_as(attended)
        return torch.cat([attended, context, attended * context], dim=-1)

    def _check_input(self, x: torch.Tensor) -> None:
        if x.ndim != 5 or x.shape[1] != self.in_channels:
            raise ValueError(f"SADAAN expects an input of shape [B, {self.in_channels}, H, W, D], "
                             f"got {tuple(x.shape)}")
        factor = 2 ** (self.num_levels - 1)
        spatial = tuple(x.shape[2:])
        if any(size % factor for size in spatial):
            raise ValueError(f"SADAAN with num_levels={self.num_levels} needs H, W, D divisible by "
                             f"{factor}; got an input of shape {tuple(x.shape)}")
        if math.prod(size // factor for size in spatial) < 2:
            raise ValueError(f"an input of shape {tuple(x.shape)} leaves a single-voxel bottleneck "
                             f"with num_levels={self.num_levels}; instance normalisation needs at "
                             "least two voxels: use a larger input or fewer levels")


def _prediction_evidence(segmentation: torch.Tensor, attention: torch.Tensor,
                         presence: torch.Tensor) -> torch.Tensor:
    """[B, S, 3]: per structure, the mean predicted mask probability and the mean binary entropy
    (in bits) inside the attended region, and the presence probability.

    Detached: the confidence head learns to read the prediction, not to reshape it.
    """
    with torch.no_grad():
        logits = segmentation.float().flatten(2)
        weights = attention.float().flatten(2)
        total = weights.sum(-1).clamp_min(1e-6)
        probabilities = torch.sigmoid(logits)
        # H(p) = softplus(l) - p * l for p = sigmoid(l), without log(0).
        entropy = (F.softplus(logits) - probabilities * logits) / math.log(2.0)
        volume = (weights * probabilities).sum(-1) / total
        uncertainty = (weights * entropy).sum(-1) / total
        evidence = torch.stack([volume, uncertainty, torch.sigmoid(presence.float())], dim=-1)
    return evidence.to(presence.dtype)


def _check_arguments(in_channels: int, num_structures: int, base_channels: int, num_levels: int,
                     prior_grid: Sequence[int], dropout: float) -> None:
    for name, value in (("in_channels", in_channels), ("num_structures", num_structures),
                        ("base_channels", base_channels)):
        if value < 1:
            raise ValueError(f"SADAAN {name} must be at least 1, got {value}")
    if num_levels < 2:
        raise ValueError(f"SADAAN num_levels must be at least 2 (an encoder and a decoder level), "
                         f"got {num_levels}")
    if len(prior_grid) != 3 or any(size < 1 for size in prior_grid):
        raise ValueError(f"SADAAN prior_grid must be three positive sizes (H, W, D), "
                         f"got {prior_grid}")
    if not 0.0 <= dropout < 1.0:
        raise ValueError(f"SADAAN dropout must be in [0, 1), got {dropout}")
