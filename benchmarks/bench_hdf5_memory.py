"""Peak RSS of one SADAAN training-data epoch (HDF5 reading, augmentation, 2 workers) for a
small and a ten-times larger file: the lazy reader must not grow with the number of cases."""

from __future__ import annotations

import json
import subprocess
import sys
import tempfile
from pathlib import Path

from medseg.data.synthetic.sadaan import generate_sadaan_dataset

SIZES = (40, 400)

WORKER = r"""
import json, resource, sys, time
from medseg.data.hdf5 import HDF5SegmentationDataset
from medseg.data.loaders import EpochLoader
from medseg.data.transforms import sadaan_transforms

path = sys.argv[1]
dataset = HDF5SegmentationDataset(path, sadaan_transforms(image_size=(64, 64, 32), train=True,
                                                          augment=True))
loader = EpochLoader(dataset, batch_size=4, shuffle=True, num_workers=2, seed=0)
loader.set_epoch(1)
started = time.perf_counter()
cases = sum(len(batch["index"]) for batch in loader)
elapsed = time.perf_counter() - started
print(json.dumps({
    "cases": cases, "cases_per_s": cases / elapsed,
    "main_peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
    "worker_peak_rss_mb": resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024,
}))
"""


def run() -> dict:
    results = {}
    with tempfile.TemporaryDirectory() as tmp:
        for cases in SIZES:
            folder = generate_sadaan_dataset(Path(tmp) / str(cases), num_train=cases, num_val=1,
                                             num_test=0, seed=cases)
            train = folder / "train.h5"
            completed = subprocess.run([sys.executable, "-c", WORKER, str(train)],
                                       capture_output=True, text=True, check=True)
            measured = json.loads(completed.stdout.strip().splitlines()[-1])
            measured["file_mb"] = round(train.stat().st_size / 2**20, 1)
            results[f"{cases}_cases"] = {k: round(v, 1) if isinstance(v, float) else v
                                         for k, v in measured.items()}
    small, large = (results[f"{n}_cases"] for n in SIZES)
    results["main_peak_growth_mb"] = round(large["main_peak_rss_mb"] - small["main_peak_rss_mb"], 1)
    results["worker_peak_growth_mb"] = round(
        large["worker_peak_rss_mb"] - small["worker_peak_rss_mb"], 1)
    return results
