"""SMALabeller: a 4-trial Ray Tune sweep on tiny generated heads: wall time, trials ASHA
stopped early, and that every trial is a recorded run with its config and curves.

`tune with tune.num_samples=4 tune.search=random tune.max_t=2 epochs=2` (ASHA, grace period 1,
reduction factor 2) on 6 heads of 24 x 24 x 12..16 mm with a 4-8-16 U-Net, recorded by the file
observer (the same records a MongoDB observer gets).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from medseg.data.synthetic.smalabeller import BrainSettings, generate_brain_dataset

QUICK = False
ROOT = Path(__file__).resolve().parents[1]


def run() -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        data = generate_brain_dataset(tmp / "data", num_cases=6,
                                      settings=BrainSettings((24, 24), (12, 16), (1.0, 2.0), 0.02, 1))
        args = [f"training_images={data / 'imagesTr_resampled'}",
                f"training_labels={data / 'labelsTr_resampled'}", f"runs_dir={tmp / 'runs'}",
                "tracking.observer=file", f"tracking.file_dir={tmp / 'sacred'}",
                "tune.num_samples=4", "tune.search=random", "tune.max_t=2", "tune.name=bench",
                f"tune.storage_path={tmp / 'ray'}", "num_workers=0", "batch_size=2", "epochs=2",
                "model.channels=[4,8,16]", "data.crop_size=[16,16,8]",
                "data.crops_per_volume=2", "bn_calibration.warmup_batches=1",
                "tensorboard.enabled=False"]
        started = time.perf_counter()
        done = subprocess.run([sys.executable, str(ROOT / "experiments" / "smalabeller.py"),
                               "tune", "with", *args], capture_output=True, text=True, cwd=tmp)
        wall = time.perf_counter() - started
        if done.returncode:
            raise RuntimeError(done.stderr[-2000:])
        records = []
        for folder in sorted((tmp / "sacred").glob("[0-9]*")):
            run_json = json.loads((folder / "run.json").read_text())
            info = json.loads((folder / "info.json").read_text())
            config = json.loads((folder / "config.json").read_text())
            metrics = json.loads((folder / "metrics.json").read_text())
            records.append({"command": run_json["command"], "status": run_json["status"],
                            "tags": config.get("tags"), "config": config.get("config"),
                            "val_loss_curve": metrics.get("val_loss", {}).get("values"),
                            "stopped_by_scheduler": info.get("stopped_by_scheduler"),
                            "sweep": info.get("sweep", {}).get("wall_time_s")})
    trials = [r for r in records if r["command"] == "main"]
    sweep = [r for r in records if r["command"] == "tune"][0]
    return {"command": "python experiments/smalabeller.py tune with tune.num_samples=4 "
                       "tune.search=random tune.max_t=2 epochs=2 (tiny settings above)",
            "load_average_1min_at_end": round(os.getloadavg()[0], 2),
            "command_wall_s": round(wall, 1), "tuner_fit_wall_s": round(sweep["sweep"], 1),
            "trials_recorded": len(trials),
            "trials_completed": sum(r["status"] == "COMPLETED" for r in trials),
            "trials_stopped_early_by_asha": sum(bool(r["stopped_by_scheduler"]) for r in trials),
            "trials": [{k: r[k] for k in ("status", "tags", "config", "val_loss_curve",
                                          "stopped_by_scheduler")} for r in trials]}
