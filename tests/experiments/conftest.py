"""Tiny generated datasets and config for quick experiment runs."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

LUNG = Path(__file__).resolve().parents[2] / "experiments" / "lung_tumor.py"

@pytest.fixture(scope="session")
def sadaan_data(tmp_path_factory):
    """A tiny SADAAN dataset: 3 structures at 32x32x16, with absent structures."""
    from medseg.data.synthetic.sadaan import generate_sadaan_dataset

    path = tmp_path_factory.mktemp("sadaan") / "data"
    return generate_sadaan_dataset(path, num_train=8, num_val=3, num_test=3,
                                   image_size=(32, 32, 16), num_structures=3,
                                   absent_probability=0.5, seed=1)


@pytest.fixture
def sadaan_quick(sadaan_data, tmp_path):
    """Config updates for a seconds-long SADAAN run recorded by a file observer in tmp."""
    return {
        "dataset_path": str(sadaan_data),
        "training": {"image_size": [32, 32, 16], "num_epochs": 1, "warmup_epochs": 0,
                     "num_workers": 0, "batch_size": 2, "gradient_accumulation_steps": 1},
        "model": {"base_channels": 4},
        "logging": {"progress_bar": False, "log_frequency": 1},
        "checkpoint": {"save_dir": str(tmp_path / "checkpoints" / "{run_id}")},
        "tracking": {"observer": "file", "file_dir": str(tmp_path / "runs")},
    }


@pytest.fixture(scope="session")
def lung_checkpoint(tmp_path_factory):
    """One epoch of a tiny lung network on tiny generated slices, trained from the shell."""
    cwd = tmp_path_factory.mktemp("lung-full-disk")
    for arguments in (["generate_msd", "with", "msd_dir=msd", "synthetic.num_volumes=5",
                       "synthetic.volume_size=[32,32,16]"],
                      ["convert", "with", "msd_dir=msd", "dataset_path=dataset"],
                      ["with", "dataset_path=dataset", "training.image_size=[32,32]",
                       "training.num_epochs=1", "training.num_workers=0", "training.batch_size=8",
                       "training.gradient_accumulation_steps=1", "model.channels=[4,8,16]",
                       "logging.progress_bar=False", "tracking.observer=none",
                       "checkpoint.save_dir=ck"]):
        done = subprocess.run([sys.executable, str(LUNG), *arguments], cwd=cwd,
                              capture_output=True, text=True, timeout=600)
        assert done.returncode == 0, done.stderr[-3000:]
    return cwd
