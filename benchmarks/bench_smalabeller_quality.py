"""SMALabeller: validation Dice per epoch on generated brain MRI, BN calibration on and off.

`generate_data with cpu_quality` (40 heads of 48 x 48 x 20..28 mm, stored with slice
thicknesses of 1, 1.5 and 2 mm in random orientations; 32 train, 8 validate), then `with
cpu_quality` (the demo's network, one crop per volume, 60 epochs) twice: as it stands
(BatchNorm calibrated on 4 training batches before each validation) and with
`bn_calibration.enabled=False` (validation uses the running averages kept during training).
Same seed, same data. ``SMALABELLER_BENCH_CONFIG=demo`` and ``SMALABELLER_BENCH_EPOCHS=N``
measure another named config or length.
"""

from __future__ import annotations

import importlib
import json
import os
import tempfile
import time
from pathlib import Path

QUICK = False
NAMED = os.environ.get("SMALABELLER_BENCH_CONFIG", "cpu_quality")
EPOCHS = int(os.environ.get("SMALABELLER_BENCH_EPOCHS", "60"))
# One crop per volume (cpu_quality's; half the demo's step cost).
CROPS = 1


def _train(experiment, bn: bool) -> dict:
    updates = {"seed": 1, "epochs": EPOCHS, "runs_dir": "runs", "bn_calibration": {"enabled": bn},
               "data": {"crops_per_volume": CROPS},
               "training": {"progress_bar": False},
               "tracking": {"observer": "file", "file_dir": f"sacred_{int(bn)}"}}
    started = time.perf_counter()
    run = experiment.run("main", named_configs=[NAMED], config_updates=updates,
                         options={"--capture": "sys"})
    wall = time.perf_counter() - started
    metrics = json.loads(Path(f"sacred_{int(bn)}/1/metrics.json").read_text())
    return {"training_wall_s": round(wall, 1), "best_epoch": run.result["best_epoch"],
            "val_dice_at_best_epoch": round(run.result["best_val_dice"], 4),
            "val_dice_per_epoch": [round(v, 4) for v in metrics["val_dice"]["values"]],
            "val_loss_per_epoch": [round(v, 4) for v in metrics["val_loss"]["values"]],
            "train_loss_per_epoch": [round(v, 4) for v in metrics["train_loss_epoch"]["values"]]}


def run() -> dict:
    experiment = importlib.import_module("experiments.smalabeller").ex
    with tempfile.TemporaryDirectory() as tmp:
        cwd = os.getcwd()
        os.chdir(tmp)
        try:
            experiment.run("generate_data", named_configs=[NAMED],
                           config_updates={"tracking": {"observer": "none"}})
            with_bn = _train(experiment, True)
            without_bn = _train(experiment, False)
        finally:
            os.chdir(cwd)
    return {"command": f"python experiments/smalabeller.py with {NAMED} epochs={EPOCHS} seed=1 "
                       "data.crops_per_volume=1 [bn_calibration.enabled=False]",
            "load_average_1min_at_end": round(os.getloadavg()[0], 2),
            "bn_calibration_on": with_bn, "bn_calibration_off": without_bn}
