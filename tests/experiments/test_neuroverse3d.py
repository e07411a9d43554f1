"""experiments/neuroverse3d.py from the shell, as a user types it, and its bad-input checks."""

from __future__ import annotations

import json
import logging
import os
import shutil
import subprocess
import sys

import pytest
import torch
from support import ROOT, load_experiment

from medseg.errors import ConfigError, DataError

EXPERIMENT = str(ROOT / "experiments" / "neuroverse3d.py")
# Tiny and quick: 16^3, channels 4-8-16, 4 episodes of 3+1 volumes per epoch.
QUICK = ["with", "cpu", "data_dir=nn", "image_size=[16,16,16]", "model.channels=[4,8,16]",
         "episodes_per_epoch=4", "val_episodes=2", "logging.progress_bar=False",
         "logging.log_frequency=1", "tracking.observer=file", "tracking.file_dir=runs", "seed=1",
         "background_in_pool=False", "max_classes=1"]
SYNTHETIC = ["synthetic.num_datasets=3", "synthetic.cases_per_dataset=4",
             "synthetic.volume_shape=[16,20,16]"]


def shell(tmp_path, *args, check=True):
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    completed = subprocess.run([sys.executable, EXPERIMENT, *args], capture_output=True, text=True,
                               cwd=tmp_path, timeout=300, env=env)
    if check:
        assert completed.returncode == 0, completed.stderr[-3000:]
    return completed


def metrics(tmp_path, run_id):
    return json.loads((tmp_path / "runs" / str(run_id) / "metrics.json").read_text())


@pytest.fixture(scope="module")
def prepared(tmp_path_factory):
    tmp_path = tmp_path_factory.mktemp("nv_shell")
    shell(tmp_path, "generate_data", "with", "data_dir=raw", *SYNTHETIC, "tracking.observer=none")
    out = shell(tmp_path, "prepare", "with", "input_dir=raw", "output_dir=nn",
                "dataset_name=MyDataset", "modality=MRI", "tracking.observer=none")
    assert "wrote 3 nnU-Net dataset(s) to nn" in out.stdout
    return tmp_path


@pytest.mark.slow
def test_stage1_resume_stage2_evaluate_predict_from_the_shell(prepared):
    tmp = prepared
    data = ['datasets=["Dataset001","Dataset002"]']
    # 1: three epochs uninterrupted; 2: two epochs; 3: resumes 2 to the third epoch.
    shell(tmp, *QUICK, *data, "training.num_epochs=3", "checkpoint.save_dir=ck/full")
    losses = metrics(tmp, 1)["train_loss_epoch"]["values"]
    assert losses[-1] < losses[0]
    assert "val_loss_smooth_l3_l1" in metrics(tmp, 1) and "val_dice" in metrics(tmp, 1)
    assert {p.name for p in (tmp / "ck" / "full").iterdir()} >= {"best.ckpt", "last.ckpt"}
    shell(tmp, *QUICK, *data, "training.num_epochs=2", "checkpoint.save_dir=ck/part")
    shell(tmp, *QUICK, *data, "training.num_epochs=3", "checkpoint.save_dir=ck/part",
          "checkpoint.resume=ck/part/last.ckpt")
    # The file observer continues the interrupted run 2: one series, its third epoch the
    # uninterrupted run's.
    resumed = metrics(tmp, 2)["train_loss_epoch"]
    assert resumed["steps"] == [1, 2, 3]
    assert resumed["values"][2] == pytest.approx(losses[2], rel=1e-5)

    shell(tmp, *QUICK, *data, "stage2", "weights=ck/full/best.ckpt", "training.num_epochs=1",
          "checkpoint.save_dir=ck/stage2")
    state = torch.load(tmp / "ck" / "stage2" / "last.ckpt", weights_only=True)
    assert state["config"]["stage"] == 2 and state["config"]["training"]["learning_rate"] == 2e-6

    shell(tmp, "evaluate", *QUICK, *data, "weights=ck/stage2/best.ckpt", "context_sizes=[1,2,4]",
          "eval_episodes=2")
    scores = metrics(tmp, 4)
    assert {"heldout_dice_context_1", "heldout_dice_context_4",
            "heldout_all_structures_dice"} <= set(scores)
    assert not (tmp / "runs" / "5").exists()
    run = json.loads((tmp / "runs" / "4" / "run.json").read_text())
    assert any(a.endswith("dice_vs_context_size.png") for a in run["artifacts"])

    target = "nn/Dataset003_HeldOut/imagesTr/case_003_0000.nii.gz"
    shell(tmp, "predict", *QUICK, "weights=ck/stage2/best.ckpt", f"target={target}",
          "context_dir=nn/Dataset003_HeldOut", "max_context=3", "prediction=out/pred.nii.gz")
    import nibabel as nib
    import numpy as np

    written, source = nib.load(tmp / "out" / "pred.nii.gz"), nib.load(tmp / target)
    assert written.shape == source.shape
    np.testing.assert_allclose(written.affine, source.affine)


def test_bad_input_from_the_shell_is_one_line(prepared):
    done = shell(prepared, *QUICK, "stage=2", check=False)
    assert done.returncode == 2 and "Traceback" not in done.stderr
    assert done.stderr.strip().splitlines()[-1].startswith(
        "error: stage=2 continues from a stage-1 checkpoint: set weights=PATH")


