"""The small interface through which the library reports a run.

A Sacred ``Run`` is adapted to it in ``ingredients/tracking.py``; notebooks and other
trackers can pass :class:`RecordingReporter` or their own object with the same methods.
"""

from __future__ import annotations

from collections import defaultdict
from pathlib import Path
from typing import Any, Protocol


class Reporter(Protocol):
    def log_scalar(self, name: str, value: float, step: int) -> None:
        """Record one point of the metric ``name`` (no dots in names)."""

    def add_artifact(self, path: str | Path, name: str | None = None) -> None:
        """Attach a file (a PNG, a JSON, a checkpoint) to the run."""

    def set_info(self, key: str, value: Any) -> None:
        """Store a small JSON-serialisable fact about the run (device, best epoch ...)."""


class RecordingReporter:
    """Keeps everything in memory: the reporter for plain-Python use without a tracker."""

    def __init__(self) -> None:
        self.metrics: dict[str, list[tuple[int, float]]] = defaultdict(list)
        self.artifacts: list[tuple[Path, str]] = []
        self.info: dict[str, Any] = {}

    def log_scalar(self, name: str, value: float, step: int) -> None:
        self.metrics[name].append((step, float(value)))

    def add_artifact(self, path: str | Path, name: str | None = None) -> None:
        path = Path(path)
        self.artifacts.append((path, name or path.name))

    def set_info(self, key: str, value: Any) -> None:
        self.info[key] = value

    def values(self, name: str) -> list[float]:
        return [v for _, v in self.metrics[name]]
