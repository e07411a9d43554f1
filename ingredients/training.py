"""The ``training`` ingredient: the engine's settings (batch size, epochs, learning rate,
accumulation, clipping, warm-up, early stopping, precision, device) and the factories that
turn them into a device, loaders and a :class:`~medseg.engine.trainer.Trainer`."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch

from ingredients import distributed
from ingredients.fields import Field, FieldIngredient
from medseg import config as c
from medseg.data.loaders import EpochLoader
from medseg.engine.precision import MODES, Precision, resolve_device, resolve_precision
from medseg.engine.fit import LoaderSettings, build_loader
from medseg.engine.trainer import TrainerSettings
from medseg.errors import ConfigError

FIELDS = {
    "batch_size": Field(4, c.integer(minimum=1), "Training batch size"),
    "learning_rate": Field(5e-4, c.number(above=0), "Initial learning rate",
                           resume_may_change=True),
    "num_epochs": Field(100, c.integer(minimum=1), "Maximum training epochs",
                        resume_may_change=True),
    "early_stopping_patience": Field(20, c.integer(minimum=0),
                                     "Epochs without improvement of `monitor` before stopping (0: never)",
                                     resume_may_change=True),
    "gradient_clip_norm": Field(0.5, c.number(minimum=0), "Gradient clipping threshold (0: off)"),
    "num_workers": Field(2, c.integer(minimum=0), "DataLoader worker processes",
                         resume_may_change=True),
    "warmup_epochs": Field(5, c.number(minimum=0), "Linear learning-rate warm-up, in epochs"),
    "gradient_accumulation_steps": Field(2, c.integer(minimum=1), "Batches per optimizer update"),
    "memory_cleanup_frequency": Field(10, c.integer(minimum=0),
                                      "Optimizer steps between garbage collection and CUDA cache "
                                      "clearing (0: never)",
                                      resume_may_change=True),
    "mixed_precision": Field("auto", c.choice(*MODES),
                             "'auto' (fp16 on CUDA, fp32 on CPU), 'none', 'fp16' (CUDA), 'bf16'"),
    **distributed.FIELDS,
    "device": Field("auto", c.text(), "'auto', 'cpu', 'cuda' or 'cuda:N'",
                    resume_may_change=True),
    "monitor": Field("val_loss", c.text(),
                     "Validation metric for best checkpoint, early stopping and plateau schedule"),
    "monitor_mode": Field("min", c.choice("min", "max"), "Whether `monitor` improves downwards or upwards"),
}


def device_and_precision(device: str, mixed_precision: str) -> tuple[torch.device, Precision]:
    """The device ``training.device`` names and the precision ``training.mixed_precision``
    gives on it."""
    resolved = resolve_device(device)
    return resolved, resolve_precision(mixed_precision, resolved)


def make_loader(dataset, train: bool, batch_size: int, num_workers: int, _seed: int,
                device: str, val_batch_size: int = 1) -> EpochLoader:
    """A loader of ``dataset`` built as ``fit()`` builds them (for the evaluation commands),
    from ``training.batch_size``, ``.val_batch_size``, ``.num_workers`` and ``.device``; the
    seed is the one Sacred draws for this function from the run's."""
    settings = LoaderSettings(batch_size, val_batch_size, num_workers, _seed)
    return build_loader(dataset, settings, train=train, device=resolve_device(device))


