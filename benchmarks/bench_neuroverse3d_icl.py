"""Neuroverse3D in-context learning at the small CPU configuration: Dice on the held-out
synthetic dataset (never trained on) against context size L = 1, 2, 4, 8, beside the Dice of
segmenting every structure (what a model that ignores which structure the context shows could
reach at best), after a time-boxed training run.

    NEUROVERSE3D_ICL_MINUTES=7 nice -n 10 python -m benchmarks neuroverse3d_icl

Training uses the pipeline's episodes, task, loss, Adam and clipping (as `with cpu stage=2`,
contexts of 1-8), one structure per episode and no background in the class pool (so the
held-out evaluation, which asks for one structure, is the task trained on).
"""

from __future__ import annotations

import os
import tempfile
import time
from pathlib import Path

QUICK = False
SIZE = [24, 24, 24]
CHANNELS = [8, 16, 32]
CONTEXT_SIZES = [1, 2, 4, 8]


def run() -> dict:
    import torch

    from medseg.data.episodes import AugmentationSettings, EpisodeAugmentation, EpisodeSettings
    from medseg.data.nnunet import prepare_nnunet
    from medseg.data.synthetic.neuroverse3d import generate_neuroverse3d_data
    from medseg.losses.neuroverse3d import SmoothL3L1Loss
    from medseg.models.neuroverse3d import Neuroverse3D
    from medseg.tasks import neuroverse3d as nv

    minutes = float(os.environ.get("NEUROVERSE3D_ICL_MINUTES", "7"))
    torch.manual_seed(0)
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        generate_neuroverse3d_data(tmp / "raw", num_datasets=4, cases_per_dataset=12, seed=0)
        prepare_nnunet(tmp / "raw", tmp / "nn", dataset_name="x", modality="MRI")
        settings = EpisodeSettings(context_size=3, random_context_range=(1, 8),
                                   random_context_probability=0.5, max_classes=1,
                                   background_in_pool=False)
        trained_on = ["Dataset001", "Dataset002", "Dataset003"]
        data = nv.open_episode_data(tmp / "nn", image_size=SIZE, settings=settings,
                                    datasets=trained_on, episodes=100000, val_episodes=1,
                                    augmentation=EpisodeAugmentation(AugmentationSettings()))
        net = Neuroverse3D(channels=CHANNELS, gs=2)
        task = nv.Neuroverse3DTask(SmoothL3L1Loss(), gs=2, val_gs=4)
        optimizer = torch.optim.Adam(net.parameters(), lr=5e-4)
        train = data["train"]
        order = torch.randperm(len(train), generator=torch.Generator().manual_seed(0))
        started, steps, losses = time.perf_counter(), 0, []
        net.train()
        while time.perf_counter() - started < minutes * 60:
            item = train[int(order[steps % len(order)])]
            batch = {k: v[None] if torch.is_tensor(v) else v for k, v in item.items()}
            output = task.training_step(net, batch, torch.device("cpu"))
            output.loss.backward()
            torch.nn.utils.clip_grad_norm_(net.parameters(), 0.25)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            losses.append(float(output.loss.detach()))
            steps += 1
        train_s = time.perf_counter() - started
        cases = nv.open_evaluation_data(tmp / "nn", image_size=SIZE, eval_datasets=None,
                                        trained_on=trained_on)
        curve = nv.context_size_curve(net.eval(), cases, CONTEXT_SIZES, episodes=40, gs=4,
                                      device=torch.device("cpu"), seed=1)
        seen = nv.open_evaluation_data(tmp / "nn", image_size=SIZE, eval_datasets=trained_on,
                                       trained_on=trained_on)
        seen_curve = nv.context_size_curve(net, seen, CONTEXT_SIZES, episodes=20, gs=4,
                                           device=torch.device("cpu"), seed=2)
    window = max(1, steps // 10)
    return {"image_size": SIZE, "channels": CHANNELS, "train_minutes": round(train_s / 60, 2),
            "steps": steps, "seconds_per_step": round(train_s / max(steps, 1), 3),
            "loss_first_tenth": sum(losses[:window]) / window,
            "loss_last_tenth": sum(losses[-window:]) / window,
            "held_out_dataset": curve["cases"][0]["dataset"],
            "held_out": curve["summary"], "trained_datasets_validation_cases": seen_curve["summary"],
            "targets": {"dice_at_L8": 0.7, "rise_L1_to_L8": 0.1}}
