"""Lung tumour: the overfit sanity check at 128x128 on generated slices reaches Dice > 0.95.

`python experiments/lung_tumor.py overfit with demo` on a freshly generated and converted demo
dataset: 4 tumour slices from different volumes, no augmentation, AdamW at
overfit.learning_rate, Dice checked every 25 steps in evaluation mode.
"""

from __future__ import annotations

import importlib
import os
import tempfile
import time

QUICK = False


def run() -> dict:
    experiment = importlib.import_module("experiments.lung_tumor").ex
    with tempfile.TemporaryDirectory() as tmp:
        cwd = os.getcwd()
        os.chdir(tmp)
        try:
            quiet = {"tracking": {"observer": "none"}}
            experiment.run("generate_msd", named_configs=["demo"], config_updates=quiet)
            experiment.run("convert", named_configs=["demo"], config_updates=quiet)
            started = time.perf_counter()
            result = experiment.run("overfit", named_configs=["demo"], config_updates=quiet,
                                    options={"--capture": "sys"}).result
            wall = time.perf_counter() - started
        finally:
            os.chdir(cwd)
    return {"load_average_1min_at_end": round(os.getloadavg()[0], 2),
            "command": "python experiments/lung_tumor.py overfit with demo",
            "passed": result["passed"], "dice": round(result["dice"], 4),
            "steps": result["steps"], "slices": result["slices"], "wall_s": round(wall, 1)}
