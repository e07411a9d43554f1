"""SADAAN's random transforms applied to a whole batch on the training device
(``augmentation.on_device=True``).

In the loader (the default), every sample's rotation, flips and noise cost 30-40 ms of one
worker's CPU at 64x64x32, so one GPU would need some 28 workers to be fed five times over
(benchmark ``loader_headroom``). Here the loader only reads, resizes and packs the masks, and
the same transforms run on the batch where the model runs: one ``affine_grid`` /
``grid_sample`` for the batch (one random rotation per case), flips and noise as tensor
operations, then the per-case z-score and intensity factor, in the order of
:func:`medseg.data.transforms.sadaan_transforms`.

Written here rather than taken from MONAI because MONAI's random transforms draw one set of
parameters per call on one sample (a batch would share one rotation) and build their grid on
the host; the rotation matrix itself is MONAI's (``create_rotate``), about the volume's centre
in voxel units as ``monai.transforms.Rotate`` does, so a case rotated here by given angles
equals MONAI's rotation of it (tested).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from monai.transforms.utils import create_rotate

from medseg.data.fast_transforms import MAX_PACKED_MASKS, unpack_masks
from medseg.data.transforms import check_augmentation


class SADAANBatchAugmentation:
    """``(image [B, C, H, W, D], mask [B, S or 1, H, W, D]) -> (image, mask [B, S, ...])``.

    ``image`` is in raw intensity units (not yet normalised); ``mask`` holds the
    ``num_structures`` binary masks, or the one channel of bit flags that
    :class:`~medseg.data.fast_transforms.PackMasksd` folded them into, which is unfolded
    after the spatial steps. Parameters as :func:`medseg.data.transforms.sadaan_transforms`.
    """

    def __init__(self, *, num_structures: int, noise_std: float = 2.0,
                 intensity_scale_range: Sequence[float] = (0.95, 1.05),
                 rotation_degrees: float = 5.0, flip_probability: float = 0.3) -> None:
        check_augmentation(noise_std, intensity_scale_range, rotation_degrees, flip_probability)
        self.num_structures = int(num_structures)
        self.noise_std = float(noise_std)
        self.intensity_scale_range = (float(intensity_scale_range[0]),
                                      float(intensity_scale_range[1]))
        self.max_angle = math.radians(rotation_degrees)
        self.flip_probability = float(flip_probability)

    def __call__(self, image: torch.Tensor,
                 mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        batch = image.shape[0]
        # The parameters come from the host's generator, so drawing them never waits for the
        # device; the noise is drawn where it is added.
        angles = (torch.rand(batch, 3) * 2 - 1) * self.max_angle
        flips = torch.rand(batch, 3) < self.flip_probability
        low, high = self.intensity_scale_range
        factors = low + (high - low) * torch.rand(batch)
        with torch.no_grad(), torch.autocast(image.device.type, enabled=False):
            return self.apply(image, mask, angles=angles, flips=flips, factors=factors)

    def apply(self, image: torch.Tensor, mask: torch.Tensor, *, angles: torch.Tensor,
              flips: torch.Tensor, factors: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The transforms with given parameters: ``angles`` [B, 3] radians (MONAI's
        ``Rotate`` order), ``flips`` [B, 3] booleans per spatial axis, ``factors`` [B]."""
        image = image.float()
        mask = mask.float()
        if self.max_angle > 0:
            grid = F.affine_grid(_rotation_thetas(angles, image.shape[2:]).to(image.device),
                                 list(image.shape), align_corners=False)
            image = F.grid_sample(image, grid, mode="bilinear", padding_mode="zeros",
                                  align_corners=False)
            mask = F.grid_sample(mask, grid.to(mask.dtype), mode="nearest",
                                 padding_mode="zeros", align_corners=False)
        if self.flip_probability > 0:
            for axis in range(3):
                chosen = flips[:, axis].to(image.device).view(-1, 1, 1, 1, 1)
                image = torch.where(chosen, image.flip(2 + axis), image)
                mask = torch.where(chosen, mask.flip(2 + axis), mask)
        if self.noise_std > 0:
            image = image + torch.randn_like(image) * self.noise_std
        mask = self._unpacked(mask)
        # Per case and channel, as NormalizeIntensityd(channel_wise=True): population std,
        # a constant channel left centred but unscaled.
        mean = image.mean(dim=(2, 3, 4), keepdim=True)
        std = image.std(dim=(2, 3, 4), keepdim=True, unbiased=False)
        image = (image - mean) / torch.where(std > 0, std, torch.ones_like(std))
        image = image * factors.to(image.device, image.dtype).view(-1, 1, 1, 1, 1)
        return image, mask

    def _unpacked(self, mask: torch.Tensor) -> torch.Tensor:
        if mask.shape[1] == self.num_structures or self.num_structures > MAX_PACKED_MASKS:
            return mask
        return unpack_masks(mask, self.num_structures, channel_dim=1)


def _rotation_thetas(angles: torch.Tensor, spatial_shape: Sequence[int]) -> torch.Tensor:
    """``affine_grid``'s [B, 3, 4] for a rotation about the centre by each row of ``angles``.

    MONAI's matrix maps an output voxel to the input voxel it samples (tensor axis order);
    ``affine_grid`` wants it in normalised coordinates with the axes reversed (x is the last
    tensor axis), each axis scaled by its half-size so the rotation stays rigid in voxels.
    """
    half = torch.tensor([float(n) / 2 for n in reversed(spatial_shape)])
    reverse = torch.eye(3).flip(0)
    thetas = torch.zeros(len(angles), 3, 4)
    for case, case_angles in enumerate(angles.tolist()):
        rotation = torch.as_tensor(create_rotate(3, case_angles)[:3, :3], dtype=torch.float32)
        thetas[case, :, :3] = (torch.diag(1 / half) @ reverse @ rotation @ reverse
                               @ torch.diag(half))
    return thetas
