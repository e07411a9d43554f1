"""A tiny 2D segmentation problem for exercising the engine in seconds."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from monai.transforms import Compose, RandGaussianNoised
from torch import nn
from torch.utils.data import Dataset

from medseg.data.loaders import EpochLoader
from medseg.engine.checkpoint import CheckpointManager
from medseg.engine.optim import build_optimizer
from medseg.engine.precision import resolve_precision
from medseg.engine.reporting import RecordingReporter
from medseg.engine.schedulers import LRSchedule
from medseg.engine.trainer import StepOutput, Trainer, TrainerSettings


class BlobDataset(Dataset):
    """Bright discs of random centre and radius on noise; the mask is the disc."""

    def __init__(self, count: int, size: int = 16, seed: int = 0, augment: bool = True) -> None:
        rng = np.random.default_rng(seed)
        yy, xx = np.mgrid[:size, :size]
        self.items = []
        for _ in range(count):
            cy, cx = rng.uniform(4, size - 4, 2)
            radius = rng.uniform(2, 4)
            mask = ((yy - cy) ** 2 + (xx - cx) ** 2 <= radius ** 2).astype(np.float32)
            image = mask * 2.0 + rng.normal(0, 0.5, mask.shape).astype(np.float32)
            self.items.append({"image": image[None], "mask": mask[None]})
        self.transform = Compose([RandGaussianNoised(keys="image", prob=1.0, std=0.1)]) if augment else None

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, index: int):
        item = {k: v.copy() for k, v in self.items[index].items()}
        if self.transform is not None:
            item = self.transform(item)
        return {k: torch.as_tensor(np.asarray(v), dtype=torch.float32) for k, v in item.items()}


class TinyNet(nn.Module):
    def __init__(self, dropout: float = 0.1) -> None:
        super().__init__()
        self.body = nn.Sequential(nn.Conv2d(1, 8, 3, padding=1), nn.ReLU(), nn.Dropout2d(dropout),
                                  nn.Conv2d(8, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 1, 1))

    def forward(self, x):
        return self.body(x)


class BlobTask:
    """BCE training; validation reports loss and Dice."""

    def __init__(self) -> None:
        self.loss = nn.BCEWithLogitsLoss()

    def metric_names(self):
        return ["loss", "dice"]

    def training_step(self, model, batch, device):
        image, mask = batch["image"].to(device), batch["mask"].to(device)
        logits = model(image)
        loss = self.loss(logits.float(), mask)
        return StepOutput(loss, {"bce": loss.detach()}, image.shape[0])

    def validate(self, model, loader, device, precision):
        losses, intersection, total = [], 0.0, 0.0
        for batch in loader:
            image, mask = batch["image"].to(device), batch["mask"].to(device)
            with precision.autocast():
                logits = model(image).float()
            losses.append(float(self.loss(logits, mask)))
            pred = (logits > 0).float()
            intersection += float((pred * mask).sum())
            total += float(pred.sum() + mask.sum())
        return {"loss": float(np.mean(losses)), "dice": 2 * intersection / max(total, 1e-6)}


@pytest.fixture
def make_trainer(tmp_path):
    """Build a Trainer on the blob problem; keyword overrides go to TrainerSettings, the
    schedule, the optimizer or the loaders."""

    def build(*, seed: int = 0, scheduler: str = "none", learning_rate: float = 0.05,
              num_workers: int = 0, batch_size: int = 4, train_cases: int = 32,
              checkpoint_dir=None, checkpoint_options=None, task=None, model=None,
              warmup_epochs: float = 0, **settings):
        torch.manual_seed(seed)
        model = model or TinyNet()
        train = EpochLoader(BlobDataset(train_cases, seed=1), batch_size=batch_size, shuffle=True,
                            num_workers=num_workers, seed=seed)
        val = EpochLoader(BlobDataset(8, seed=2, augment=False), batch_size=4, shuffle=False,
                          num_workers=0, seed=seed)
        optimizer = build_optimizer(model.parameters(), "adam", learning_rate=learning_rate)
        options = {"num_epochs": 3, "log_frequency": 1, "progress_bar": False,
                   "monitor": "val_dice", "monitor_mode": "max", **settings}
        trainer_settings = TrainerSettings(**options)
        steps = -(-len(train) // trainer_settings.gradient_accumulation_steps)
        schedule = LRSchedule(optimizer, scheduler, num_epochs=trainer_settings.num_epochs,
                              steps_per_epoch=steps, warmup_epochs=warmup_epochs,
                              monitor_mode=trainer_settings.monitor_mode)
        checkpoints = (CheckpointManager(checkpoint_dir, **(checkpoint_options or {}))
                       if checkpoint_dir is not None else None)
        device = torch.device("cpu")
        return Trainer(model, task or BlobTask(), optimizer, schedule, train, val, device=device,
                       precision=resolve_precision("none", device), settings=trainer_settings,
                       reporter=RecordingReporter(), checkpoints=checkpoints,
                       config={"note": "test"})

    return build
