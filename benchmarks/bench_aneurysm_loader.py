"""Aneurysm cubes at the default 32x128x128: NPZ compressed vs plain, loader vs model throughput.

Cubes are cut by `prepare` from synthetic volumes at the default size, once written plain and
once compressed. Measured per cube: file size, the read of a cold file (evicted from the page
cache with posix_fadvise, so the disk is read again) and of a warm one, and the validation
scan. Then the training loader of the default configuration (z-score, random 16x64x64 crop,
axial rotations, z/y flips, batches of 4) in one process and with the default 2 workers,
against what the default DynUNet consumes in training steps on this machine's CPU, and
against the GPU rate the seed documents (an RTX 3090 runs an epoch of the 368-cube small
dataset in 8-10 s: 37-46 cubes/s, validation included).
"""

from __future__ import annotations

import os
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from ingredients.model import build_dynunet
from medseg.data.cube_transforms import cube_transforms
from medseg.data.loaders import EpochLoader
from medseg.data.npz_cubes import NpzCubeDataset, forget_inspections, read_cube, scan_cubes
from medseg.data.prepare_cubes import prepare_cubes
from medseg.data.synthetic.aneurysm import generate_aneurysm_volumes

QUICK = False
SEED_GPU_CUBES_PER_S = (368 / 10, 368 / 8)
CUBE = (32, 128, 128)
CROP = (16, 64, 64)


def _evict(path: Path) -> None:
    with open(path, "rb") as handle:
        os.posix_fadvise(handle.fileno(), 0, 0, os.POSIX_FADV_DONTNEED)


def _per_cube_ms(paths, action, repeats: int = 3) -> float:
    times = []
    for _ in range(repeats):
        started = time.perf_counter()
        for path in paths:
            action(path)
        times.append((time.perf_counter() - started) / len(paths) * 1000)
    return round(statistics.median(times), 3)


def _cold_read(path: Path) -> None:
    _evict(path)
    read_cube(path)


def _loader_rate(records, num_workers: int, batches: int = 40) -> float:
    """Cubes per second in one epoch of ``batches`` batches, after the first batch (which
    pays for starting the workers). The few cubes are listed repeatedly to fill the epoch."""
    repeated = (records * (4 * (batches + 1) // len(records) + 1))[:4 * (batches + 1)]
    dataset = NpzCubeDataset(repeated, transform=cube_transforms(train=True, crop_size=CROP))
    loader = EpochLoader(dataset, batch_size=4, shuffle=True, num_workers=num_workers, seed=0)
    loader.set_epoch(1)
    iterator = iter(loader)
    next(iterator)
    started = time.perf_counter()
    count = sum(batch["image"].shape[0] for batch in iterator)
    return round(count / (time.perf_counter() - started), 2)


def _model_rate(steps: int = 2) -> float:
    model = build_dynunet([32, 64, 128, 256], 3, [1, 2, 2, 2], 0.1, "instance", False)
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-4)
    image = torch.randn(4, 1, *CROP)
    target = (torch.rand(4, 1, *CROP) > 0.99).float()

    def step():
        loss = torch.nn.functional.binary_cross_entropy_with_logits(model(image), target)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()

    step()
    started = time.perf_counter()
    for _ in range(steps):
        step()
    return round(4 * steps / (time.perf_counter() - started), 3)


def run() -> dict:
    with tempfile.TemporaryDirectory(prefix="bench_aneurysm_") as work:
        work = Path(work)
        volumes = generate_aneurysm_volumes(work / "volumes", num_series=12, aneurysm_fraction=1.0)
        folders, result = {}, {}
        for name, compress in (("plain", False), ("compressed", True)):
            started = time.perf_counter()
            summary = prepare_cubes(volumes, work / name, cube_shape=CUBE, compress=compress,
                                    test_fraction=0.0, negatives_per_series=1)
            prepare_s = time.perf_counter() - started
            folders[name] = summary.output_dir
            paths = sorted(summary.output_dir.rglob("*.npz"))
            forget_inspections()
            started = time.perf_counter()
            scan_cubes(summary.output_dir, cube_shape=CUBE)
            scan = round((time.perf_counter() - started) / len(paths) * 1000, 3)
            result[name] = {
                "cubes": len(paths),
                "mb_per_cube": round(np.mean([p.stat().st_size for p in paths]) / 2**20, 3),
                "read_ms_cold": _per_cube_ms(paths, _cold_read),
                "read_ms_warm": _per_cube_ms(paths, read_cube),
                "validation_scan_ms": scan,
                "prepare_s": round(prepare_s, 1),
            }
        records = scan_cubes(folders["plain"], cube_shape=CUBE).records(range(5))
        packed = scan_cubes(folders["compressed"], cube_shape=CUBE).records(range(5))
        loader = {
            "plain_workers_0": _loader_rate(records, 0),
            "plain_workers_2": _loader_rate(records, 2),
            "compressed_workers_0": _loader_rate(packed, 0),
            "compressed_workers_2": _loader_rate(packed, 2),
        }
    model_cpu = _model_rate()
    return {
        "cube_shape": list(CUBE), "crop": list(CROP), "batch_size": 4,
        "npz": result,
        "loader_cubes_per_s": loader,
        "model_cubes_per_s_cpu": model_cpu,
        "model_cubes_per_s_seed_gpu": [round(v, 1) for v in SEED_GPU_CUBES_PER_S],
        "loader_over_seed_gpu": round(loader["plain_workers_2"] / SEED_GPU_CUBES_PER_S[1], 2),
        "torch_threads": torch.get_num_threads(),
        "load_average": os.getloadavg()[0],
    }

