"""Lung tumour: tumour Dice on the validation volumes after a CPU training run at 128x128.

The whole documented path on generated data: `generate_msd with demo` (24 chest volumes of
128 x 128 x 48), `convert with demo`, then `with demo` training (the `demo` named config plus
the overrides below), timed from the start of training. Reports the best epoch's pooled tumour
Dice, per-volume Dice, IoU and pixel accuracy on the validation volumes.
"""

from __future__ import annotations

import importlib
import json
import os
import tempfile
import time
from pathlib import Path

QUICK = False
# Few optimizer steps fit in a CPU budget; Dice alone learns fastest there (dice_bce's
# balanced CE first marks every vessel as tumour; CE alone predicts no tumour at all).
OVERRIDES = {"loss": {"type": "dice"}, "training": {"learning_rate": 1e-2, "num_epochs": 24},
             "logging": {"progress_bar": False}}


def run() -> dict:
    experiment = importlib.import_module("experiments.lung_tumor").ex
    with tempfile.TemporaryDirectory() as tmp:
        cwd = os.getcwd()
        os.chdir(tmp)  # the demo config's relative data/ and runs/ folders land here
        try:
            quiet = {"tracking": {"observer": "none"}}
            experiment.run("generate_msd", named_configs=["demo"], config_updates=quiet)
            experiment.run("convert", named_configs=["demo"], config_updates=quiet)
            started = time.perf_counter()
            updates = {**OVERRIDES, "tracking": {"observer": "file", "file_dir": "sacred_runs"}}
            result = experiment.run("main", named_configs=["demo"], config_updates=updates,
                                    options={"--capture": "sys"}).result
            wall = time.perf_counter() - started
            metrics = json.loads(Path("sacred_runs/1/metrics.json").read_text())
        finally:
            os.chdir(cwd)
    best = result["best_epoch"]

    def at_best(name):
        entry = metrics[name]
        return round(entry["values"][entry["steps"].index(best)], 4)

    return {"load_average_1min_at_end": round(os.getloadavg()[0], 2),
            "command": "python experiments/lung_tumor.py with demo loss.type=dice "
                       "training.learning_rate=1e-2 training.num_epochs=24",
            "training_wall_s": round(wall, 1), "epochs_run": result["epochs_run"],
            "best_epoch": best, "val_tumor_dice": at_best("val_tumor_dice"),
            "val_volume_dice": at_best("val_volume_dice"),
            "val_tumor_iou": at_best("val_tumor_iou"),
            "val_pixel_accuracy": at_best("val_pixel_accuracy"),
            "val_tumor_dice_per_epoch": [round(v, 4) for v in metrics["val_tumor_dice"]["values"]]}