@pytest.fixture
def ex_run(prepared, monkeypatch):
    monkeypatch.chdir(prepared)
    ex = load_experiment("neuroverse3d").ex
    base = {"data_dir": "nn", "image_size": [16, 16, 16], "model": {"channels": [4, 8, 16]},
            "tracking": {"observer": "none"}}

    def run(command="main", **updates):
        return ex.run(command, config_updates={**base, **updates}, named_configs=["cpu"])
    return run


@pytest.mark.parametrize("updates, message", [
    ({"datasets": ["Dataset009"]}, "datasets: dataset 'Dataset009' does not exist"),
    ({"context_size": 0}, "context_size must be an integer >= 1, got 0"),
    ({"model": {"gs": 0, "channels": [4, 8, 16]}}, "model.gs must be an integer >= 1, got 0"),
    ({"image_size": [18, 16, 16]}, "image_size \\[18, 16, 16\\] must be multiples of 4"),
    ({"stage": 2}, "stage=2 continues from a stage-1 checkpoint"),
    ({"stage": 2, "weights": "none.ckpt"}, "weights: no file at none.ckpt"),
    ({"stage": 2, "weights": "w.ckpt", "training": {"batch_size": 2}},
     "training.batch_size must be 1 in stage 2"),
    ({"sample_rate": [1, 2, 3]}, "sample_rate gives 3 weights for 2 datasets"),
    ({"sample_rate": [1, -2]}, "sample_rate must be null, a number > 0 or a list of numbers > 0"),
])
def test_bad_config_stops_before_a_run(ex_run, prepared, updates, message):
    from medseg.models.neuroverse3d import Neuroverse3D
    torch.save({"model": Neuroverse3D(channels=[4, 8, 16]).state_dict(),
                "config": {"model": {"channels": [4, 8, 16]}}}, prepared / "w.ckpt")
    updates.setdefault("datasets", ["Dataset001", "Dataset002"])
    with pytest.raises(ConfigError, match=message):
        ex_run(**updates)


def test_stage_2_under_torchrun_takes_one_episode_per_process(ex_run, prepared, monkeypatch):
    """Random context sizes cannot share a batch: under torchrun each process takes one
    episode, so the batch is the number of processes (rank 0 of a two-process job here, whose
    checks refuse the config before any process group is made)."""
    import socket

    from medseg.engine import distributed
    from medseg.models.neuroverse3d import Neuroverse3D

    torch.save({"model": Neuroverse3D(channels=[4, 8, 16]).state_dict(),
                "config": {"model": {"channels": [4, 8, 16]}}}, prepared / "w.ckpt")
    with socket.socket() as free:
        free.bind(("127.0.0.1", 0))
        port = free.getsockname()[1]
    for name, value in {"RANK": "0", "WORLD_SIZE": "2", "LOCAL_RANK": "0",
                        "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port)}.items():
        monkeypatch.setenv(name, value)
    monkeypatch.setattr(distributed, "_store", None)  # this job's store goes with the test
    with pytest.raises(ConfigError, match=r"training.batch_size must be 2 \(one per process "
                                          r"under torchrun\) in stage 2: .* \(got 4\)"):
        ex_run(stage=2, weights="w.ckpt", training={"batch_size": 4},
               datasets=["Dataset001", "Dataset002"])


def test_checkpoint_of_another_architecture(ex_run, prepared):
    from medseg.models.neuroverse3d import Neuroverse3D
    torch.save({"model": Neuroverse3D(channels=[4, 8]).state_dict(),
                "config": {"model": {"channels": [4, 8]}}}, prepared / "other.ckpt")
    with pytest.raises(ConfigError, match="weights: other.ckpt is a Neuroverse3D with channels "
                                          "\\[4, 8\\], but model.channels is \\[4, 8, 16\\]"):
        ex_run(weights="other.ckpt")


def test_dataset_json_with_neither_label_form(ex_run, prepared):
    broken = prepared / "broken"
    broken.mkdir(exist_ok=True)
    (broken / "dataset.json").write_text(json.dumps({"labels": {"background": "zero"}}))
    with pytest.raises(ConfigError, match="data_dir: .*neither nnU-Net v2"):
        ex_run(data_dir="broken", datasets=None)


def test_prepare_with_an_unpaired_image_writes_nothing(ex_run, prepared):
    raw = prepared / "raw_bad"
    raw.mkdir(exist_ok=True)
    shutil.copyfile(prepared / "raw" / "Dataset001_SynBrainA" / "case_000_img.nii.gz",
                    raw / "a_img.nii.gz")
    with pytest.raises(DataError, match="a_img.nii.gz has no mask"):
        ex_run("prepare", input_dir="raw_bad", output_dir="nn_bad")
    assert not (prepared / "nn_bad").exists()


def test_synthetic_settings_warn_in_training(ex_run):
    # Read from the "medseg" logger itself: what other tests of the same worker did to the
    # root logger's handlers (tqdm's redirect, Sacred's set-up) is not this test's subject.
    log = logging.getLogger("medseg")
    records: list[logging.LogRecord] = []
    handler = logging.Handler(logging.WARNING)
    handler.emit = records.append
    level = log.level
    log.setLevel(logging.WARNING)
    log.addHandler(handler)
    try:
        with pytest.raises(ConfigError):  # stops at the next check; the warning came first
            ex_run(datasets=["Dataset001", "Dataset002"], synthetic={"noise_std": 0.5}, stage=2)
    finally:
        log.removeHandler(handler)
        log.setLevel(level)
    assert "synthetic.noise_std has no effect on training; it is a generate_data setting" in [
        record.getMessage() for record in records], (log.disabled, logging.getLogger().level)
