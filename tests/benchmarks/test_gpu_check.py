"""``python -m benchmarks.gpu_check`` where there is no GPU: one line, exit 0, nothing
written; and its aneurysm epoch on a few cubes on CPU (what it times on a GPU runs here)."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from support import ROOT


def test_without_cuda_it_says_so_and_exits_cleanly():
    result = ROOT / "benchmarks" / "results" / "gpu_check.json"
    before = result.read_bytes() if result.exists() else None
    done = subprocess.run([sys.executable, "-m", "benchmarks.gpu_check"], cwd=ROOT,
                          capture_output=True, text=True, timeout=120,
                          env={**os.environ, "CUDA_VISIBLE_DEVICES": ""})
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.strip() == ("gpu_check: no CUDA device on this machine; nothing "
                                   "checked, nothing written (run it where a GPU is lent)")
    assert (result.read_bytes() if result.exists() else None) == before


@pytest.mark.slow
def test_its_aneurysm_epoch_runs_on_cpu_and_reports_its_time():
    """The timed epoch of the GPU check, at two cubes: it trains (a finite loss) and reports
    the epoch's time beside the seed's."""
    import math

    from benchmarks.gpu_check import _aneurysm_epoch

    figures = _aneurysm_epoch(count=2, device="cpu", precision="none", filters=(4, 8, 16, 32))
    assert figures["cubes"] == 2 and figures["train_time_s"] > 0
    assert math.isfinite(figures["train_loss_epoch"]) and figures["train_loss_epoch"] > 0
    seed_slowest = figures["seed_rtx3090_epoch_s"][1]
    assert figures["vs_seed_slowest"] == figures["epoch_time_s"] / seed_slowest


def test_its_batch_augmentation_timing_runs_on_cpu():
    from benchmarks.gpu_check import _batch_augmentation

    figures = _batch_augmentation(device="cpu", sizes=((2, (16, 16, 8)), (1, (8, 8, 8))))
    assert set(figures) == {"batch_2_16x16x8_ms", "batch_1_8x8x8_ms"}
    assert all(value > 0 for value in figures.values())
