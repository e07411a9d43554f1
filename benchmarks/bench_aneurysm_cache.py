"""Aneurysm cubes: the training loader with `dataset.cache` none / memory / disk, per epoch.

Cubes at the default 32x128x128 are cut by `prepare` from 12 synthetic volumes (plain NPZ,
as `prepare` writes by default), listed several times to make an epoch of 80 cubes, and fed
through the default training transform (z-score, random 16x64x64 crop, axial rotations, z/y
flips) in batches of 4 with no worker process and with the default 2 workers. For each
mode: the seconds to build the dataset (the memory cache reads every cube then), and the
cubes per second of a first and a second epoch (the disk cache writes in the first and
reads in the second). The same loader as `training.make_loader` builds (EpochLoader).
"""

from __future__ import annotations

import os
import tempfile
import time
from pathlib import Path

import torch

from medseg.data.cube_transforms import cube_transforms
from medseg.data.loaders import EpochLoader
from medseg.data.npz_cubes import CACHE_MODES, cube_dataset, scan_cubes
from medseg.data.prepare_cubes import prepare_cubes
from medseg.data.synthetic.aneurysm import generate_aneurysm_volumes

QUICK = False
CUBE = (32, 128, 128)
CROP = (16, 64, 64)
EPOCH_CUBES = 80


def _epoch_rate(loader: EpochLoader, epoch: int) -> float:
    loader.set_epoch(epoch)
    started = time.perf_counter()
    count = sum(batch["image"].shape[0] for batch in loader)
    return round(count / (time.perf_counter() - started), 1)


def _measure(records, mode: str, cache_dir: Path, num_workers: int) -> dict:
    started = time.perf_counter()
    dataset = cube_dataset(records, transform=cube_transforms(train=True, crop_size=CROP),
                           cache=mode, cache_dir=cache_dir / f"{mode}_{num_workers}")
    build_s = time.perf_counter() - started
    loader = EpochLoader(dataset, batch_size=4, shuffle=True, num_workers=num_workers, seed=0)
    return {"build_s": round(build_s, 2),
            "epoch_1_cubes_per_s": _epoch_rate(loader, 1),
            "epoch_2_cubes_per_s": _epoch_rate(loader, 2)}


def run() -> dict:
    with tempfile.TemporaryDirectory(prefix="bench_aneurysm_cache_") as work:
        work = Path(work)
        volumes = generate_aneurysm_volumes(work / "volumes", num_series=12, aneurysm_fraction=1.0)
        summary = prepare_cubes(volumes, work / "cubes", cube_shape=CUBE, test_fraction=0.0,
                                negatives_per_series=1)
        records = scan_cubes(summary.output_dir, cube_shape=CUBE).records(range(5))
        epoch = (records * (EPOCH_CUBES // len(records) + 1))[:EPOCH_CUBES]
        result = {mode: {f"workers_{workers}": _measure(epoch, mode, work / "cache", workers)
                         for workers in (0, 2)}
                  for mode in CACHE_MODES}
    baseline = result["none"]["workers_0"]["epoch_2_cubes_per_s"]
    return {
        "cube_shape": list(CUBE), "crop": list(CROP), "batch_size": 4,
        "epoch_cubes": EPOCH_CUBES, "distinct_cubes": len(records),
        "loader": result,
        "memory_over_none_workers_0": round(
            result["memory"]["workers_0"]["epoch_2_cubes_per_s"] / baseline, 2),
        "disk_over_none_workers_0": round(
            result["disk"]["workers_0"]["epoch_2_cubes_per_s"] / baseline, 2),
        "torch_threads": torch.get_num_threads(),
        "load_average": round(os.getloadavg()[0], 2),
    }
