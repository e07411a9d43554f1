"""Lung tumour: training slices/s at 128x128 on CPU (fp32, bf16) and the slice loader's rate.

Training steps run the experiment's own pieces (Attention U-Net, DiceBCE loss, AdamW) on random
batches of 4 slices, for the seed's channel layout (64-512) and the `demo` layout (16-128).
The loader reads PNG slices converted from a generated MSD task, with the default training
augmentation, as an epoch of the training loader does.
"""

from __future__ import annotations

import os
import tempfile
import time
from pathlib import Path

import torch

from medseg.data.loaders import EpochLoader
from medseg.data.msd import ConversionSettings, convert_task
from medseg.data.png_slices import PNGSliceDataset, scan_slices
from medseg.data.slice_transforms import SliceAugmentation, slice_transforms
from medseg.data.synthetic.lung import generate_lung_task
from medseg.engine.precision import resolve_precision
from medseg.losses.dice_bce import SegmentationLoss
from medseg.models.attention_unet import AttentionUNet

QUICK = True
SIZE = 128
BATCH = 4
LAYOUTS = {"seed_64_512": [64, 128, 256, 512, 512], "demo_16_128": [16, 32, 64, 128, 128]}


def training_rate(channels: list[int], mode: str, steps: int) -> float:
    torch.manual_seed(0)
    device = torch.device("cpu")
    precision = resolve_precision(mode, device)
    model = AttentionUNet(2, 1, 2, channels)
    loss = SegmentationLoss("dice_bce")
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
    image = torch.rand(BATCH, 1, SIZE, SIZE)
    mask = (torch.rand(BATCH, 1, SIZE, SIZE) > 0.995).float()

    def step():
        with precision.autocast():
            total, _ = loss(model(image), mask)
        optimizer.zero_grad(set_to_none=True)
        total.backward()
        optimizer.step()

    step()  # warm-up: allocations and kernel selection
    started = time.perf_counter()
    for _ in range(steps):
        step()
    return steps * BATCH / (time.perf_counter() - started)


def loader_rate(folder: Path, workers: int) -> float:
    records = scan_slices(folder)
    dataset = PNGSliceDataset(records, slice_transforms((SIZE, SIZE), train=True,
                                                        augmentation=SliceAugmentation()))
    loader = EpochLoader(dataset, batch_size=BATCH, shuffle=True, num_workers=workers, seed=0)
    loader.set_epoch(1)
    started = time.perf_counter()
    count = sum(batch["image"].shape[0] for batch in loader)
    return count / (time.perf_counter() - started)


def run() -> dict:
    result: dict = {"image_size": SIZE, "batch_size": BATCH, "threads": torch.get_num_threads(),
                    # Other work on the machine slows every figure below; this says how much.
                    "load_average_1min_at_start": round(os.getloadavg()[0], 2),
                    "training_slices_per_s": {}, "loader_slices_per_s": {}}
    for name, channels in LAYOUTS.items():
        steps = 3 if channels[0] >= 64 else 8
        result["training_slices_per_s"][name] = {
            mode_name: round(training_rate(channels, mode, steps), 2)
            for mode_name, mode in (("fp32", "none"), ("bf16", "bf16"))}
    with tempfile.TemporaryDirectory() as tmp:
        task = generate_lung_task(Path(tmp) / "Task006_Lung", num_volumes=6,
                                  volume_size=(256, 256, 48), seed=0)
        convert_task(task, Path(tmp) / "dataset", ConversionSettings(empty_slice_fraction=0.2))
        result["loader_source"] = "PNG slices 256x256 resized to 128x128, default augmentation"
        result["loader_slices"] = len(scan_slices(Path(tmp) / "dataset"))
        for workers in (0, 2):
            result["loader_slices_per_s"][f"workers_{workers}"] = round(
                loader_rate(Path(tmp) / "dataset", workers), 1)
    return result
