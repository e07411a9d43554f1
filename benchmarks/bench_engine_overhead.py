"""The engine's training step against a bare PyTorch loop of the same model, loss, optimizer
and batch (SADAAN, batch 4 of 64x64x32, 13 structures), timed in one process in interleaved
rounds so that machine load hits both alike: median and spread of the per-round ratio.

Each round times ``STEPS`` steps of each loop, the order alternating between rounds (bare
then suite, suite then bare, ...) so that a load that rises or falls through a round also
cancels. The suite's steps are those of :meth:`Trainer._train_epoch` with the settings the
SADAAN recipes use (gradient clipping, loss logging every 10 steps, a progress bar, memory
clean-up every 10 steps), so everything the engine records per step is included.
"""

from __future__ import annotations

import statistics
import time

import torch

from medseg.engine.precision import resolve_precision
from medseg.engine.reporting import RecordingReporter
from medseg.engine.schedulers import LRSchedule
from medseg.engine.trainer import Trainer, TrainerSettings
from medseg.losses.sadaan import SADAANLoss
from medseg.models.sadaan import SADAAN
from medseg.tasks.sadaan import SADAANTask

BATCH, SIZE, STRUCTURES = 4, (64, 64, 32), 13
WARMUP, STEPS, ROUNDS = 2, 3, 8
CLIP = 0.5


class _Repeat:
    """A loader that yields the same batch ``steps`` times (no data loading in either loop)."""

    def __init__(self, batch: dict, steps: int) -> None:
        self.batch, self.steps = batch, steps

    def __iter__(self):
        return (self.batch for _ in range(self.steps))

    def __len__(self) -> int:
        return self.steps


def measure(batch: int = BATCH, size: tuple[int, ...] = SIZE, structures: int = STRUCTURES,
            steps: int = STEPS, rounds: int = ROUNDS, warmup: int = WARMUP,
            base_channels: int | None = None) -> dict:
    torch.manual_seed(0)
    model = SADAAN(num_structures=structures,
                   **({} if base_channels is None else {"base_channels": base_channels}))
    loss = SADAANLoss()
    masks = (torch.rand(batch, structures, *size) > 0.97).float()
    data = {"image": torch.randn(batch, 1, *size), "mask": masks,
            "presence": masks.flatten(2).amax(2)}
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-4)

    def bare(n: int) -> None:
        model.train()
        for _ in range(n):
            output = model(data["image"])
            total, _ = loss(output, data["mask"], data["presence"])
            optimizer.zero_grad(set_to_none=True)
            total.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), CLIP)
            optimizer.step()

    device = torch.device("cpu")
    loader = _Repeat(data, steps)
    reporter = RecordingReporter()
    trainer = Trainer(model, SADAANTask(loss, [str(i) for i in range(structures)]), optimizer,
                      LRSchedule(optimizer, "none", num_epochs=1, steps_per_epoch=steps),
                      loader, [], device=device, precision=resolve_precision("none", device),
                      settings=TrainerSettings(num_epochs=rounds + 1, gradient_clip_norm=CLIP,
                                               log_frequency=10, progress_bar=True,
                                               monitor="val_loss", memory_cleanup_frequency=10),
                      reporter=reporter)
    epochs = iter(range(1, rounds + 2))

    def suite(n: int) -> None:
        loader.steps = n
        trainer._train_epoch(next(epochs))

    def timed(run, n: int) -> float:
        started = time.perf_counter()
        run(n)
        return (time.perf_counter() - started) / n

    bare(warmup)
    suite(warmup)
    bare_times, suite_times = [], []
    for index in range(rounds):
        order = ((bare, bare_times), (suite, suite_times))
        for run, times in order if index % 2 == 0 else order[::-1]:
            times.append(timed(run, steps))
    ratios = sorted(s / b for s, b in zip(suite_times, bare_times))
    quartiles = statistics.quantiles(ratios, n=4) if len(ratios) > 1 else ratios * 3
    return {
        "batch": batch, "image_size": list(size), "structures": structures,
        "rounds": rounds, "steps_per_round": steps,
        "bare_s_per_step_median": round(statistics.median(bare_times), 4),
        "suite_s_per_step_median": round(statistics.median(suite_times), 4),
        "suite_over_bare_median": round(statistics.median(ratios), 4),
        "suite_over_bare_quartiles": [round(quartiles[0], 4), round(quartiles[2], 4)],
        "suite_over_bare_range": [round(ratios[0], 4), round(ratios[-1], 4)],
        "suite_over_bare_of_medians": round(statistics.median(suite_times)
                                            / statistics.median(bare_times), 4),
        "suite_steps_logged": len(reporter.values("train_loss")),
        "optimizer_steps": {"suite": trainer.global_step},
    }


def run() -> dict:
    return {**measure(), "target": "suite_over_bare_median <= 1.02"}
