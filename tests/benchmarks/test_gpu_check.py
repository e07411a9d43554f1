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
def test_its_aneurysm_epoch_trains_on_cpu():
    from benchmarks.gpu_check import _aneurysm_epoch

    figures = _aneurysm_epoch(count=2, device="cpu", precision="none", filters=(4, 8, 16, 32))
    assert figures["cubes"] == 2 and figures["train_time_s"] > 0