class TrainingIngredient(FieldIngredient):
    def __init__(self, extra_fields: dict[str, Field] | None = None, **defaults: Any) -> None:
        super().__init__("training", {**FIELDS, **(extra_fields or {})}, defaults)

        # Captured in this order: each draws its loader seed from the run's in turn.
        #: ``device_and_precision()``: :func:`device_and_precision` from ``training.*``.
        self.device_and_precision = self.captured(device_and_precision)
        #: ``make_loader(dataset, train=...)``: :func:`make_loader` from ``training.*``.
        self.make_loader = self.captured(make_loader)

    def validate(self, config) -> None:
        super().validate(config)
        training = config[self.path]
        name = training["device"]
        try:
            device = resolve_device(name)
        except ValueError:
            if name.startswith("cuda") and not torch.cuda.is_available():
                raise ConfigError(f"{self.path}.device={name!r} but no CUDA device is "
                                  "available") from None
            raise ConfigError(f"{self.path}.device must be 'auto', 'cpu' or 'cuda[:N]', "
                              f"got {name!r}") from None
        if training["mixed_precision"] == "fp16" and device.type != "cuda":
            raise ConfigError(f"{self.path}.mixed_precision='fp16' needs a CUDA device "
                              f"({self.path}.device is {training['device']!r}); use 'bf16' on "
                              "CPU or 'none'")
        distributed.check_training(config, self.path, device)


def trainer_settings(config: Mapping[str, Any]) -> TrainerSettings:
    """The loop's settings from a run's ``training`` and ``logging`` entries."""
    training, logging_ = config["training"], config["logging"]
    return TrainerSettings(
        num_epochs=training["num_epochs"],
        gradient_accumulation_steps=training["gradient_accumulation_steps"],
        gradient_clip_norm=training["gradient_clip_norm"],
        early_stopping_patience=training["early_stopping_patience"],
        monitor=training["monitor"], monitor_mode=training["monitor_mode"],
        memory_cleanup_frequency=training["memory_cleanup_frequency"],
        log_frequency=logging_["log_frequency"], progress_bar=logging_["progress_bar"])


def loader_settings(config: Mapping[str, Any], seed: int) -> LoaderSettings:
    """Batch sizes and workers from a run's ``training`` entries; ``seed`` is the run's."""
    training = config["training"]
    return LoaderSettings(batch_size=training["batch_size"],
                          val_batch_size=training.get("val_batch_size", 1),
                          num_workers=training["num_workers"], seed=seed)


def image_size_field(default: list[int]) -> Field:
    """``training.image_size``: the size volumes (or slices) are resampled to before the model;
    as many entries as the data has spatial axes."""
    return Field(default, c.sequence(c.integer(minimum=16), length=len(default)),
                 "Image size the model sees; data of another size is resampled to it")


def val_batch_size_field(default: int) -> Field:
    """``training.val_batch_size``, for data whose validation cases all have one size."""
    return Field(default, c.integer(minimum=1), "Validation batch size", resume_may_change=True)


def ema_fields(*, enabled: bool = False, decay: float = 0.9999,
               ramp_steps: float = 2000) -> dict[str, Field]:
    """``training.ema*``: an exponential moving average of the weights
    (:class:`medseg.engine.ema.ModelEMA`) that validation, checkpoints and the result use."""
    return {
        "ema": Field(enabled, c.boolean(),
                     "Validate and keep an exponential moving average of the weights"),
        "ema_decay": Field(decay, c.number(above=0, maximum=0.999999),
                           "EMA decay per optimizer step"),
        "ema_ramp_steps": Field(ramp_steps, c.number(minimum=0),
                                "EMA ramp: decay * (1 - exp(-updates / ramp_steps)); 0: none"),
    }


OVERFIT_FIELDS = {
    "samples": Field(4, c.integer(minimum=1),
                     "overfit: cases trained on (with foreground, from different volumes)"),
    "steps": Field(300, c.integer(minimum=1), "overfit: most optimizer steps"),
    "learning_rate": Field(1e-3, c.number(above=0),
                           "overfit: learning rate (higher than training's: it memorises)"),
    "target_dice": Field(0.95, c.number(above=0, maximum=1), "overfit: Dice that counts as passed"),
}


class OverfitIngredient(FieldIngredient):
    """``overfit``: the settings of a pipeline's overfit sanity check (train on a few cases
    without augmentation; a working model, loss and data pipeline memorise them)."""

    def __init__(self, **defaults: Any) -> None:
        super().__init__("overfit", OVERFIT_FIELDS, defaults, resume_may_change=True)
