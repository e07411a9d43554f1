"""NIfTI names and opening, shared by the MSD reader, the NIfTI pairs, cube preparation and
lung prediction."""

import nibabel as nib
import numpy as np
import pytest

from medseg.data.nifti import NIFTI_SUFFIXES, is_nifti, nifti_stem, open_nifti
from medseg.errors import DataError


def test_nifti_names_and_stems():
    assert NIFTI_SUFFIXES == (".nii.gz", ".nii")
    assert is_nifti("a/lung_001.nii.gz") and is_nifti("B.NII") and not is_nifti("x.npz")
    assert nifti_stem("lung_001.nii.gz") == "lung_001"
    assert nifti_stem("1.2.3.nii") == "1.2.3"  # dots in a series id stay
    assert nifti_stem("slice.png") == "slice"


def test_open_nifti_reads_the_header_or_names_the_file(tmp_path):
    nib.save(nib.Nifti1Image(np.zeros((2, 3, 4), np.float32), np.eye(4)), tmp_path / "v.nii.gz")
    assert open_nifti(tmp_path / "v.nii.gz").shape == (2, 3, 4)
    (tmp_path / "bad.nii.gz").write_bytes(b"not a nifti")
    with pytest.raises(DataError, match=r"bad\.nii\.gz could not be read as a NIfTI volume"):
        open_nifti(tmp_path / "bad.nii.gz")
