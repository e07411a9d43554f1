"""A small experiment for the tracking tests: it records exactly what its config asks for
(metric points with known values, PNG artifacts, output, a large info entry, a failure), in
a second instead of a training run's minutes, through the same MedsegExperiment, tracking
ingredient and reporter as the pipelines.

    python tests/tracking/metrics_experiment.py with points=500 tracking.observer=mongo
"""

import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))

from ingredients.experiment import MedsegExperiment  # noqa: E402
from ingredients.tracking import SacredReporter, TrackingIngredient  # noqa: E402

tracking = TrackingIngredient()
ex = MedsegExperiment("metrics_probe", ingredients=[tracking])

# The smallest valid PNG: a 1x1 transparent pixel.
PNG = bytes.fromhex("89504e470d0a1a0a0000000d4948445200000001000000010806000000"
                    "1f15c4890000000d49444154789c6360000002000154a24f5d0000000049454e44ae426082")


def value(name: str, step: int) -> float:
    """What metric ``name`` logs at ``step``, so a test can check every stored point."""
    return step * 0.5 + len(name)


@ex.config
def config():
    points = 20  # points logged per metric
    metrics = ["loss", "score"]  # metric names
    pause_s = 0.0  # pause after each point
    artifacts = 2  # PNG artifacts added (figure_0.png, ...)
    output_lines = 0  # lines printed
    progress_updates = 0  # carriage-return updates of one progress line
    info_kb = 0  # size of the info entry "big" (0: none)
    missing_artifact = False  # add an artifact whose file does not exist
    fail_at = None  # raise RuntimeError after this many points
    interrupt_at = None  # raise KeyboardInterrupt after this many points


@ex.automain
def main(_run, points, metrics, pause_s, artifacts, output_lines, progress_updates, info_kb,
         missing_artifact, fail_at, interrupt_at):
    reporter = SacredReporter(_run)
    folder = os.path.abspath(f"probe_files_{os.getpid()}")
    os.makedirs(folder, exist_ok=True)
    for index in range(artifacts):
        path = os.path.join(folder, f"figure_{index}.png")
        with open(path, "wb") as handle:
            handle.write(PNG)
        reporter.add_artifact(path)
    if missing_artifact:
        reporter.add_artifact(os.path.join(folder, "never_written.png"))
    for line in range(output_lines):
        print(f"line {line:07d} " + "x" * 90)
    for update in range(progress_updates):
        print(f"\rprogress {update + 1}/{progress_updates}", end="", flush=True)
    if progress_updates:
        print()
    if info_kb:
        reporter.set_info("big", ["y" * 1000] * info_kb)
    reporter.set_info("best_epoch", points - 1)
    for step in range(points):
        for name in metrics:
            reporter.log_scalar(name, value(name, step), step)
        if fail_at is not None and step + 1 == fail_at:
            raise RuntimeError(f"failing on purpose after {fail_at} points")
        if interrupt_at is not None and step + 1 == interrupt_at:
            raise KeyboardInterrupt
        if pause_s:
            time.sleep(pause_s)
    return {"points": points}
