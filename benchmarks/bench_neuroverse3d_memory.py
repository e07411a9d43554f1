"""Neuroverse3D memory and time against context size: peak RSS of one training step and of one
inference at L = 2, 4, 8, 16 with gs = 2 (each in a fresh process), and seconds per training
step of the small and the default (original) channels.

    OMP_NUM_THREADS=1 python -m benchmarks neuroverse3d_memory

``step_mb`` is the peak RSS of the measured call above the RSS just before it (model, data and
the Python/torch baseline excluded): what the mini-context scheme keeps flat. The context
tensors themselves (L pairs on the CPU) are allocated before the call and grow with L by
``2 * L * prod(size) * 4`` bytes.
"""

from __future__ import annotations

import json
import subprocess
import sys

SIZE = [48, 48, 48]
SMALL = [8, 16, 32]
CONTEXTS = [2, 4, 8, 16]
GS = 2

WORKER = r"""
import json, resource, sys, time
import torch
from medseg.models.neuroverse3d import Neuroverse3D
from medseg.losses.neuroverse3d import SmoothL3L1Loss

mode, L, gs, size, channels, repeats = (sys.argv[1], int(sys.argv[2]), int(sys.argv[3]),
                                        json.loads(sys.argv[4]), json.loads(sys.argv[5]),
                                        int(sys.argv[6]))
torch.manual_seed(0)
net = Neuroverse3D(channels=channels, gs=gs)
loss = SmoothL3L1Loss()
opt = torch.optim.Adam(net.parameters(), lr=1e-4)
target = torch.rand(1, 1, *size)
ctx_in = torch.rand(1, L, 1, *size)
ctx_out = (torch.rand(1, L, 1, *size) > 0.8).float()
truth = ctx_out[:, 0]

def step():
    if mode == "train":
        net.train()
        total, _ = loss(net(target, ctx_in, ctx_out, gs=gs), truth)
        total.backward()
        opt.step()
        opt.zero_grad(set_to_none=False)
    else:
        net.eval()
        with torch.no_grad():
            net(target, ctx_in, ctx_out, gs=gs)

if mode == "train":  # optimizer state and gradient buffers exist before measuring
    step()
def rss_mb():
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
before = rss_mb()
peak_before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
times = []
for _ in range(repeats):
    t = time.perf_counter(); step(); times.append(time.perf_counter() - t)
peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
print(json.dumps({"peak_rss_mb": round(peak, 1), "step_mb": round(peak - max(before, 0), 1),
                  "peak_before_mb": round(peak_before, 1), "seconds": round(min(times), 3)}))
"""


def _measure(mode: str, L: int, gs: int, size, channels, repeats: int = 1) -> dict:
    out = subprocess.run([sys.executable, "-c", WORKER, mode, str(L), str(gs), json.dumps(size),
                          json.dumps(channels), str(repeats)],
                         capture_output=True, text=True, check=True, timeout=1800)
    return json.loads(out.stdout.strip().splitlines()[-1])


def run() -> dict:
    result: dict = {"image_size": SIZE, "channels": SMALL, "gs": GS}
    for mode in ("train", "inference"):
        rows = {L: _measure(mode, L, GS, SIZE, SMALL) for L in CONTEXTS}
        result[mode] = rows
        result[f"{mode}_step_mb_ratio_L16_over_L2"] = round(rows[16]["step_mb"] / rows[2]["step_mb"], 3)
        result[f"{mode}_peak_rss_ratio_L16_over_L2"] = round(
            rows[16]["peak_rss_mb"] / rows[2]["peak_rss_mb"], 3)
    # Seconds per training step, stage 1 (L = 3, gs = 3: one group), at 32^3.
    result["seconds_per_step_L3_32cubed"] = {
        "small_8_16_32": _measure("train", 3, 3, [32, 32, 32], SMALL, repeats=3)["seconds"],
        "default_32_64_128_256_512": _measure("train", 3, 3, [32, 32, 32],
                                              [32, 64, 128, 256, 512], repeats=2)["seconds"],
    }
    result["target"] = "peak memory at L=16 at most 1.15x the L=2 figure"
    return result
