"""SADAAN data that holds the documented layout but wrong values, or that another SADAAN
generator wrote, from the shell: what is cheap is checked before training and named by file
and case; what follows from the layout is accepted."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys

import h5py
import numpy as np
import pytest

from tests.tracking.support import SADAAN, TINY_SADAAN, environment

#: Drops root's permission to read anything (root ignores file modes otherwise).
WITHOUT_ROOT_READ = ["setpriv", "--bounding-set=-dac_override,-dac_read_search",
                     "--inh-caps=-dac_override,-dac_read_search", "--"]


def sadaan(cwd, data, *updates: str, prefix=()) -> subprocess.CompletedProcess:
    return subprocess.run([*prefix, sys.executable, str(SADAAN), "with", f"dataset_path={data}",
                           *TINY_SADAAN, "training.num_epochs=1", "tracking.observer=file",
                           "tracking.file_dir=runs", "checkpoint.save_dir=ck", *updates],
                          cwd=cwd, env=environment(), capture_output=True, text=True, timeout=300)


def refused(done) -> str:
    assert done.returncode == 2, done.stderr[-3000:]
    assert "Traceback" not in done.stderr
    return done.stderr.strip().splitlines()[-1]


def copy_of(data, tmp_path):
    target = tmp_path / "data"
    shutil.copytree(data, target)
    return target


def edit(path, name, change):
    with h5py.File(path, "a") as file:
        values = file[name][:]
        change(values)
        file[name][...] = values


def masks_0_255(path):
    edit(path / "train.h5", "masks", lambda m: np.multiply(m, 255, out=m))


def presence_contradicts(path):
    with h5py.File(path / "val.h5", "r") as file:
        voxels = file["masks"][0].reshape(3, -1).sum(axis=1)
    structure = int(np.argmax(voxels))

    def flip(labels):
        labels[0, structure] = 0
    edit(path / "val.h5", "presence_labels", flip)
    return structure, int(voxels[structure])


def nan_image(path):
    with h5py.File(path / "train.h5", "a") as file:
        last = file["images"].shape[0] - 1
        image = file["images"][last].astype(np.float32)
        image[0, 0, :5] = np.nan
        images = file["images"][:].astype(np.float32)
        images[last] = image
        del file["images"]
        file["images"] = images
    return last


@pytest.mark.slow
def test_value_errors_are_named_by_file_and_case(sadaan_data, tmp_path):
    names = json.loads((sadaan_data / "metadata.json").read_text())["structure_names"]

    data = copy_of(sadaan_data, tmp_path / "a")
    masks_0_255(data)
    assert refused(sadaan(tmp_path / "a", data)) == (
        f"error: {data}/train.h5, case 0: 'masks' holds the values 0, 255; expected 0 and 1 "
        "(one binary mask per structure) (0/255 masks: divide them by 255)")
    # Skipping the check (a very large set) trains on what is there.
    assert sadaan(tmp_path / "a", data, "dataset.check_cases=0").returncode == 0

    data = copy_of(sadaan_data, tmp_path / "b")
    structure, voxels = presence_contradicts(data)
    assert refused(sadaan(tmp_path / "b", data)) == (
        f"error: {data}/val.h5, case 0: presence_labels says {names[structure]!r} is absent but "
        f"its mask has {voxels} voxels; expected presence 1 exactly when the mask is non-empty")

    data = copy_of(sadaan_data, tmp_path / "c")
    case = nan_image(data)
    assert refused(sadaan(tmp_path / "c", data)) == (
        f"error: {data}/train.h5, case {case}: 'images' holds 5 NaN or infinite values; "
        "expected finite intensities")
    for folder in "abc":
        assert not list((tmp_path / folder).glob("runs/*/run.json")) or all(
            json.loads(p.read_text())["status"] == "COMPLETED"
            for p in (tmp_path / folder).glob("runs/*/run.json"))  # only the unchecked run


@pytest.mark.slow
def test_metadata_of_the_other_sadaan_generator_is_accepted(sadaan_data, tmp_path):
    """Without num_structures and dataset_info (it follows from structure_names)."""
    data = copy_of(sadaan_data, tmp_path)
    metadata = json.loads((data / "metadata.json").read_text())
    for key in ("num_structures", "dataset_info"):
        metadata.pop(key, None)
    (data / "metadata.json").write_text(json.dumps(metadata))
    done = sadaan(tmp_path, data)
    assert done.returncode == 0, done.stderr[-3000:]
    run = json.loads((tmp_path / "runs" / "1" / "run.json").read_text())
    assert run["status"] == "COMPLETED"

    metadata["num_structures"] = len(metadata["structure_names"]) + 1
    (data / "metadata.json").write_text(json.dumps(metadata))
    assert refused(sadaan(tmp_path, data)) == (
        f"error: {data}/metadata.json: structure_names lists {len(metadata['structure_names'])} "
        f"names but num_structures is {metadata['num_structures']}")


@pytest.mark.slow
def test_image_size_dataset_path_and_permissions_are_checked_up_front(sadaan_data, tmp_path):
    assert refused(sadaan(tmp_path, sadaan_data, "training.image_size=[40,32,16]")) == (
        "error: training.image_size [40, 32, 16] must be multiples of 16 (the SADAAN encoder "
        "halves every axis that often)")

    a_file = tmp_path / "dataset.h5"
    a_file.write_bytes(b"")
    assert refused(sadaan(tmp_path, a_file)) == (
        f"error: dataset folder {a_file} is a file, not a folder; expected a folder with "
        "metadata.json, train.h5 and val.h5 (test.h5 optional)")

    locked = copy_of(sadaan_data, tmp_path / "locked")
    locked.chmod(0)
    prefix = WITHOUT_ROOT_READ if os.geteuid() == 0 else ()
    try:
        line = refused(sadaan(tmp_path, locked, prefix=prefix))
    finally:
        locked.chmod(0o755)
    assert line == (f"error: dataset folder {locked} cannot be read (permission denied); "
                    "expected a folder with metadata.json, train.h5 and val.h5 (test.h5 "
                    "optional), readable by this user")
    assert not (tmp_path / "runs").exists()
