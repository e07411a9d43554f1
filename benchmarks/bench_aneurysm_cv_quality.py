"""Aneurysm cubes on CPU: the `cpu_quality` recipe on a five-fold `cross_validate`.

Five runs of `cpu_quality` (each fold validating once, the other four training) on the demo
data, as ``python experiments/aneurysm_cubes.py cross_validate with cpu_quality`` runs them;
reported: each fold's validation Dice and AUC, their mean and standard deviation over the
folds (``cv_<metric>_mean``/``_std``), the metrics over all out-of-fold cubes pooled
(``cv_pooled_<metric>``), and the mean of the five fold models on the held-out test series
(``ensemble_test_*``). About five times `aneurysm_cpu_quality` (2.5 hours on 2 CPU cores);
an interrupted benchmark run again continues with the folds it had not finished (the
folds of ``checkpoints/aneurysm_cubes/benchmark_cv_quality``; delete it to start afresh).
"""

from __future__ import annotations

import json
import time

import torch

from benchmarks.bench_aneurysm_quality import ROOT, _run, demo_data

QUICK = False
RUN_DIR = ROOT / "checkpoints" / "aneurysm_cubes" / "benchmark_cv_quality"
REPORTED = ("dice", "auc", "accuracy", "pos_accuracy", "neg_accuracy")


def measure_cv(named: str, run_dir, cv_id: str = "benchmark", **updates) -> dict:
    """``cross_validate`` with the named config ``named`` (and config ``updates``) into
    ``run_dir``, summarised. The demo data are generated first unless ``updates`` name
    another ``cubes_dir``."""
    timings = {} if "cubes_dir" in updates else demo_data(named, run_dir)
    started = time.perf_counter()
    summary = _run("cross_validate", named, run_dir, cv_id=cv_id, **updates).result
    timings["cross_validate_s"] = round(time.perf_counter() - started, 1)
    root = run_dir  # checkpoint.save_dir without placeholders: the folds' folder itself
    folds = {}
    for fold in range(5):
        metrics = json.loads((root / f"fold_{fold}" / "evaluation_fold" / "fold_metrics.json")
                             .read_text())
        folds[f"fold_{fold}"] = {name: round(metrics[f"fold_{name}"], 4) for name in REPORTED}
    rounded = {name: (round(value, 4) if isinstance(value, float) else value)
               for name, value in summary.items()}
    return {"command": f"python experiments/aneurysm_cubes.py cross_validate with {named}",
            "folds": folds, **rounded, **timings, "torch_threads": torch.get_num_threads()}


def run() -> dict:
    return measure_cv("cpu_quality", RUN_DIR)
