"""Mixed precision: fp16 autocast with a GradScaler on CUDA, bf16 autocast on CPU or CUDA."""

from __future__ import annotations

import contextlib
from dataclasses import dataclass

import torch


MODES = ("auto", "none", "fp16", "bf16")


@dataclass(frozen=True)
class Precision:
    """How the forward pass runs on ``device``; ``dtype`` is ``None`` for plain fp32."""

    device_type: str
    dtype: torch.dtype | None

    @property
    def name(self) -> str:
        return {None: "fp32", torch.float16: "fp16", torch.bfloat16: "bf16"}[self.dtype]

    def autocast(self) -> contextlib.AbstractContextManager:
        if self.dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(device_type=self.device_type, dtype=self.dtype)

    def grad_scaler(self) -> torch.amp.GradScaler:
        """A scaler that is active only for fp16, where small gradients underflow."""
        return torch.amp.GradScaler(self.device_type, enabled=self.dtype is torch.float16)


def resolve_precision(mode: str, device: torch.device) -> Precision:
    """``auto`` is fp16 on CUDA and fp32 elsewhere; fp16 needs CUDA."""
    if mode not in MODES:
        raise ValueError(f"mode must be one of {', '.join(repr(m) for m in MODES)}, got {mode!r}")
    if mode == "auto":
        mode = "fp16" if device.type == "cuda" else "none"
    if mode == "fp16" and device.type != "cuda":
        raise ValueError(f"mode='fp16' needs a CUDA device, got device {str(device)!r}; "
                         "use 'bf16' on CPU or 'none'")
    dtype = {"none": None, "fp16": torch.float16, "bf16": torch.bfloat16}[mode]
    return Precision(device.type, dtype)


def resolve_device(name: str) -> torch.device:
    """``auto`` picks CUDA when present; an explicit CUDA request without CUDA is an error."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise ValueError(f"device must be 'auto', 'cpu' or 'cuda[:N]', got {name!r}") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device={name!r} but no CUDA device is available")
    return device
