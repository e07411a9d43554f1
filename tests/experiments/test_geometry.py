"""Geometry from the shell: lung slices in one display orientation whatever the NIfTI's stored
order (and predictions back in that order), merged label classes said, aneurysm centre
columns that say their unit, cubes larger than the volume, and bad volumes found before any
cube is cut."""

from __future__ import annotations

import gzip
import json
import shutil
import subprocess
import sys
import time
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
from PIL import Image

from tests.tracking.support import REPO, environment

LUNG = REPO / "experiments" / "lung_tumor.py"
CUBES = REPO / "experiments" / "aneurysm_cubes.py"


def shell(script, *arguments, cwd) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(script), *arguments], cwd=cwd, env=environment(),
                          capture_output=True, text=True, timeout=600)


def restored_as(task: Path, target: Path, axcodes, label_change=None) -> Path:
    """A copy of an MSD task with every volume stored in ``axcodes`` order (same anatomy)."""
    shutil.copytree(task, target)
    for folder in ("imagesTr", "labelsTr"):
        for path in (target / folder).glob("lung_*.nii.gz"):
            image = nib.load(path).as_reoriented(
                nib.orientations.ornt_transform(
                    nib.orientations.io_orientation(nib.load(path).affine),
                    nib.orientations.axcodes2ornt(axcodes)))
            if label_change and folder == "labelsTr":
                image = nib.Nifti1Image(label_change(np.asarray(image.dataobj)), image.affine)
            nib.save(image, path)
    return target


@pytest.mark.slow
def test_lung_slices_and_predictions_do_not_depend_on_the_stored_orientation(tmp_path,
                                                                             lung_checkpoint):
    msd = tmp_path / "msd"
    made = shell(LUNG, "generate_msd", "with", "msd_dir=msd", "synthetic.num_volumes=2",
                 "synthetic.volume_size=[32,32,16]", cwd=tmp_path)
    assert made.returncode == 0, made.stderr[-2000:]
    task = msd / "Task006_Lung"
    assert nib.aff2axcodes(nib.load(next((task / "imagesTr").glob("*.nii.gz"))).affine) == (
        "L", "P", "S")  # the generator's affine says what its docstring says

    def two_classes(label):
        label = label.astype(np.uint8)
        label[label > 0] = np.where(np.arange(label[label > 0].size) % 2, 1, 2)
        return label

    restored_as(task, msd / "ras", ("R", "A", "S"), label_change=two_classes)
    converted = {}
    for name in ("Task006_Lung", "ras"):
        done = shell(LUNG, "convert", "with", "msd_dir=msd", f"task={name}",
                     f"dataset_path=out_{name}", "dataset.empty_slice_fraction=1.0", cwd=tmp_path)
        assert done.returncode == 0, done.stderr[-2000:]
        converted[name] = done
    assert "label values 0, 1, 2; every non-zero class counts as tumour (255 in labels/)" in (
        converted["ras"].stderr)
    lps, ras = tmp_path / "out_Task006_Lung", tmp_path / "out_ras"
    names = sorted(p.name for p in (lps / "images").iterdir())
    assert names == sorted(p.name for p in (ras / "images").iterdir())
    for folder in ("images", "labels"):
        for name in names:
            assert np.array_equal(np.asarray(Image.open(lps / folder / name)),
                                  np.asarray(Image.open(ras / folder / name))), (folder, name)
    record = json.loads((ras / "conversion.json").read_text())
    assert record["orientation"]["axes"] == "LPS"
    assert {v["stored_orientation"] for v in record["volumes"]} == {"RAS"}
    assert {v["label_values"] == [0, 1, 2] for v in record["volumes"]} == {True}

    # Predictions land on the input's own voxels, whichever order it is stored in.
    masks = {}
    for name, folder in (("lps", task), ("ras", msd / "ras")):
        volume = next((folder / "imagesTr").glob("*.nii.gz"))
        done = shell(LUNG, "predict", "with", f"weights={lung_checkpoint}/ck/weights/best.pt",
                     f"source={volume}", f"predict_dir=pred_{name}", "tracking.observer=none",
                     "threshold=0.3", cwd=tmp_path)
        assert done.returncode == 0, done.stderr[-2000:]
        saved = nib.load(next((tmp_path / f"pred_{name}").glob("*_mask.nii.gz")))
        assert np.allclose(saved.affine, nib.load(volume).affine)
        masks[name] = saved
    as_lps = masks["ras"].as_reoriented(nib.orientations.ornt_transform(
        nib.orientations.io_orientation(masks["ras"].affine),
        nib.orientations.axcodes2ornt(("L", "P", "S"))))
    assert np.array_equal(np.asarray(as_lps.dataobj), np.asarray(masks["lps"].dataobj))


def aneurysm_volumes(tmp_path) -> Path:
    done = shell(CUBES, "generate_volumes", "with", "volumes_dir=volumes",
                 "synthetic.num_series=12", "synthetic.volume_shape=[24,64,64]",
                 "synthetic.spacing=[3.0,2.7,2.7]",
                 "synthetic.aneurysm_fraction=0.6", cwd=tmp_path)
    assert done.returncode == 0, done.stderr[-2000:]
    return tmp_path / "volumes"


def prepare(tmp_path, *updates):
    return shell(CUBES, "prepare", "with", "volumes_dir=volumes", "cubes_dir=cubes",
                 "tracking.observer=file", "tracking.file_dir=runs", *updates, cwd=tmp_path)


@pytest.mark.slow
def test_aneurysm_prepare_checks_columns_cube_size_and_volumes_up_front(tmp_path):
    volumes = aneurysm_volumes(tmp_path)
    table = volumes / "aneurysm_centres.csv"
    original = table.read_text()

    table.write_text(original.replace("world_x,world_y,world_z", "x,y,z", 1))
    done = prepare(tmp_path)
    assert done.returncode == 2, done.stderr[-2000:]
    assert done.stderr.strip().splitlines()[-1] == (
        "error: volumes/aneurysm_centres.csv: columns x, y, z do not say whether they are voxel "
        "indices or millimetres; name them voxel_x, voxel_y, voxel_z (voxel indices i, j, k of "
        "the stored array) or world_x, world_y, world_z (mm in the NIfTI affine's frame)")
    assert not (tmp_path / "runs").exists()
    table.write_text(original)

    # A cube larger than every volume: said up front, and the negative search ends at once.
    started = time.monotonic()
    done = prepare(tmp_path, "dataset.cube_shape=[32,96,96]", "prepare.test_fraction=0")
    assert done.returncode == 0, done.stderr[-2000:]
    assert time.monotonic() - started < 120
    warnings = [line for line in done.stderr.splitlines() if "is larger than series" in line]
    assert len(warnings) == 12
    assert any(line.endswith("its cubes are padded with zeros; it covers the whole volume, "
                             "which holds an aneurysm, so no negative cube can be cut from it")
               for line in warnings)
    shutil.rmtree(tmp_path / "cubes")

    # A truncated volume is found before any cube is cut.
    bad = sorted(volumes.glob("*.nii.gz"))[-1]
    bad.write_bytes(gzip.compress(gzip.decompress(bad.read_bytes())[:2000]))
    done = prepare(tmp_path)
    assert done.returncode == 2, done.stderr[-2000:]
    line = done.stderr.strip().splitlines()[-1]
    assert line.startswith(f"error: volumes/{bad.name}") and "could not be read" in line, line
    assert not (tmp_path / "cubes").exists() and not list(tmp_path.glob(".cubes.*"))
