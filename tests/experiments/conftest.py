"""Tiny generated datasets and config for quick experiment runs."""

from __future__ import annotations

import pytest

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
