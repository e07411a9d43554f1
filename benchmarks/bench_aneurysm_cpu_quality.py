"""Aneurysm cubes on CPU, the `cpu_quality` recipe: test AUC >= 0.95 and positive Dice >= 0.70?

As `aneurysm_quality` (the same demo data, written once and reused; fold 0 validates, the
best epoch is scored on fold 0 and on the held-out test series) with the `cpu_quality`
named config instead of `demo`. The target is test AUC >= 0.95 and positive-cube test Dice
>= 0.70 within 30 minutes on this machine, data generation included when the folders are
new (`wall_s` of the record). Equivalent commands::

    python experiments/aneurysm_cubes.py generate_volumes with cpu_quality
    python experiments/aneurysm_cubes.py prepare with cpu_quality
    python experiments/aneurysm_cubes.py with cpu_quality

Run it with ``OMP_NUM_THREADS=1 nice -n 10 python -m benchmarks aneurysm_cpu_quality``.
"""

from __future__ import annotations

from benchmarks.bench_aneurysm_quality import ROOT, measure

QUICK = False
RUN_DIR = ROOT / "checkpoints" / "aneurysm_cubes" / "benchmark_cpu_quality"
TARGETS = {"test_auc": 0.95, "test_positive_dice": 0.70}


def run() -> dict:
    result = measure("cpu_quality", RUN_DIR)
    result["targets"] = TARGETS
    result["targets_met"] = all(result[name] >= value for name, value in TARGETS.items())
    return result
