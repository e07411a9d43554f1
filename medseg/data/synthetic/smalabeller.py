"""Synthetic T1-weighted brain MRI with a thin cortical ribbon to segment (the layout of the
SMALabeller documentation: ``imagesTr_resampled/<case>_0000.nii.gz`` and
``labelsTr_resampled/<case>.nii.gz``).

Each head is drawn on a 1 mm RAS grid: scalp, skull, cerebrospinal fluid, a folded grey-matter
shell over the white matter, and the label: the grey-matter ribbon of a medial superior-frontal
patch (like the supplementary motor area), a band two to three voxels thick that is slightly
brighter than the rest of the cortex. The scanner adds a smooth bias field and noise. The
volume is then stored as an acquisition would be: a random number of slices, a slice
thickness of ``slice_spacings`` (resampled along the slice axis), and a random storage
orientation (axis flips and an in-plane transpose written into the affine), so that a loader
has to reorient, resample and pad to see every head the same way.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import nibabel as nib
import numpy as np
from scipy.ndimage import gaussian_filter, zoom

from medseg.data.nifti_pairs import IMAGE_SUFFIX, LABEL_SUFFIX
from medseg.data.staging import staged_folder

IMAGES = "imagesTr_resampled"
LABELS = "labelsTr_resampled"
TISSUE = {"background": 0.0, "scalp": 0.55, "skull": 0.12, "csf": 0.18, "grey": 0.50,
          "white": 0.78, "ribbon": 0.95}


@dataclass(frozen=True)
class BrainSettings:
    image_size: tuple[int, int]
    depth_range: tuple[int, int]
    slice_spacings: tuple[float, ...]
    noise_std: float
    seed: int

    def __post_init__(self) -> None:
        if min(self.image_size) < 16:
            raise ValueError(f"image_size must be at least 16 x 16, got {list(self.image_size)}")
        low, high = self.depth_range
        if not 8 <= low <= high:
            raise ValueError(f"depth_range must be [low, high] with 8 <= low <= high, got "
                             f"{list(self.depth_range)}")
        if not self.slice_spacings or min(self.slice_spacings) < 0.5:
            raise ValueError(f"slice_spacings must be values >= 0.5 mm, got "
                             f"{list(self.slice_spacings)}")
        if self.noise_std < 0:
            raise ValueError(f"noise_std must be >= 0, got {self.noise_std}")


def generate_brain_dataset(data_dir: str | Path, *, num_cases: int, settings: BrainSettings,
                           overwrite: bool = False) -> Path:
    """Write ``num_cases`` cases under ``data_dir`` (all or nothing); return ``data_dir``."""
    if num_cases < 1:
        raise ValueError(f"num_cases must be >= 1, got {num_cases}")
    rng = np.random.default_rng(settings.seed)
    data_dir = Path(data_dir)
    with staged_folder(data_dir, overwrite=overwrite, what="synthetic MRI cases") as staging:
        (staging / IMAGES).mkdir()
        (staging / LABELS).mkdir()
        for index in range(num_cases):
            case = f"sma_{index + 1:03d}"
            image, label = render_head(rng, settings)
            image, label, affine = store_as_acquired(rng, image, label, settings.slice_spacings)
            nib.save(nib.Nifti1Image(image, affine), staging / IMAGES / f"{case}{IMAGE_SUFFIX}")
            nib.save(nib.Nifti1Image(label, affine), staging / LABELS / f"{case}{LABEL_SUFFIX}")
    return data_dir


def render_head(rng: np.random.Generator,
                settings: BrainSettings) -> tuple[np.ndarray, np.ndarray]:
    """(image float32, label uint8), [H, W, D] on a 1 mm RAS grid (x right, y anterior, z up)."""
    height, width = settings.image_size
    depth = int(rng.integers(settings.depth_range[0], settings.depth_range[1] + 1))
    x, y, z = np.meshgrid(np.arange(height, dtype=np.float32), np.arange(width, dtype=np.float32),
                          np.arange(depth, dtype=np.float32), indexing="ij")
    centre = np.array([height / 2, width / 2, depth * 0.35]) + rng.normal(0, 1.0, 3)
    radii = np.array([height * 0.42, width * 0.46, depth * 0.75]) * rng.uniform(0.9, 1.05, 3)
    # Normalised radius with folds: the cortex surface wobbles (gyri) as in a real brain.
    u, v, w = ((x - centre[0]) / radii[0], (y - centre[1]) / radii[1], (z - centre[2]) / radii[2])
    radius = np.sqrt(u ** 2 + v ** 2 + w ** 2)
    phase = rng.uniform(0, 2 * np.pi, 2)
    folds = 0.025 * np.sin(9 * np.arctan2(v, u) + phase[0]) * np.cos(7 * w + phase[1])
    scale = float(min(radii))
    shell = lambda mm: mm / scale  # noqa: E731  thickness in normalised radius units
    brain_surface = 1.0 - shell(4.0) + folds
    image = np.full(radius.shape, TISSUE["background"], np.float32)
    image[radius <= 1.0] = TISSUE["scalp"]
    image[radius <= 1.0 - shell(1.5)] = TISSUE["skull"]
    image[radius <= 1.0 - shell(3.0)] = TISSUE["csf"]
    grey = (radius <= brain_surface) & (radius > brain_surface - shell(2.6))
    image[radius <= brain_surface] = TISSUE["white"]
    image[grey] = TISSUE["grey"]
    # The ribbon: medial (close to the midline x = centre), frontal (anterior half) and
    # superior grey matter; its lateral extent varies from head to head.
    half_width = rng.uniform(0.22, 0.32)
    ribbon = grey & (np.abs(u) < half_width) & (v > rng.uniform(-0.15, 0.05)) & (w > 0.25)
    image[ribbon] = TISSUE["ribbon"]
    image = gaussian_filter(image, 0.6)
    image *= _bias_field(rng, image.shape)
    image += rng.normal(0, settings.noise_std, image.shape).astype(np.float32)
    return image.astype(np.float32), ribbon.astype(np.uint8)


def _bias_field(rng: np.random.Generator, shape) -> np.ndarray:
    coarse = rng.normal(0, 0.08, (3, 3, 3))
    return (1.0 + zoom(coarse, [s / 3 for s in shape], order=1)).astype(np.float32)


def store_as_acquired(rng: np.random.Generator, image: np.ndarray, label: np.ndarray,
                      slice_spacings) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Resample along z to a chosen slice thickness and store in a random orientation;
    return (image, label, affine) such that the affine maps the stored voxels back to the
    1 mm RAS grid the head was drawn on."""
    spacing = float(rng.choice(slice_spacings))
    factor = [1.0, 1.0, 1.0 / spacing]
    image = zoom(image, factor, order=1).astype(np.float32)
    label = zoom(label, factor, order=0).astype(np.uint8)
    affine = np.diag([1.0, 1.0, spacing, 1.0])
    for axis in range(3):
        if rng.random() < 0.5:  # stored from the other end (L instead of R, ...)
            image, label = np.flip(image, axis), np.flip(label, axis)
            flipped = np.eye(4)
            flipped[axis, axis] = -1
            flipped[axis, 3] = image.shape[axis] - 1
            affine = affine @ flipped
    if rng.random() < 0.5:  # in-plane axes swapped
        image, label = image.transpose(1, 0, 2), label.transpose(1, 0, 2)
        affine = affine[:, [1, 0, 2, 3]]
    return np.ascontiguousarray(image), np.ascontiguousarray(label), affine
