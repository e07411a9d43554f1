"""SADAAN training step at batch 4 of 64x64x32 with 13 structures: seconds per step, peak RSS,
and the engine's overhead against a bare PyTorch loop over the same model and batch."""

from __future__ import annotations

import json
import statistics
import subprocess
import sys

BATCH, SIZE, STRUCTURES = 4, (64, 64, 32), 13
WARMUP, STEPS, ROUNDS = 2, 10, 4

WORKER = r"""
import json, resource, sys, time
import torch
from medseg.engine.precision import resolve_precision
from medseg.engine.reporting import RecordingReporter
from medseg.engine.schedulers import LRSchedule
from medseg.engine.trainer import Trainer, TrainerSettings
from medseg.losses.sadaan import SADAANLoss
from medseg.models.sadaan import SADAAN
from medseg.tasks.sadaan import SADAANTask

mode, batch, steps, warmup = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4])
size, structures = tuple(json.loads(sys.argv[5])), int(sys.argv[6])
torch.manual_seed(0)
model = SADAAN(num_structures=structures)
loss = SADAANLoss()
masks = (torch.rand(batch, structures, *size) > 0.97).float()
batch_data = {"image": torch.randn(batch, 1, *size), "mask": masks,
              "presence": masks.flatten(2).amax(2)}
optimizer = torch.optim.Adam(model.parameters(), lr=1e-4)
clip = 0.5

def bare(n):
    model.train()
    for _ in range(n):
        output = model(batch_data["image"])
        total, _ = loss(output, batch_data["mask"], batch_data["presence"])
        optimizer.zero_grad(set_to_none=True)
        total.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), clip)
        optimizer.step()

class Repeat:
    def __init__(self, n): self.n = n
    def __iter__(self): return (batch_data for _ in range(self.n))
    def __len__(self): return self.n

def suite(n):
    device = torch.device("cpu")
    trainer = Trainer(model, SADAANTask(loss, [str(i) for i in range(structures)]), optimizer,
                      LRSchedule(optimizer, "none", num_epochs=1, steps_per_epoch=n),
                      Repeat(n), [], device=device, precision=resolve_precision("none", device),
                      settings=TrainerSettings(num_epochs=1, gradient_clip_norm=clip,
                                               log_frequency=10, progress_bar=True,
                                               monitor="val_loss", memory_cleanup_frequency=10),
                      reporter=RecordingReporter())
    trainer._train_epoch(1)

run = bare if mode == "bare" else suite
run(warmup)
started = time.perf_counter()
run(steps)  # the suite runs them as one epoch: logging, checks and progress bar included
print(json.dumps({"s_per_step": (time.perf_counter() - started) / steps,
                  "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}))
"""


def measure(mode: str, steps: int) -> dict:
    completed = subprocess.run(
        [sys.executable, "-c", WORKER, mode, str(BATCH), str(steps), str(WARMUP),
         json.dumps(SIZE), str(STRUCTURES)], capture_output=True, text=True, check=True)
    return json.loads(completed.stdout.strip().splitlines()[-1])


def run() -> dict:
    """Alternate bare and suite rounds in fresh processes so drifting load hits both alike."""
    bare, suite, rss = [], [], {"bare": 0.0, "suite": 0.0}
    for _ in range(ROUNDS):
        for mode, times in (("bare", bare), ("suite", suite)):
            result = measure(mode, STEPS)
            times.append(result["s_per_step"])
            rss[mode] = max(rss[mode], result["peak_rss_mb"])
    bare_median, suite_median = statistics.median(bare), statistics.median(suite)
    return {
        "batch": BATCH, "image_size": list(SIZE), "structures": STRUCTURES,
        "rounds": ROUNDS, "steps_per_round": STEPS,
        "bare_s_per_step_median": round(bare_median, 3),
        "suite_s_per_step_median": round(suite_median, 3),
        "suite_over_bare": round(suite_median / bare_median, 3),
        "bare_s_per_step_min": round(min(bare), 3), "suite_s_per_step_min": round(min(suite), 3),
        "suite_over_bare_min": round(min(suite) / min(bare), 3),
        "peak_rss_mb": {k: round(v) for k, v in rss.items()},
        "targets": {"s_per_step": "< 10", "peak_rss_gib": "< 3", "overhead": "<= 1.05x"},
    }
