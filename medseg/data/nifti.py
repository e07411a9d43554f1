"""NIfTI files: which names are NIfTI, a volume's name without its suffix, and opening one
with a clear error (nibabel raises many types for foreign or truncated files)."""

from __future__ import annotations

from pathlib import Path

import nibabel as nib

from medseg.errors import DataError, describe

NIFTI_SUFFIXES = (".nii.gz", ".nii")


def is_nifti(path: str | Path) -> bool:
    """Whether the file name ends in ``.nii.gz`` or ``.nii`` (any case)."""
    return Path(path).name.lower().endswith(NIFTI_SUFFIXES)


def nifti_stem(path: str | Path) -> str:
    """The file name without its NIfTI suffix (``lung_001.nii.gz`` -> ``lung_001``); other
    names lose their last suffix."""
    path = Path(path)
    for suffix in NIFTI_SUFFIXES:
        if path.name.lower().endswith(suffix):
            return path.name[: -len(suffix)]
    return path.stem


def open_nifti(path: str | Path) -> nib.Nifti1Image:
    """The image (header read, voxel data not yet), or a :class:`DataError` naming ``path``."""
    try:
        return nib.load(str(path))
    except Exception as error:  # nibabel raises many types for foreign or truncated files
        raise DataError(f"{path} could not be read as a NIfTI volume ({describe(error)})") from None
