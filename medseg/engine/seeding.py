"""Random-number state: per-epoch seeds for data order and augmentation, and snapshots of
the global generators for checkpoints (in types that ``torch.load(weights_only=True)`` reads).
"""

from __future__ import annotations

import random
from typing import Any

import numpy as np
import torch


def epoch_seed(base_seed: int, epoch: int) -> int:
    """The seed of one epoch's data order and augmentation.

    Deriving it from ``(base_seed, epoch)`` rather than from the state left by earlier
    epochs is what lets a resumed run draw exactly the batches an uninterrupted run draws.
    """
    return int(np.random.SeedSequence([base_seed, epoch]).generate_state(1, np.uint32)[0])


def capture_rng_state() -> dict[str, Any]:
    numpy_state = np.random.get_state(legacy=False)
    return {
        "python": random.getstate(),
        "numpy": {
            "key": torch.from_numpy(numpy_state["state"]["key"].astype(np.int64)),
            "pos": int(numpy_state["state"]["pos"]),
            "has_gauss": int(numpy_state["has_gauss"]),
            "gauss": float(numpy_state["gauss"]),
        },
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
    }


def restore_rng_state(state: dict[str, Any]) -> None:
    random.setstate(_as_tuple(state["python"]))
    numpy_state = state["numpy"]
    np.random.set_state({
        "bit_generator": "MT19937",
        "state": {"key": numpy_state["key"].numpy().astype(np.uint32), "pos": numpy_state["pos"]},
        "has_gauss": numpy_state["has_gauss"],
        "gauss": numpy_state["gauss"],
    })
    torch.set_rng_state(state["torch"])
    if state["cuda"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def _as_tuple(value: Any) -> Any:
    if isinstance(value, (list, tuple)):
        return tuple(_as_tuple(v) for v in value)
    return value
