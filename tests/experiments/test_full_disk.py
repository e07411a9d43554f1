"""A full disk, from the shell: one line "no space left on the device holding PATH", a
non-zero exit, and nothing claimed that was not saved (no COMPLETED record, no truncated
checkpoint, no half set of predictions)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from tests.experiments.full_disk import full_disk
from tests.tracking.support import REPO, SADAAN, TINY_SADAAN, environment

LUNG = REPO / "experiments" / "lung_tumor.py"


@pytest.fixture
def small_disk(tmp_path, request):
    disk = full_disk(tmp_path, size_kib=getattr(request, "param", 96))
    yield disk
    disk.close()


def shell(script: Path, *arguments: str, cwd: Path, env=None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(script), *arguments], cwd=cwd,
                          env=env or environment(), capture_output=True, text=True, timeout=300)


def error_line(done: subprocess.CompletedProcess) -> str:
    return done.stderr.strip().splitlines()[-1]


def tiny_sadaan(data: Path, *extra: str) -> list[str]:
    return ["with", f"dataset_path={data}", *TINY_SADAAN, "training.num_epochs=1", *extra]


@pytest.mark.slow
@pytest.mark.parametrize("small_disk", [96, 1024], indirect=True,
                         ids=["sources-do-not-fit", "checkpoint-copy-does-not-fit"])
def test_tracking_folder_on_a_full_disk(sadaan_data, tmp_path, small_disk):
    done = shell(SADAAN, *tiny_sadaan(sadaan_data, "tracking.observer=file",
                                      f"tracking.file_dir={small_disk.path}/runs",
                                      "checkpoint.save_dir=ck/{run_id}"),
                 cwd=tmp_path, env=small_disk.environment(environment()))
    assert done.returncode != 0, done.stderr[-3000:]
    assert error_line(done).startswith(f"error: no space left on the device holding "
                                       f"{small_disk.path}/runs/"), done.stderr[-3000:]
    assert "Completed after" not in done.stderr
    for record in (small_disk.path / "runs").glob("*/run.json"):
        assert json.loads(record.read_text())["status"] != "COMPLETED"
    for copy in (small_disk.path / "runs").glob("*/*.pth"):  # no truncated checkpoint copy
        original = tmp_path / "ck" / copy.parent.name / copy.name
        assert copy.stat().st_size == original.stat().st_size
    assert not list((small_disk.path / "runs").rglob(".*.partial"))


@pytest.mark.slow
def test_checkpoint_folder_on_a_full_disk(sadaan_data, tmp_path, small_disk):
    done = shell(SADAAN, *tiny_sadaan(sadaan_data, "tracking.observer=file",
                                      "tracking.file_dir=runs",
                                      f"checkpoint.save_dir={small_disk.path}/ck"),
                 cwd=tmp_path, env=small_disk.environment(environment()))
    assert done.returncode == 2, done.stderr[-3000:]
    line = error_line(done)
    assert line.startswith(f"error: no space left on the device holding "
                           f"{small_disk.path}/ck/best_model.pth"), line
    assert line.endswith("KiB free; the previous checkpoint there, if any, is unchanged; free "
                         "some space there or write elsewhere")
    assert "unexpected pos" not in done.stderr
    assert not list((small_disk.path / "ck").glob(".*"))  # no temporary left
    assert json.loads((tmp_path / "runs" / "1" / "run.json").read_text())["status"] == "FAILED"


@pytest.mark.slow
def test_lung_predictions_onto_a_full_disk(lung_checkpoint, tmp_path, small_disk):
    out = small_disk.path / "predictions"
    done = shell(LUNG, "predict", "with", f"weights={lung_checkpoint}/ck/weights/best.pt",
                 f"source={lung_checkpoint}/dataset/images", "save_overlay=True",
                 f"predict_dir={out}", "tracking.observer=none", cwd=tmp_path,
                 env=small_disk.environment(environment()))
    assert done.returncode == 2, done.stderr[-3000:]
    line = error_line(done)
    assert line.startswith(f"error: no space left on the device holding {out}"), line
    assert "the predictions this command had written were removed" in line
    assert "Traceback" not in done.stderr
    assert list(out.rglob("*")) == []  # no half set of outputs without predictions.json
