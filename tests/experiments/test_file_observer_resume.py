"""With the file observer, a resumed training continues its run, as with MongoDB: one run id,
one folder, every metric step once, and the record COMPLETED (not a second run beside one
left RUNNING or INTERRUPTED)."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time

import pytest
import torch

from tests.experiments.test_interruptions import signal_when, training_updates
from tests.tracking.support import SADAAN, environment, start_experiment


@pytest.mark.slow
def test_a_resume_continues_the_file_observer_run(sadaan_data, tmp_path):
    updates = training_updates(sadaan_data, "training.num_epochs=40")
    process = start_experiment(SADAAN, *updates, cwd=tmp_path, env=environment())
    checkpoint = tmp_path / "ck" / "1" / "last_model.pth"
    seen = []

    def a_while_after_the_checkpoint():  # steps logged after it, which the resume repeats
        if checkpoint.exists():
            seen.append(time.monotonic())
        return bool(seen) and time.monotonic() - seen[0] > 3

    signal_when(process, a_while_after_the_checkpoint, signal.SIGTERM)
    assert process.returncode == 143
    run = tmp_path / "runs" / "1"
    interrupted = json.loads((run / "metrics.json").read_text())
    # The checkpoint's epoch, not the metrics' count: SIGTERM may land after an epoch's
    # validation was logged and before its checkpoint was written (the resume drops those steps).
    epoch = int(torch.load(checkpoint, map_location="cpu", weights_only=True)["epoch"])
    resumed = subprocess.run([sys.executable, str(SADAAN), "with", *updates,
                              f"checkpoint.resume={checkpoint}",
                              f"training.num_epochs={epoch + 1}"], cwd=tmp_path,
                             env=environment(), capture_output=True, text=True, timeout=300)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "tracking: the resumed training continues run 1 in runs/1" in resumed.stderr
    assert sorted(p.name for p in (tmp_path / "runs").iterdir() if p.name != "_sources") == ["1"]
    record = json.loads((run / "run.json").read_text())
    assert record["status"] == "COMPLETED"
    metrics = json.loads((run / "metrics.json").read_text())
    assert metrics["val_dice"]["steps"] == list(range(1, epoch + 2))
    steps = metrics["train_loss"]["steps"]
    assert steps == sorted(set(steps)) and steps[0] == 1  # every step once, in order
    # What the interrupted run logged is kept, once; the resume logs epoch `epoch + 1` (the
    # interrupted run may already have logged all of its training steps, when SIGTERM landed
    # during that epoch's validation).
    assert set(interrupted["train_loss"]["steps"]) <= set(steps)
    assert len(steps) % (epoch + 1) == 0  # whole epochs, each with the same number of steps
    info = json.loads((run / "info.json").read_text())
    assert [r["previous_status"] for r in info["resumes"]] == ["INTERRUPTED"]
    assert record["artifacts"].count("last_model.pth") == 1
    assert "[medseg: resumed" in (run / "cout.txt").read_text()
