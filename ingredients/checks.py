"""Config checks that several pipelines share (each speaks config keys; they run before a
command starts)."""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any

from medseg.errors import ConfigError


def check_monitor(config: Mapping[str, Any], choices: Iterable[str]) -> None:
    """``training.monitor`` must be one of ``choices`` (``val_`` names, e.g. from
    :func:`medseg.engine.trainer.monitor_choices` or ``[f"val_{m}" for m in METRICS]``)."""
    choices = list(choices)
    monitor = config["training"]["monitor"]
    if monitor not in choices:
        raise ConfigError(f"training.monitor={monitor!r} is not a metric of this pipeline; "
                          f"choose one of {', '.join(choices)}")
