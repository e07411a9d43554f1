"""SMALabeller: training slices/s of the 2D U-Net on CPU (fp32, bf16) and the loader's rate
with and without the cache, against what the model consumes.

Training steps run the pipeline's own pieces (U-Net, DiceCE loss, AdamW, slice reshape) on a
batch shaped like the `demo` config's (2 volumes x 2 crops of 48 x 48 x 16 = 64 slices), for the
`demo` widths (8-64) (and the original's 64-1024 with SMALABELLER_BENCH_SEED=1). The loader builds the demo's
training batches (preprocessing, crops and the augmentation list) from generated heads:
`cache=memory` (CacheDataset: preprocessing once) against `cache=none` (every epoch again).
"""

from __future__ import annotations

import os
import tempfile
import time
from pathlib import Path

import torch

from medseg.data.mri_transforms import make_dataset, make_loader
from medseg.data.nifti_pairs import find_pairs
from medseg.data.synthetic.smalabeller import BrainSettings, generate_brain_dataset
from medseg.engine.precision import resolve_precision
from medseg.models.unet import UNet
from medseg.tasks.smalabeller import SegmentationLoss, to_slices

QUICK = True
VOLUMES, DEPTH, SIZE = 4, 16, 48  # batch 2 x 2 crops
# The original's widths (64-1024, 31 M parameters) only with SMALABELLER_BENCH_SEED=1: on a
# shared two-core CPU one of its steps took minutes.
LAYOUTS = {"demo_8_64": ([8, 16, 32, 64], 6),
           **({"seed_64_1024": (None, 1)} if os.environ.get("SMALABELLER_BENCH_SEED") else {})}


def training_rate(channels, mode: str, steps: int) -> float:
    torch.manual_seed(0)
    precision = resolve_precision(mode, torch.device("cpu"))
    model = UNet(2, 1, 1, channels=channels, dropout=0.1)
    loss = SegmentationLoss("combination")
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
    image = torch.rand(VOLUMES, 1, SIZE, SIZE, DEPTH)
    label = (torch.rand(VOLUMES, 1, SIZE, SIZE, DEPTH) > 0.99).float()

    def step():
        with precision.autocast():
            logits = model(to_slices(image))
        total, _ = loss(logits, to_slices(label))
        optimizer.zero_grad(set_to_none=True)
        total.backward()
        optimizer.step()

    step()
    started = time.perf_counter()
    for _ in range(steps):
        step()
    return steps * VOLUMES * DEPTH / (time.perf_counter() - started)


def loader_rate(folder: Path, cache: str, epochs: int = 2) -> float:
    pairs = find_pairs(folder / "imagesTr_resampled", folder / "labelsTr_resampled")
    started = time.perf_counter()
    dataset = make_dataset([p.as_dict() for p in pairs], (1.0, 1.0, 1.0), train=True,
                           augment=True, crop_size=(SIZE, SIZE, DEPTH), crops_per_volume=2,
                           cache=cache)
    loader = make_loader(dataset, batch_size=2, shuffle=True, num_workers=0, seed=0)
    slices = 0
    for epoch in range(epochs):
        loader.set_epoch(epoch)
        for batch in loader:
            slices += batch["image"].shape[0] * batch["image"].shape[-1]
    return slices / (time.perf_counter() - started)


def run() -> dict:
    results: dict = {"load_average_1min_at_start": round(os.getloadavg()[0], 2)}
    for name, (channels, steps) in LAYOUTS.items():
        for mode in ("none", "bf16"):
            label = "fp32" if mode == "none" else mode
            results[f"train_slices_per_s_{name}_{label}"] = round(
                training_rate(channels, mode, steps), 1)
    with tempfile.TemporaryDirectory() as tmp:
        folder = generate_brain_dataset(Path(tmp) / "data", num_cases=10,
                                        settings=BrainSettings((48, 48), (20, 28), (1.0, 1.5, 2.0),
                                                               0.03, 0))
        for cache in ("memory", "none"):
            results[f"loader_slices_per_s_cache_{cache}"] = round(loader_rate(folder, cache), 1)
    consumed = results["train_slices_per_s_demo_8_64_fp32"]
    results["loader_to_model_ratio_cache_memory"] = round(
        results["loader_slices_per_s_cache_memory"] / consumed, 2)
    results["loader_to_model_ratio_cache_none"] = round(
        results["loader_slices_per_s_cache_none"] / consumed, 2)
    results["note"] = ("loader rate includes building the dataset (the cache's one-off "
                       "preprocessing) over 2 epochs; one process, num_workers=0")
    return results
