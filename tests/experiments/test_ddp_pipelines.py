"""The other pipelines under ``torchrun`` with two CPU processes (gloo): each records one
COMPLETED run with the job's world size and its checkpoints from rank 0 alone, each rank
validating its share of the cases. The aneurysm pipeline's recorded figures (sliding window
over each rank's cubes) equal one process's on the same weights: a learning rate of 1e-12
keeps the weights those of the seed in both runs, whatever the batches, and its default
model (instance norm) has no BatchNorm statistics, which would be rank 0's half batch. That
the other pipelines' shares join into one process's figures is shown without processes in
tests/engine/test_distributed.py. SADAAN's tests, with the resumes and the failing and
hanging ranks, are in test_ddp.py."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from support import ROOT, file_runs, load_experiment, nested

TORCHRUN = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2"]
QUIET = {"--loglevel": "ERROR", "--capture": "sys"}


def _torchrun(experiment: str, arguments: list[str], cwd: Path):
    done = subprocess.run([*TORCHRUN, str(ROOT / "experiments" / f"{experiment}.py"), "with",
                           *arguments], cwd=cwd, capture_output=True, text=True, timeout=300,
                          env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert done.returncode == 0, done.stderr[-3000:]
    (run,) = file_runs(cwd / "runs")
    assert run["status"] == "COMPLETED"
    info = json.loads((cwd / "runs" / "1" / "info.json").read_text())
    assert info["distributed"]["world_size"] == 2
    return json.loads((cwd / "runs" / "1" / "metrics.json").read_text())


def _lung(cwd: Path) -> list[str]:
    lung = load_experiment("lung_tumor")
    for command, updates in (("generate_msd", {"msd_dir": "msd", "synthetic": {
            "num_volumes": 5, "volume_size": [32, 32, 16]}}),
                             ("convert", {"msd_dir": "msd", "dataset_path": "dataset"})):
        lung.ex.run(command, config_updates={**updates, "tracking": {"observer": "none"}},
                    options=QUIET)
    return ["dataset_path=dataset", "training.image_size=[32,32]", "training.batch_size=8",
            "model.channels=[4,8,16]", "checkpoint.save_dir=ck"]


def _neuroverse3d(cwd: Path) -> list[str]:
    nv = load_experiment("neuroverse3d")
    nv.ex.run("generate_data", config_updates={
        "data_dir": "raw", "tracking": {"observer": "none"},
        "synthetic": {"num_datasets": 3, "cases_per_dataset": 4, "volume_shape": [16, 20, 16]}},
        options=QUIET)
    nv.ex.run("prepare", config_updates={"input_dir": "raw", "output_dir": "nn",
                                         "dataset_name": "MyDataset", "modality": "MRI",
                                         "tracking": {"observer": "none"}}, options=QUIET)
    return ["cpu", "data_dir=nn", "image_size=[16,16,16]", "model.channels=[4,8,16]",
            "episodes_per_epoch=4", "val_episodes=2", "seed=1", "background_in_pool=False",
            "max_classes=1", "training.batch_size=2", "checkpoint.save_dir=ck",
            'datasets=["Dataset001","Dataset002"]']


def _smalabeller(cwd: Path) -> list[str]:
    from medseg.data.synthetic.smalabeller import BrainSettings, generate_brain_dataset

    generate_brain_dataset(cwd / "data", num_cases=6,
                           settings=BrainSettings((24, 24), (12, 16), (1.0, 2.0), 0.02, 1))
    return ["seed=0", "epochs=1", "num_workers=0", "batch_size=2", "model.channels=[4,8,16]",
            "data.crop_size=[16,16,8]", "data.crops_per_volume=2",
            "bn_calibration.warmup_batches=1", "config.dropout_rate=0.0",
            "training_images=data/imagesTr_resampled", "training_labels=data/labelsTr_resampled",
            "runs_dir=out", "training.progress_bar=False"]


@pytest.mark.slow
@pytest.mark.parametrize("experiment, prepare", [("lung_tumor", _lung),
                                                 ("neuroverse3d", _neuroverse3d),
                                                 ("smalabeller", _smalabeller)])
def test_two_ranks_record_one_run(experiment, prepare, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    arguments = prepare(tmp_path)
    if experiment != "smalabeller":
        arguments += ["training.num_epochs=1", "training.num_workers=0",
                      "logging.progress_bar=False"]
    metrics = _torchrun(experiment, [*arguments, "tracking.observer=file",
                                     "tracking.file_dir=runs"], tmp_path)
    assert metrics["val_loss"]["steps"] == [1]
    checkpoints = [p for p in tmp_path.glob("**/last*.*") if "runs" not in p.parts]
    assert len(checkpoints) == 1, checkpoints  # rank 0's, in the run's one folder


@pytest.mark.slow
def test_aneurysm_validation_shared_by_two_ranks_scores_as_one_process(tmp_path, monkeypatch):
    from cube_factory import SHAPE, write_cubes_dir

    monkeypatch.chdir(tmp_path)
    write_cubes_dir(tmp_path / "cubes", per_fold=(3, 3))
    settings = {"seed": 3, "cubes_dir": "cubes", "dataset.cube_shape": list(SHAPE),
                "augmentation.crop_size": [8, 16, 16], "model.filters": [4, 8, 16, 32],
                "training.num_epochs": 1, "training.num_workers": 0, "training.device": "cpu",
                "training.learning_rate": 1e-12, "training.batch_size": 2, "sw_batch_size": 9,
                "logging.progress_bar": False, "checkpoint.save_frequency": 0,
                "tracking.observer": "file"}
    words = [f"{key}={json.dumps(value) if isinstance(value, list) else value}"
             for key, value in settings.items()]
    two = _torchrun("aneurysm_cubes", [*words, "tracking.file_dir=runs",
                                       "checkpoint.save_dir=ck2"], tmp_path)
    aneurysm = load_experiment("aneurysm_cubes")
    aneurysm.ex.run(config_updates=nested({**settings, "tracking.file_dir": "one",
                                           "checkpoint.save_dir": "ck1"}), options=QUIET)
    one = json.loads((tmp_path / "one" / "1" / "metrics.json").read_text())
    scored = sorted(n for n in two if n.startswith("val_") and n != "val_time_s")
    assert {"val_loss", "val_auc", "val_accuracy", "val_loss_dice"} <= set(scored)
    for name in scored:
        assert two[name]["values"] == pytest.approx(one[name]["values"], rel=1e-6), name
