"""SADAAN under ``torchrun`` with two CPU processes (gloo), from the shell as a user starts it.

One module fixture makes every run (about a minute of CPU): a two-rank run recorded with
``-F``, the same command in one process, the two-rank checkpoint resumed in one process, and
a job whose rank 1 fails. Bad input is checked in-process (the same check runs on every rank
before a run is recorded).

For a batch split over two ranks to train exactly as the whole batch in one process: the
loss weights of the three terms that pool over the whole batch (Dice, attention supervision
and false-positive suppression average over the structures present, or absent, in it) are 0,
augmentation is off, and the optimizer is SGD (Adam's first steps move each weight by the
sign of its gradient, which float rounding flips where a gradient is near 0).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from support import ROOT, file_runs

SADAAN = ROOT / "experiments" / "sadaan.py"
TORCHRUN = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2"]
#: float32 sums in another order (a gradient reduced over ranks), grown over a few steps
TOLERANCE = {"rel": 1e-3, "abs": 1e-5}

# Rank 1 fails in its third training step (a bad batch, a lost device), as a user's job can.
FAILING_RANK = textwrap.dedent('''
    import os
    if os.environ.get("RANK") == "1":
        from medseg.tasks import sadaan
        _step, _calls = sadaan.SADAANTask.training_step, [0]
        def training_step(self, *args):
            _calls[0] += 1
            if _calls[0] == 3:
                raise RuntimeError("injected failure in rank 1's third step")
            return _step(self, *args)
        sadaan.SADAANTask.training_step = training_step
''')


def _arguments(data: Path, *extra: str) -> list[str]:
    return ["with", "seed=7", f"dataset_path={data}", "training.image_size=[32,32,16]",
            "training.num_workers=0", "training.batch_size=2", "training.warmup_epochs=0",
            "training.gradient_accumulation_steps=1", "model.base_channels=4",
            "loss_weights.dice=0", "loss_weights.false_positive_suppression=0",
            "loss_weights.attention_supervision=0",
            "optimizer.type=sgd", "training.learning_rate=0.01",
            "augmentation.enabled=False", "logging.progress_bar=False",
            "logging.log_frequency=1", "checkpoint.save_frequency=0", *extra]


def _run(command: list[str], cwd: Path, env: dict | None = None, timeout: float = 240):
    started = time.monotonic()
    done = subprocess.run(command, cwd=cwd, capture_output=True, text=True, timeout=timeout,
                          env={**os.environ, "OMP_NUM_THREADS": "1", **(env or {})})
    done.seconds = time.monotonic() - started
    return done


@pytest.fixture(scope="module")
def runs(sadaan_data, tmp_path_factory):
    cwd = tmp_path_factory.mktemp("ddp")
    two = _run([*TORCHRUN, str(SADAAN), "-F", "runs_two",
                *_arguments(sadaan_data, "training.num_epochs=2", "tracking.observer=none",
                            "checkpoint.save_dir=ck_two/{run_id}")], cwd)
    one = _run([sys.executable, str(SADAAN),
                *_arguments(sadaan_data, "training.num_epochs=3", "tracking.observer=file",
                            "tracking.file_dir=runs_one", "checkpoint.save_dir=ck_one/{run_id}")],
               cwd)
    resumed = _run([sys.executable, str(SADAAN),
                    *_arguments(sadaan_data, "training.num_epochs=3", "tracking.observer=file",
                                "tracking.file_dir=runs_resumed",
                                "checkpoint.save_dir=ck_resumed/{run_id}",
                                "checkpoint.resume=ck_two/1/last_model.pth")], cwd)
    (cwd / "failing").mkdir()
    (cwd / "failing" / "sitecustomize.py").write_text(FAILING_RANK)
    failing = _run([*TORCHRUN, str(SADAAN),
                    *_arguments(sadaan_data, "training.num_epochs=2", "tracking.observer=file",
                                "tracking.file_dir=runs_failing",
                                "checkpoint.save_dir=ck_failing/{run_id}")], cwd,
                   env={"PYTHONPATH": os.pathsep.join([str(cwd / "failing"),
                                                       os.environ.get("PYTHONPATH", "")])})
    return {"cwd": cwd, "two": two, "one": one, "resumed": resumed, "failing": failing,
}


def _metrics(directory: Path) -> dict[str, dict]:
    (run,) = sorted(Path(directory).glob("[0-9]*"))
    return json.loads((run / "metrics.json").read_text())


def _values(metrics: dict, name: str) -> dict[int, float]:
    return dict(zip(metrics[name]["steps"], metrics[name]["values"]))


def _compared(a: dict, b: dict) -> list[str]:
    """Metric names of both runs that are not timings or memory."""
    return sorted(n for n in set(a) & set(b)
                  if not n.endswith(("_time_s", "_per_s", "_mb")))


def test_two_ranks_record_one_run(runs):
    two = runs["two"]
    assert two.returncode == 0, two.stderr[-3000:]
    recorded = file_runs(runs["cwd"] / "runs_two")
    assert [r["status"] for r in recorded] == ["COMPLETED"]
    info = json.loads((runs["cwd"] / "runs_two" / "1" / "info.json").read_text())
    assert info["distributed"] == {"world_size": 2, "backend": "gloo", "per_rank_batch_size": 1,
                                   "gradient_accumulation_steps": 1, "effective_batch_size": 2}
    # Only rank 0 wrote: one checkpoint folder, the run's, with what one process writes.
    assert [p.name for p in (runs["cwd"] / "ck_two").iterdir()] == ["1"]
    written = {p.name for p in (runs["cwd"] / "ck_two" / "1").iterdir()}
    assert {"best_model.pth", "last_model.pth", "training_curves.png",
            "evaluation_test"} <= written


def test_two_ranks_train_as_one_process(runs):
    assert runs["one"].returncode == 0, runs["one"].stderr[-3000:]
    two, one = _metrics(runs["cwd"] / "runs_two"), _metrics(runs["cwd"] / "runs_one")
    names = _compared(two, one)
    assert {"train_loss", "train_loss_epoch", "val_loss", "val_dice", "val_presence_accuracy",
            "test_loss", "samples_per_s"} - {"samples_per_s"} <= set(names)
    for name in names:
        if name.startswith("test_"):  # scored after 2 epochs in one run, 3 in the other
            continue
        a, b = _values(two, name), _values(one, name)
        for step in a:
            assert a[step] == pytest.approx(b[step], **TOLERANCE), (name, step)
    assert len(_values(two, "train_loss")) == 8  # 8 cases, 2 per step, 2 epochs


def test_checkpoint_of_two_ranks_resumes_in_one_process(runs):
    resumed = runs["resumed"]
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    after, uninterrupted = _metrics(runs["cwd"] / "runs_resumed"), _metrics(runs["cwd"] / "runs_one")
    assert sorted(_values(after, "val_loss")) == [3]
    # Weights, optimizer and schedule carried over: epoch 3 is the uninterrupted run's.
    for name in _compared(after, uninterrupted):
        a, b = _values(after, name), _values(uninterrupted, name)
        for step in a:
            assert a[step] == pytest.approx(b[step], **TOLERANCE), (name, step)


def test_a_failing_rank_fails_the_run_with_its_error(runs):
    failing = runs["failing"]
    assert failing.returncode != 0
    assert failing.seconds < 120
    (recorded,) = file_runs(runs["cwd"] / "runs_failing")
    assert recorded["status"] == "FAILED"
    assert "rank 1 failed: RuntimeError: injected failure in rank 1's third step" in \
        "".join(recorded["fail_trace"])
    assert "error: rank 1 failed: RuntimeError: injected failure" in failing.stderr


@pytest.mark.parametrize("training, line", [
    ({"device": "cpu", "distributed_backend": "nccl"},
     r"^training.distributed_backend='nccl' needs CUDA devices, but training.device is 'cpu'; "
     r"use 'gloo' \(or 'auto'\) on CPU$"),
    ({"batch_size": 1},
     r"^training.batch_size=1 is the batch of one step across all 2 processes torchrun started "
     r"and must be a multiple of 2 \(at least one sample per process\)$"),
])
def test_bad_input_under_torchrun_is_refused_before_the_run(sadaan_quick, monkeypatch,
                                                            training, line):
    from medseg.errors import ConfigError
    from support import load_experiment

    monkeypatch.setenv("RANK", "1")  # what torchrun tells the second process
    monkeypatch.setenv("WORLD_SIZE", "2")
    sadaan = load_experiment("sadaan")
    updates = {**sadaan_quick, "seed": 1, "training": {**sadaan_quick["training"], **training}}
    with pytest.raises(ConfigError, match=line):
        sadaan.ex.run(config_updates=updates)
    assert not Path(sadaan_quick["tracking"]["file_dir"]).exists()
    assert not Path(sadaan_quick["checkpoint"]["save_dir"]).parent.exists()
