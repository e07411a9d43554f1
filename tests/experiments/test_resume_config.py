"""A resume with a changed config, from the shell: a new learning rate is applied and
recorded; entries that shaped the training (data, seed, optimizer ...) are refused in one
line that lists every difference, before a run is recorded."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys

import pytest

from tests.tracking.support import SADAAN, TINY_SADAAN, environment


def sadaan(cwd, *updates: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(SADAAN), "with", *updates], cwd=cwd,
                          env=environment(), capture_output=True, text=True, timeout=300)


@pytest.fixture(scope="module")
def trained(sadaan_data, tmp_path_factory):
    """One epoch at learning rate 1e-3 with a constant schedule, recorded in runs/1."""
    cwd = tmp_path_factory.mktemp("resume-config")
    common = [f"dataset_path={sadaan_data}", *TINY_SADAAN, "optimizer.lr_scheduler=none",
              "tracking.observer=file", "tracking.file_dir=runs", "checkpoint.save_dir=ck/{run_id}"]
    done = sadaan(cwd, *common, "training.num_epochs=1", "training.learning_rate=1e-3")
    assert done.returncode == 0, done.stderr[-3000:]
    return cwd, common


@pytest.mark.slow
def test_a_new_learning_rate_is_applied_and_recorded(trained):
    cwd, common = trained
    first_seed = json.loads((cwd / "runs" / "1" / "config.json").read_text())["seed"]
    done = sadaan(cwd, *common, "training.num_epochs=2", "training.learning_rate=2e-4",
                  "checkpoint.resume=ck/1/last_model.pth")
    assert done.returncode == 0, done.stderr[-3000:]
    assert ("initial learning rate 0.0002 on resume (the checkpoint's was 0.001): the continued "
            "schedule is scaled to it, now at 0.0002") in done.stderr
    # The file observer continues the resumed run 1: its second epoch ran at the new rate.
    assert not (cwd / "runs" / "2").exists()
    run = cwd / "runs" / "1"
    metrics = json.loads((run / "metrics.json").read_text())
    assert metrics["lr"]["steps"] == [1, 2] and metrics["lr"]["values"][-1] == pytest.approx(2e-4)
    info = json.loads((run / "info.json").read_text())
    assert info["resumed_from"]["learning_rate"] == {"checkpoint": 1e-3, "now": 2e-4}
    config = json.loads((run / "config.json").read_text())
    assert config["training"]["learning_rate"] == 2e-4
    assert config["seed"] == first_seed  # not given: the checkpoint's, not a new draw


@pytest.mark.slow
def test_changes_a_resume_may_not_make_are_refused_in_one_line(trained, sadaan_data):
    cwd, common = trained
    other = cwd / "other_data"
    shutil.copytree(sadaan_data, other, dirs_exist_ok=True)
    seed = json.loads((cwd / "runs" / "1" / "config.json").read_text())["seed"]
    runs_before = sorted((cwd / "runs").iterdir())
    changed = [u if not u.startswith("dataset_path=") else f"dataset_path={other}" for u in common]
    done = sadaan(cwd, *changed, "training.num_epochs=2", "optimizer.type=sgd", "seed=7",
                  "checkpoint.resume=ck/1/last_model.pth")
    assert done.returncode == 2
    assert "Traceback" not in done.stderr
    [line] = [line for line in done.stderr.splitlines() if line.startswith("error:")]
    assert line.startswith(
        "error: checkpoint.resume=ck/1/last_model.pth continues a training run whose config "
        f"differs in entries a resume may not change: dataset_path '{sadaan_data}' -> "
        f"'{other}', optimizer.type 'adam' -> 'sgd', seed {seed} -> 7; give them the "
        "checkpoint's values, or train a new run without checkpoint.resume (a resume may "
        "change ")
    assert "training.learning_rate" in line and "training.num_epochs" in line
    assert sorted((cwd / "runs").iterdir()) == runs_before  # no run recorded
