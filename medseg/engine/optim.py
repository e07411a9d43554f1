"""Optimizers by the names the seeds use."""

from __future__ import annotations

from collections.abc import Iterable

import torch


OPTIMIZERS = ("adam", "adamw", "sgd")


def build_optimizer(parameters: Iterable[torch.nn.Parameter], name: str, *, learning_rate: float,
                    weight_decay: float = 0.0, momentum: float = 0.9) -> torch.optim.Optimizer:
    """``adam`` (L2 penalty in the gradient), ``adamw`` (decoupled decay) or ``sgd`` (Nesterov)."""
    if name == "adam":
        return torch.optim.Adam(parameters, lr=learning_rate, weight_decay=weight_decay)
    if name == "adamw":
        return torch.optim.AdamW(parameters, lr=learning_rate, weight_decay=weight_decay)
    if name == "sgd":
        return torch.optim.SGD(parameters, lr=learning_rate, weight_decay=weight_decay,
                               momentum=momentum, nesterov=momentum > 0)
    raise ValueError(f"name must be one of {', '.join(map(repr, OPTIMIZERS))}, got {name!r}")
