"""SADAAN learning on the high-absence data (`high_absence`: 70 % of cases miss a structure)
on CPU: test Dice both ways (absent structures gated, present only), presence accuracy and
balanced accuracy, per structure, with the wall time.

The full run (40 epochs at 64x64x32 on 160 training cases, like `sadaan_quality`) takes about
an hour on 2 CPU cores. ``SADAAN_QUALITY_EPOCHS``, ``SADAAN_QUALITY_SIZE`` (``H,W,D``) and
``SADAAN_QUALITY_TRAIN`` (training cases) and ``SADAAN_QUALITY_EVAL`` (validation and test
cases each) shorten it; the result records what was run.
"""

from __future__ import annotations

import os

from benchmarks.bench_sadaan_quality import TRAINING, per_structure, train_and_score

QUICK = False
TARGETS = {"test_dice_mean": ">= 0.85", "test_presence_balanced_accuracy": ">= 0.95"}


def settings() -> tuple[list[str], list[str]]:
    """The generate_data and training updates, with the environment's shortening applied."""
    epochs = int(os.environ.get("SADAAN_QUALITY_EPOCHS", "40"))
    size = [int(v) for v in os.environ.get("SADAAN_QUALITY_SIZE", "64,64,32").split(",")]
    train = int(os.environ.get("SADAAN_QUALITY_TRAIN", "160"))
    held_out = int(os.environ.get("SADAAN_QUALITY_EVAL", "32"))
    size_text = "[" + ",".join(map(str, size)) + "]"
    generate = ["high_absence", f"synthetic.image_size={size_text}", f"synthetic.num_train={train}",
                f"synthetic.num_val={held_out}", f"synthetic.num_test={held_out}"]
    training = [u for u in TRAINING if not u.startswith(("training.image_size=",
                                                         "training.num_epochs="))]
    training += [f"training.image_size={size_text}", f"training.num_epochs={epochs}"]
    return generate, training


def run(extra: tuple[str, ...] = ()) -> dict:
    """The benchmark, with ``extra`` training updates (the balanced variant's)."""
    generate, training = settings()
    training = [*training, *extra]
    measured = train_and_score(generate, training)
    test = measured["test"]
    names = ("dice", "dice_present", "presence_accuracy", "presence_balanced_accuracy")
    return {
        "commands": ["python experiments/sadaan.py generate_data with dataset_path=DATA "
                     + " ".join(generate),
                     "python experiments/sadaan.py with dataset_path=DATA " + " ".join(training)],
        "wall_s": measured["wall_s"], "result": measured["result"],
        **{f"test_{name}_mean": test.get(name) for name in names},
        **{f"test_{name}_per_structure": per_structure(test, name, names[names.index(name) + 1:])
           for name in names},
        "val_curves_per_epoch": measured["curves"],
        "targets": TARGETS,
    }
