"""Aneurysm cubes on CPU: Dice on positive validation cubes and AUC-ROC after the `demo` run.

The whole documented path at CPU size (the `demo` preset): synthetic head CTAs, `prepare`
with 16x64x64 cubes, training on folds 1-4 with fold 0 validating, then the best epoch
scored on fold 0 and on the held-out test series. The data are the demo's own folders
(``data/aneurysm_demo_volumes``, ``data/aneurysm_demo_cubes``), written once and reused;
the run goes to ``checkpoints/aneurysm_cubes/benchmark_quality``. Equivalent commands::

    python experiments/aneurysm_cubes.py generate_volumes with demo
    python experiments/aneurysm_cubes.py prepare with demo
    python experiments/aneurysm_cubes.py with demo

Run it with ``OMP_NUM_THREADS=1 nice -n 10 python -m benchmarks aneurysm_quality`` on a
shared machine: one thread per process avoids the oversubscription that makes PyTorch's
CPU convolutions several times slower when the cores are busy.
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

import torch

from experiments import aneurysm_cubes as experiment
from medseg.metrics.classification import roc_auc

QUICK = False
ROOT = Path(__file__).resolve().parent.parent
RUN_DIR = ROOT / "checkpoints" / "aneurysm_cubes" / "benchmark_quality"


def _run(command: str, named: str, run_dir: Path, **updates):
    config = {"tracking": {"observer": "none"}, "logging": {"progress_bar": False},
              "checkpoint": {"save_dir": str(run_dir), "save_frequency": 0}, **updates}
    return experiment.ex.run(command, config_updates=config, named_configs=[named],
                             options={"--loglevel": "WARNING"})


def demo_data(named: str, run_dir: Path) -> dict:
    """Generate and prepare the demo's folders unless they exist; the seconds each took."""
    os.chdir(ROOT)  # the demo's folders are relative to the repository
    timings = {}
    for command, folder in (("generate_volumes", experiment.DEMO_VOLUMES),
                            ("prepare", experiment.DEMO_CUBES)):
        if not Path(folder).is_dir():
            started = time.perf_counter()
            _run(command, named, run_dir)
            timings[f"{command}_s"] = round(time.perf_counter() - started, 1)
    return timings


def measure(named: str, run_dir: Path) -> dict:
    """Train with the named config ``named`` on the demo data and score it."""
    timings = demo_data(named, run_dir)
    started = time.perf_counter()
    training = _run("main", named, run_dir)
    timings["train_s"] = round(time.perf_counter() - started, 1)
    result, config = training.result, training.config
    per_cube = json.loads((run_dir / "evaluation_fold" / "per_cube_metrics.json").read_text())
    history = torch.load(run_dir / "last_model.pth", weights_only=True)["history"]
    cubes = per_cube["cubes"]
    labels = [c["label"] for c in cubes]
    return {
        "command": f"python experiments/aneurysm_cubes.py with {named}",
        "cube_shape": config["dataset"]["cube_shape"],
        "crop": config["augmentation"]["crop_size"],
        "filters": config["model"]["filters"],
        "epochs": result["epochs_run"], "best_epoch": result["best_epoch"],
        "val_cubes": len(cubes), "val_positive_cubes": sum(labels),
        "val_positive_dice": round(result["fold_dice"], 4),
        "val_auc_max_score": round(roc_auc([c["max_probability"] for c in cubes], labels), 4),
        "val_auc_fraction_score": round(roc_auc([c["fraction_above_pos_thr"] for c in cubes],
                                                labels), 4),
        "val_accuracy": round(result["fold_accuracy"], 4),
        "val_pos_accuracy": round(result["fold_pos_accuracy"], 4),
        "val_neg_accuracy": round(result["fold_neg_accuracy"], 4),
        "test_positive_dice": round(result["test_dice"], 4),
        "test_auc": round(result["test_auc"], 4),
        "dice_by_epoch": [round(row.get("val_dice", float("nan")), 3) for row in history],
        "auc_by_epoch": [round(row.get("val_auc", float("nan")), 3) for row in history],
        "epoch_time_s_median": round(sorted(r["epoch_time_s"] for r in history)[len(history) // 2],
                                     1),
        **timings,
        "torch_threads": torch.get_num_threads(),
        "load_average_1min_at_end": round(os.getloadavg()[0], 2),
    }


def run() -> dict:
    return measure("demo", RUN_DIR)
