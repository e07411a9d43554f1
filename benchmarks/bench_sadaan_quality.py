"""SADAAN learning on the default synthetic data (64x64x32, 13 structures, 160/32/32 cases) on
CPU: per-structure test Dice, presence accuracy and wall time of the documented command."""

from __future__ import annotations

import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

QUICK = False
ROOT = Path(__file__).resolve().parents[1]
TRAINING = ["training.image_size=[64,64,32]", "training.num_epochs=40",
            "training.learning_rate=1e-3", "training.gradient_accumulation_steps=1",
            "training.warmup_epochs=2", "optimizer.lr_scheduler=cosine_annealing",
            "logging.progress_bar=False"]
TARGETS = {"test_dice_mean": "> 0.85", "test_presence_accuracy": "> 0.97"}


def train_and_score(generate: list[str], training: list[str]) -> dict:
    """Generate data with the ``generate`` updates, train with ``training`` and return the
    wall time, the run's result and its test metrics (``test_`` prefix removed, rounded)."""
    with tempfile.TemporaryDirectory() as tmp:
        data, runs = Path(tmp) / "data", Path(tmp) / "runs"
        experiment = [sys.executable, str(ROOT / "experiments" / "sadaan.py")]
        subprocess.run([*experiment, "generate_data", "with", f"dataset_path={data}",
                        "tracking.observer=none", *generate], check=True, capture_output=True)
        command = [*experiment, "with", f"dataset_path={data}", *training,
                   "tracking.observer=file", f"tracking.file_dir={runs}",
                   f"checkpoint.save_dir={Path(tmp) / 'checkpoints' / '{run_id}'}"]
        started = time.perf_counter()
        subprocess.run(command, check=True, capture_output=True)
        wall = time.perf_counter() - started
        record = json.loads((runs / "1" / "run.json").read_text())
        metrics = json.loads((runs / "1" / "metrics.json").read_text())
    test = {name.removeprefix("test_"): round(series["values"][-1], 4)
            for name, series in metrics.items() if name.startswith("test_")}
    curves = {name: [round(v, 4) for v in metrics[name]["values"]]
              for name in ("val_dice", "val_presence_balanced_accuracy") if name in metrics}
    return {"wall_s": round(wall), "result": record["result"], "test": test, "curves": curves}


def per_structure(test: dict, metric: str, others: tuple[str, ...] = ()) -> dict:
    """``{structure: value}`` of ``<metric>_<structure>`` entries, leaving out the metrics in
    ``others`` whose names start with ``<metric>_`` too."""
    prefix = f"{metric}_"
    return {k.removeprefix(prefix): v for k, v in test.items()
            if k.startswith(prefix)
            and not any(k == o or k.startswith(f"{o}_") for o in others)}


def run() -> dict:
    measured = train_and_score([], TRAINING)
    test = measured["test"]
    return {
        "command": "python experiments/sadaan.py with dataset_path=DATA " + " ".join(TRAINING),
        "wall_s": measured["wall_s"], "result": measured["result"],
        "test_dice_mean": test.get("dice"), "test_presence_accuracy": test.get("presence_accuracy"),
        "test_dice_per_structure": per_structure(test, "dice", ("dice_present",)),
        "test_presence_accuracy_per_structure": per_structure(test, "presence_accuracy"),
        "val_dice_per_epoch": measured["curves"]["val_dice"],
        "targets": TARGETS,
    }
