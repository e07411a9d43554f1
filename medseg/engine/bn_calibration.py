"""BatchNorm calibration: running statistics recomputed from a few training batches before
each validation.

Running averages kept during training mix statistics of many weight states and, with small or
heavily augmented batches, are noisy. Calibration resets them, forwards ``warmup_batches``
training batches (no gradients, fp32, in micro-batches of ``slice_batch`` samples so memory
stays bounded) with ``momentum=None`` so each BatchNorm keeps the plain average of the
micro-batch statistics, then restores the momentum. Validation then runs in eval mode with
those statistics, and the checkpoint written after it holds them.

(The original set the running buffers to ``None`` before validation, which makes PyTorch use
each validation batch's own statistics and leaves the checkpoints without running statistics;
this module does what its documentation intended.)
"""

from __future__ import annotations

import itertools
from collections.abc import Callable, Iterable
from typing import Any

import torch
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm

from medseg.engine.trainer import Callback, Trainer


def batchnorm_layers(model: nn.Module) -> list[_BatchNorm]:
    return [m for m in model.modules() if isinstance(m, _BatchNorm) and m.track_running_stats]


@torch.no_grad()
def calibrate_batchnorm(model: nn.Module, inputs: Iterable[torch.Tensor], *,
                        slice_batch: int) -> int:
    """Reset every BatchNorm's running statistics and recompute them from ``inputs`` (model
    inputs, split along the first axis into chunks of ``slice_batch``). Returns the number of
    samples forwarded. The model is left in train mode; gradients and autocast are off."""
    if slice_batch < 1:
        raise ValueError(f"slice_batch must be >= 1, got {slice_batch}")
    layers = batchnorm_layers(model)
    momenta = [layer.momentum for layer in layers]
    for layer in layers:
        layer.reset_running_stats()
        layer.momentum = None  # cumulative average over the calibration chunks
    model.train()
    seen = 0
    try:
        for batch in inputs:
            device_type = batch.device.type
            with torch.autocast(device_type=device_type, enabled=False):
                for chunk in torch.split(batch.float(), slice_batch):
                    model(chunk)
                    seen += chunk.shape[0]
    finally:
        for layer, momentum in zip(layers, momenta):
            layer.momentum = momentum
    return seen


class BatchNormCalibration(Callback):
    """Calibrates the model's BatchNorm layers on the first ``warmup_batches`` training
    batches before every validation. ``to_inputs(batch, device)`` turns a loader batch into
    the model's input (for a slice-wise 2D model: the slices of its volumes)."""

    def __init__(self, to_inputs: Callable[[Any, torch.device], torch.Tensor], *,
                 warmup_batches: int, slice_batch: int) -> None:
        if warmup_batches < 1:
            raise ValueError(f"warmup_batches must be >= 1, got {warmup_batches}")
        self.to_inputs = to_inputs
        self.warmup_batches = warmup_batches
        self.slice_batch = slice_batch
        self.samples_seen = 0

    def model_for_validation(self, trainer: Trainer, model: nn.Module) -> nn.Module:
        batches = itertools.islice(iter(trainer.train_loader), self.warmup_batches)
        inputs = (self.to_inputs(batch, trainer.device) for batch in batches)
        self.samples_seen = calibrate_batchnorm(model, inputs, slice_batch=self.slice_batch)
        return model
