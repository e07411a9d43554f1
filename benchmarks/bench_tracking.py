"""Tracking cost: a run logging 2 x 50,000 metric points, recorded nowhere, to files and to
MongoDB (the embedded server); the points kept after thinning; `medseg db import` of the
file run; and the wait at the end of a run whose database went away."""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pymongo

from medseg import db

REPO = Path(__file__).resolve().parents[1]
PROBE = REPO / "tests" / "tracking" / "metrics_experiment.py"
POINTS = 50_000


def _timed(argv: list[str], cwd: Path, env: dict[str, str]) -> float:
    started = time.perf_counter()
    done = subprocess.run(argv, cwd=cwd, env=env, capture_output=True, text=True)
    elapsed = time.perf_counter() - started
    if done.returncode != 0:
        raise RuntimeError(f"{' '.join(argv)} failed:\n{done.stderr[-2000:]}")
    return elapsed


def run() -> dict:
    with tempfile.TemporaryDirectory(prefix="bench-tracking-") as folder:
        folder = Path(folder)
        server = db.start_on_free_port(folder / "server")
        env = {**os.environ, "PYTHONPATH": str(REPO), "MEDSEG_MONGO_URL": server.url}
        probe = [sys.executable, str(PROBE), "with", f"points={POINTS}", "artifacts=0"]
        try:
            seconds = {observer: _timed(probe + [f"tracking.observer={observer}",
                                                 "tracking.db_name=bench"], folder, env)
                       for observer in ("none", "file", "mongo")}
            client = pymongo.MongoClient(server.url)
            stored = client["bench"].metrics.find_one({"name": "loss"})
            imported_s = _timed([sys.executable, "-m", "medseg.cli", "db", "import", "sacred_runs",
                                 "--db-name", "imported"], folder, env)
            client.close()

            process = subprocess.Popen(probe[:-2] + ["points=20", "pause_s=0.1",
                                                     "tracking.observer=mongo",
                                                     "tracking.db_name=gone",
                                                     "tracking.flush_timeout_s=5"],
                                       cwd=folder, env=env, stdout=subprocess.PIPE,
                                       stderr=subprocess.STDOUT, text=True)
            while "Started run" not in process.stdout.readline():
                pass
            server.stop()
            stopped = time.perf_counter()
            process.communicate(timeout=120)
            ended_after_s = time.perf_counter() - stopped
        finally:
            server.stop()
    per_point = {k: (v - seconds["none"]) / (2 * POINTS) * 1e6 for k, v in seconds.items()}
    return {
        "points_logged_per_metric": POINTS,
        "run_seconds": {k: round(v, 2) for k, v in seconds.items()},
        "overhead_us_per_point": {k: round(v, 1) for k, v in per_point.items() if k != "none"},
        "points_stored_per_metric_mongo": len(stored["steps"]),
        "first_and_last_step_stored": [stored["steps"][0], stored["steps"][-1]],
        "import_seconds_file_run": round(imported_s, 2),
        "database_gone_run_end_after_s": round(ended_after_s, 1),
        "database_gone_bound_s": 5,
    }
