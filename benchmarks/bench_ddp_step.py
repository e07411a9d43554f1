"""SADAAN training step in one process and in two torchrun processes (gloo, CPU): seconds per
optimizer step at batch 4 of 64x64x32 (two ranks: 2 cases each), one thread per process
(``OMP_NUM_THREADS=1``, what torchrun sets). On a CPU whose cores the ranks share with other
work this is a correctness run of the distributed path, not a speed-up; the load average is
recorded beside the figures."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

QUICK = False
ROOT = Path(__file__).resolve().parents[1]
SIZE, BATCH, CASES, EPOCHS = [64, 64, 32], 4, 16, 2


def _train(work: Path, launcher: list[str], name: str) -> dict:
    runs = work / f"runs_{name}"
    subprocess.run([*launcher, str(ROOT / "experiments" / "sadaan.py"), "with", "seed=1",
                    f"dataset_path={work / 'data'}", f"training.image_size={SIZE}".replace(" ", ""),
                    f"training.num_epochs={EPOCHS}", f"training.batch_size={BATCH}",
                    "training.gradient_accumulation_steps=1", "training.num_workers=0",
                    "training.warmup_epochs=0", "augmentation.enabled=False",
                    "logging.progress_bar=False", "checkpoint.save_frequency=0",
                    f"checkpoint.save_dir={work}/ck_{name}", "tracking.observer=file",
                    f"tracking.file_dir={runs}", "eval_split=val"],
                   check=True, capture_output=True, text=True, timeout=1200,
                   env={**os.environ, "OMP_NUM_THREADS": "1"})
    metrics = json.loads((runs / "1" / "metrics.json").read_text())
    steps = CASES // BATCH
    train_s = metrics["train_time_s"]["values"][-1]  # the last epoch: no first-call warm-up
    return {"s_per_step": round(train_s / steps, 3), "train_time_s": round(train_s, 2),
            "val_time_s": round(metrics["val_time_s"]["values"][-1], 2),
            "train_loss_epoch": metrics["train_loss_epoch"]["values"]}


def run() -> dict:
    with tempfile.TemporaryDirectory() as folder:
        work = Path(folder)
        subprocess.run([sys.executable, str(ROOT / "experiments" / "sadaan.py"), "generate_data",
                        "with", f"dataset_path={work / 'data'}", f"synthetic.num_train={CASES}",
                        "synthetic.num_val=4", "synthetic.num_test=0",
                        f"synthetic.image_size={SIZE}".replace(" ", ""), "tracking.observer=none"],
                       check=True, capture_output=True, text=True, timeout=600)
        one = _train(work, [sys.executable], "one")
        two = _train(work, [sys.executable, "-m", "torch.distributed.run", "--standalone",
                            "--nproc_per_node=2"], "two")
    return {"batch_size": BATCH, "image_size": SIZE, "steps_per_epoch": CASES // BATCH,
            "one_process": one, "two_ranks_gloo": two,
            "load_average_1min_after": round(os.getloadavg()[0], 1)}
