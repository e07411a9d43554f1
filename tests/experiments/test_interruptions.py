"""Ctrl-C and SIGTERM, as a terminal and a scheduler send them: one line saying what was
interrupted, where the last checkpoint is and the command that resumes; the run recorded
INTERRUPTED; nothing half-written left behind, and what a SIGKILL left removed next time."""

from __future__ import annotations

import json
import re
import shlex
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.tracking.support import REPO, SADAAN, TINY_SADAAN, environment, start_experiment

LUNG = REPO / "experiments" / "lung_tumor.py"


def signal_when(process: subprocess.Popen, ready, signum, timeout: float = 300) -> str:
    """Send ``signum`` once ``ready()`` holds; return the process's output."""
    deadline = time.monotonic() + timeout
    while not ready():
        assert process.poll() is None, process.communicate()[0][-3000:]
        assert time.monotonic() < deadline, "the command did not get far enough in time"
        time.sleep(0.1)
    process.send_signal(signum)
    return process.communicate(timeout=300)[0]


def dead_pid() -> int:
    """The id of a process that has ended (what a SIGKILLed writer leaves in its file names)."""
    done = subprocess.Popen([sys.executable, "-c", "pass"])
    done.wait()
    return done.pid


def training_updates(data: Path, *extra: str) -> list[str]:
    return [f"dataset_path={data}", *TINY_SADAAN, "tracking.observer=file",
            "tracking.file_dir=runs", "checkpoint.save_dir=ck/{run_id}", *extra]


@pytest.mark.slow
@pytest.mark.parametrize("signum, status", [(signal.SIGTERM, 143), (signal.SIGINT, 130)])
def test_an_interrupted_training_says_how_to_resume_and_resumes(sadaan_data, tmp_path, signum,
                                                                 status):
    process = start_experiment(SADAAN, *training_updates(sadaan_data, "training.num_epochs=40"),
                               cwd=tmp_path, env=environment())
    checkpoint = tmp_path / "ck" / "1" / "last_model.pth"
    output = signal_when(process, checkpoint.exists, signum)
    assert process.returncode == status, output[-3000:]
    assert "Traceback" not in output
    last = output.strip().splitlines()[-1]
    name = signal.Signals(signum).name
    match = re.fullmatch(rf"error: interrupted \({name}\); the last checkpoint is "
                         rf"ck/1/last_model\.pth \(epoch (\d+)\); resume with: (python .*)", last)
    assert match, last
    command = shlex.split(match.group(2))
    assert command[1:] == [str(SADAAN), "with", *training_updates(sadaan_data,
                                                                  "training.num_epochs=40"),
                           "checkpoint.resume=ck/1/last_model.pth"]
    record = json.loads((tmp_path / "runs" / "1" / "run.json").read_text())
    assert record["status"] == "INTERRUPTED"

    # A SIGKILL during a checkpoint write leaves a temporary file; the resume removes it.
    leftover = checkpoint.with_name(f".last_model.pth.{dead_pid()}-x1y2.tmp")
    leftover.write_bytes(b"\0" * 1000)
    epochs = int(match.group(1)) + 1
    resumed = subprocess.run([sys.executable, *command[1:], f"training.num_epochs={epochs}"],
                             cwd=tmp_path, env=environment(), capture_output=True, text=True,
                             timeout=300)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert f"resumed from ck/1/last_model.pth at epoch {epochs - 1}" in resumed.stderr
    assert not leftover.exists()


@pytest.mark.slow
def test_sigterm_during_convert_leaves_no_staging_folder_and_a_killed_one_is_removed(tmp_path):
    made = subprocess.run([sys.executable, str(LUNG), "generate_msd", "with", "msd_dir=msd",
                           "synthetic.num_volumes=8", "synthetic.volume_size=[96,96,40]"],
                          cwd=tmp_path, env=environment(), capture_output=True, text=True)
    assert made.returncode == 0, made.stderr[-2000:]
    killed = tmp_path / f".dataset.{dead_pid()}-ab12.partial"
    (killed / "images").mkdir(parents=True)
    (killed / "images" / "slice.png").write_bytes(b"\0" * 100)

    argv = [sys.executable, str(LUNG), "convert", "with", "msd_dir=msd", "dataset_path=dataset"]
    process = subprocess.Popen(argv, cwd=tmp_path, env=environment(), stdout=subprocess.PIPE,
                               stderr=subprocess.STDOUT, text=True)

    def staging_has_files():
        return any(p.name != killed.name and any(p.rglob("*.png"))
                   for p in tmp_path.glob(".dataset.*.partial"))

    output = signal_when(process, staging_has_files, signal.SIGTERM)
    assert process.returncode == 143, output[-3000:]
    assert "Traceback" not in output
    assert output.strip().splitlines()[-1] == (
        f"error: interrupted (SIGTERM) before it finished; nothing to resume from. Run it again "
        f"with: python {LUNG} convert with msd_dir=msd dataset_path=dataset")
    assert not killed.exists()  # the next run in the folder removed what SIGKILL left
    assert not list(tmp_path.glob(".dataset.*")) and not (tmp_path / "dataset").exists()
