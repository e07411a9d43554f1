"""What an evaluation hands back: metrics, files written, small facts for the run's info."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any


@dataclass
class EvaluationReport:
    metrics: dict[str, float]
    headline: list[str]
    """The few metrics that summarise the evaluation (the run's result shows these)."""
    artifacts: list[Path] = field(default_factory=list)
    info: dict[str, Any] = field(default_factory=dict)
