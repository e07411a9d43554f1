"""Image/label NIfTI pairs in two folders (``imagesTr_resampled/<base>_0000.nii.gz`` beside
``labelsTr_resampled/<base>.nii.gz``), their reproducible split, and the MONAI dictionary
pipeline that loads, reorients, resamples, scales and (for training) crops and augments them.

Pairs are found from the labels folder, as the SMALabeller documentation describes; an image
without a label and a label without an image are named (the original skipped them silently).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from medseg.data.nifti import open_nifti
from medseg.errors import DataError

IMAGE_SUFFIX = "_0000.nii.gz"
LABEL_SUFFIX = ".nii.gz"


@dataclass(frozen=True)
class CasePair:
    case: str
    image: Path
    label: Path

    def as_dict(self) -> dict[str, str]:
        """The MONAI data dict (``image``, ``label`` paths, ``case`` name)."""
        return {"image": str(self.image), "label": str(self.label), "case": self.case}


def _base_name(path: Path) -> str:
    """Text before the first dot, as the original derived a case's name."""
    return path.name.split(".")[0]


def find_pairs(images_dir: str | Path, labels_dir: str | Path) -> list[CasePair]:
    """Every ``labels_dir/<base>.nii.gz`` with its ``images_dir/<base>_0000.nii.gz``, sorted
    by case. Raises :class:`DataError` for a missing folder, no pairs, or an unmatched file."""
    images_dir, labels_dir = Path(images_dir), Path(labels_dir)
    for folder, what in ((images_dir, "images_dir"), (labels_dir, "labels_dir")):
        if not folder.is_dir():
            raise DataError(f"{what}: no folder at {folder}")
    labels = {_base_name(p): p for p in labels_dir.glob(f"*{LABEL_SUFFIX}")}
    images = {p.name[:-len(IMAGE_SUFFIX)]: p for p in images_dir.glob(f"*{IMAGE_SUFFIX}")}
    _refuse_unmatched(labels, images, "label", "image", images_dir, IMAGE_SUFFIX)
    _refuse_unmatched(images, labels, "image", "label", labels_dir, LABEL_SUFFIX)
    if not labels:
        raise DataError(f"no image/label pairs: {labels_dir} has no <case>{LABEL_SUFFIX} files "
                        f"(expected labels <case>{LABEL_SUFFIX} and images <case>{IMAGE_SUFFIX} "
                        f"in {images_dir})")
    return [CasePair(case, images[case], labels[case]) for case in sorted(labels)]


def split_pairs(pairs: Sequence[CasePair], val_set_size: float,
                seed: int = 42) -> tuple[list[CasePair], list[CasePair]]:
    """(train, validation) with the same cases as scikit-learn's
    ``train_test_split(pairs, test_size=val_set_size, random_state=seed)``: the validation
    cases are the first ``ceil(val_set_size * n)`` of a ``RandomState(seed)`` permutation.
    Written out (a dozen lines) rather than depending on scikit-learn for one function."""
    if not 0 < val_set_size < 1:
        raise ValueError(f"val_set_size must be in (0, 1), got {val_set_size}")
    count = len(pairs)
    n_val = math.ceil(val_set_size * count)
    n_train = count - n_val
    if n_val < 1 or n_train < 1:
        raise DataError(f"val_set_size={val_set_size} of {count} cases leaves {n_train} for "
                        f"training and {n_val} for validation; each side needs at least one")
    order = np.random.RandomState(seed).permutation(count)
    return [pairs[i] for i in order[n_val:]], [pairs[i] for i in order[:n_val]]


def check_pairs(pairs: Sequence[CasePair]) -> dict[str, object]:
    """Check each pair before training: readable, a 3D image (or 4D with one channel), a
    label of the same shape holding only 0 and 1. Returns dataset statistics for the run."""
    shapes, spacings = [], []
    for pair in pairs:
        image = open_nifti(pair.image)
        label = open_nifti(pair.label)
        image_shape = _spatial_shape(image, pair.image)
        label_shape = _spatial_shape(label, pair.label)
        if image_shape != label_shape:
            raise DataError(f"image {pair.image} has shape {list(image_shape)} but its label "
                            f"{pair.label} has {list(label_shape)}; expected the same shape")
        values = np.unique(np.asarray(label.dataobj))
        if not np.isin(values, (0, 1)).all():
            shown = [float(v) for v in values[~np.isin(values, (0, 1))][:5]]
            raise DataError(f"label {pair.label} holds values {shown}; expected a binary mask "
                            "of 0 and 1")
        shapes.append(list(image_shape))
        spacings.append([round(float(s), 3) for s in image.header.get_zooms()[:3]])
    return {"cases": len(pairs), "shapes": shapes, "spacings": spacings}


def _spatial_shape(volume, path: Path) -> tuple[int, ...]:
    shape = tuple(int(s) for s in volume.shape)
    if len(shape) == 4 and shape[3] == 1:
        shape = shape[:3]
    if len(shape) != 3:
        raise DataError(f"{path} has shape {list(shape)}; expected a 3D single-channel volume "
                        "[H, W, D]")
    return shape


def _refuse_unmatched(found: dict, partners: dict, kind: str, partner: str, partner_dir: Path,
                      partner_suffix: str) -> None:
    """Name the first ``kind`` file (by case) without its ``partner`` file, and how many more."""
    missing = sorted(set(found) - set(partners))
    if missing:
        expected = partner_dir / (missing[0] + partner_suffix)
        more = (f" (and {len(missing) - 1} more {kind}s without {partner}s)"
                if len(missing) > 1 else "")
        raise DataError(f"{kind} {found[missing[0]]} has no {partner} {expected}{more}")
