"""The engine's training step against a bare PyTorch loop of the same model, loss, optimizer
and batch (SADAAN, batch 4 of 64x64x32, 13 structures), timed in one process in interleaved
rounds so that machine load hits both alike: median and spread of the per-round ratio.

Each round times ``STEPS`` steps of each loop, within one training epoch of the suite, the
order alternating between rounds (bare then suite, suite then bare, ...) so that a load that
rises or falls through a round also cancels. The suite's steps are those of
:meth:`Trainer._train_epoch` with the settings the SADAAN recipes use (gradient clipping, loss
logging every 10 steps, a progress bar, memory clean-up every 10 steps), so everything the
engine does per step is included.

Both the wall clock and the process's CPU time are reported: on a machine shared with other
work (2 cores, load 5-10 here) the wall-clock ratio of a round swings by +-20 % or more,
while the CPU time the process spent is what the engine adds to (run it with
``OMP_NUM_THREADS=1`` so that CPU time is one core's).

``ENGINE_OVERHEAD_SIZE`` (``H,W,D``), ``ENGINE_OVERHEAD_BATCH``, ``ENGINE_OVERHEAD_ROUNDS`` and
``ENGINE_OVERHEAD_STEPS`` change the shape and length (a smaller step makes the engine's
fixed per-step cost a larger share of it).
"""

from __future__ import annotations

import os
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
QUICK = False  # about 10 minutes at the default shape on 2 shared cores
WARMUP, STEPS, ROUNDS = 2, 4, 10  # one epoch of 40 steps, as 160 cases at batch 4
CLIP = 0.5


class _Rounds:
    """The suite's training loader: one epoch of ``rounds * steps`` copies of one batch, that
    times each round of ``steps`` suite steps and runs a timed round of the bare loop between
    them (before the suite's round on odd rounds), so both loops meet the same load; the
    engine's per-epoch work (the progress bar, the first memory clean-up of an epoch) falls as
    in a real epoch."""

    def __init__(self, batch: dict, steps: int, rounds: int, bare) -> None:
        self.batch, self.steps, self.rounds, self.bare = batch, steps, rounds, bare
        self.times: dict[str, list[tuple[float, float]]] = {"bare": [], "suite": []}

    def __len__(self) -> int:
        return self.steps * self.rounds

    def __iter__(self):
        for index in range(self.rounds):
            if index % 2:
                self.times["bare"].append(_timed(self.bare, self.steps))
            wall, cpu = time.perf_counter(), time.process_time()
            for _ in range(self.steps):
                yield self.batch  # the trainer asks for the next one when this step is done
            self.times["suite"].append(((time.perf_counter() - wall) / self.steps,
                                        (time.process_time() - cpu) / self.steps))
            if not index % 2:
                self.times["bare"].append(_timed(self.bare, self.steps))


def _timed(run, n: int) -> tuple[float, float]:
    """Seconds per step of ``run(n)``: wall clock and this process's CPU time."""
    wall, cpu = time.perf_counter(), time.process_time()
    run(n)
    return (time.perf_counter() - wall) / n, (time.process_time() - cpu) / n


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
    warmup_loader = [data] * warmup
    loader = _Rounds(data, steps, rounds, bare)
    reporter = RecordingReporter()
    trainer = Trainer(model, SADAANTask(loss, [str(i) for i in range(structures)]), optimizer,
                      LRSchedule(optimizer, "none", num_epochs=2, steps_per_epoch=len(loader)),
                      warmup_loader, [], device=device,
                      precision=resolve_precision("none", device),
                      settings=TrainerSettings(num_epochs=2, gradient_clip_norm=CLIP,
                                               log_frequency=10, progress_bar=True,
                                               monitor="val_loss", memory_cleanup_frequency=10),
                      reporter=reporter)
    bare(warmup)
    trainer._train_epoch(1)
    trainer.train_loader = loader
    trainer._train_epoch(2)

    result = {"batch": batch, "image_size": list(size), "structures": structures,
              "rounds": rounds, "steps_per_round": steps}
    for clock, column in (("wall", 0), ("cpu", 1)):
        bare_clock = [t[column] for t in loader.times["bare"]]
        suite_clock = [t[column] for t in loader.times["suite"]]
        ratios = sorted(s / b for s, b in zip(suite_clock, bare_clock))
        quartiles = statistics.quantiles(ratios, n=4) if len(ratios) > 1 else ratios * 3
        result[clock] = {
            "bare_s_per_step_median": round(statistics.median(bare_clock), 4),
            "suite_s_per_step_median": round(statistics.median(suite_clock), 4),
            "suite_over_bare_median": round(statistics.median(ratios), 4),
            "suite_over_bare_quartiles": [round(quartiles[0], 4), round(quartiles[2], 4)],
            "suite_over_bare_range": [round(ratios[0], 4), round(ratios[-1], 4)],
            "suite_over_bare_of_totals": round(sum(suite_clock) / sum(bare_clock), 4),
        }
    return {**result, "suite_steps_logged": len(reporter.values("train_loss")),
            "optimizer_steps": {"suite": trainer.global_step}}


def run() -> dict:
    environ = os.environ.get
    size_text = environ("ENGINE_OVERHEAD_SIZE", ",".join(map(str, SIZE)))
    size = tuple(int(v) for v in size_text.split(","))
    result = measure(batch=int(environ("ENGINE_OVERHEAD_BATCH", BATCH)), size=size,
                     rounds=int(environ("ENGINE_OVERHEAD_ROUNDS", ROUNDS)),
                     steps=int(environ("ENGINE_OVERHEAD_STEPS", STEPS)))
    settings = " ".join(f"{k}={v}" for k, v in sorted(os.environ.items())
                        if k.startswith("ENGINE_OVERHEAD_") or k == "OMP_NUM_THREADS")
    return {"command": f"{settings} python -m benchmarks engine_overhead".strip(), **result,
            "threads": torch.get_num_threads(),
            "load_average_after": [round(v, 1) for v in os.getloadavg()],
            "target": "suite_over_bare_median <= 1.02"}
