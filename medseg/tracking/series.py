"""Metric series that stay below a fixed number of points however long a run is.

A series keeps every point until it holds ``max_points``; then it drops every other point
and from then on keeps only every second new one (then every fourth, ...). The kept points
stay spread evenly over the whole run, the first point is never dropped, and the last point
logged is added back when the run ends, so the final value is always exact. One series stays
one series (one MongoDB document per metric, as omniboard and incense expect) and far below
MongoDB's 16 MB document limit (10,000 points take about 0.5 MB).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import datetime
from typing import Any


@dataclass
class MetricSeries:
    max_points: int
    steps: list[int] = field(default_factory=list)
    values: list[float] = field(default_factory=list)
    timestamps: list[datetime] = field(default_factory=list)
    #: Points offered so far; a point is kept when its index is a multiple of ``stride``.
    offered: int = 0
    stride: int = 1
    #: Bumped whenever kept points are removed, so a copy elsewhere knows to replace itself.
    generation: int = 0
    latest: tuple[int, float, datetime] | None = None

    def __post_init__(self) -> None:
        if self.max_points < 2:
            raise ValueError(f"max_points must be at least 2, got {self.max_points}")

    def add(self, step: int, value: float, timestamp: datetime) -> None:
        keep = self.offered % self.stride == 0
        self.offered += 1
        self.latest = (step, value, timestamp)
        if not keep:
            return
        self.steps.append(step)
        self.values.append(value)
        self.timestamps.append(timestamp)
        if len(self.steps) > self.max_points:
            self._halve()

    def _halve(self) -> None:
        self.steps, self.values, self.timestamps = (
            self.steps[::2], self.values[::2], self.timestamps[::2])
        self.stride *= 2
        self.generation += 1

    def finish(self) -> None:
        """Keep the last point logged (the run's final value) even if its turn was skipped."""
        if self.latest is not None and (not self.steps or self.timestamps[-1] != self.latest[2]
                                        or self.steps[-1] != self.latest[0]):
            step, value, timestamp = self.latest
            self.steps.append(step)
            self.values.append(value)
            self.timestamps.append(timestamp)

    def drop_after(self, moment: datetime) -> None:
        """Forget points logged after ``moment`` (a resumed run logs them again)."""
        keep = [i for i, t in enumerate(self.timestamps) if t <= moment]
        if len(keep) == len(self.timestamps):
            return
        self.steps = [self.steps[i] for i in keep]
        self.values = [self.values[i] for i in keep]
        self.timestamps = [self.timestamps[i] for i in keep]
        self.latest = None
        self.generation += 1

    def __len__(self) -> int:
        return len(self.steps)

    @classmethod
    def restore(cls, max_points: int, steps, values, timestamps) -> MetricSeries:
        """A series continuing stored points (a resumed run, an imported run)."""
        series = cls(max_points)
        series.steps, series.values, series.timestamps = list(steps), list(values), list(timestamps)
        series.offered = len(series.steps)
        while len(series.steps) > max_points:
            series._halve()
        return series

    def as_document(self) -> dict[str, Any]:
        return {"steps": list(self.steps), "values": list(self.values),
                "timestamps": list(self.timestamps)}
