"""Where runs are recorded (``tracking``) and what they log how often (``logging``).

Observer choice, in order: ``tracking.url`` or ``$MEDSEG_MONGO_URL`` -> MongoDB; else the
local server of ``medseg db start`` if it answers -> MongoDB; else the file observer under
``tracking.file_dir``. The run's log says which, in one line, with any password hidden.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from sacred.observers import FileStorageObserver, QueuedMongoObserver, RunObserver

from ingredients.fields import Field, FieldIngredient
from medseg import config as c
from medseg import db
from medseg.errors import ConfigError

URL_VARIABLE = "MEDSEG_MONGO_URL"

LOGGING_FIELDS = {
    "log_frequency": Field(10, c.integer(minimum=1), "Optimizer steps between logged training losses"),
    "visualize_predictions": Field(False, c.boolean(),
                                   "Save a prediction overlay PNG after each validation"),
    "progress_bar": Field(True, c.boolean(), "Show tqdm progress bars (only final lines are stored)"),
}

TRACKING_FIELDS = {
    "observer": Field("auto", c.choice("auto", "mongo", "file", "none"),
                      "Where runs go: 'auto' (MongoDB if reachable, else files), 'mongo', 'file', 'none'"),
    "url": Field(None, c.optional(c.text()), f"MongoDB URL (default: ${URL_VARIABLE}, then medseg db)"),
    "db_name": Field("medseg", c.text(), "MongoDB database name"),
    "file_dir": Field("sacred_runs", c.text(), "File observer directory"),
    "max_artifact_mb": Field(200, c.number(minimum=0),
                             "Checkpoints larger than this are recorded by path, not stored"),
}


class LoggingIngredient(FieldIngredient):
    def __init__(self, **defaults: Any) -> None:
        super().__init__("logging", LOGGING_FIELDS, defaults)


class TrackingIngredient(FieldIngredient):
    def __init__(self, **defaults: Any) -> None:
        super().__init__("tracking", TRACKING_FIELDS, defaults)

    def validate(self, config) -> None:
        super().validate(config)
        url = config[self.path]["url"]
        if url is not None and not url.startswith(("mongodb://", "mongodb+srv://")):
            raise ConfigError(f"tracking.url must start with mongodb:// or mongodb+srv://, "
                              f"got {db.redact(url)!r}")


def choose_observer(tracking: dict[str, Any]) -> tuple[RunObserver | None, str]:
    """The observer for a run's ``tracking`` config and a line that says which it is."""
    mode = tracking["observer"]
    if mode == "none":
        return None, "this run is not recorded (tracking.observer='none')"
    if mode == "file":
        return _file_observer(tracking, "tracking.observer='file'")
    url = tracking["url"] or os.environ.get(URL_VARIABLE)
    source = "tracking.url" if tracking["url"] else URL_VARIABLE
    if url is None:
        url, source = db.local_url(), "medseg db"
    if db.ping(url, timeout_s=1.0 if source != "medseg db" else 0.3):
        observer = QueuedMongoObserver(url=url, db_name=tracking["db_name"], interval=2.0,
                                       retry_interval=2.0)
        return observer, (f"recording this run in MongoDB at {db.redact(url)} "
                          f"(database {tracking['db_name']!r}, from {source})")
    return _file_observer(tracking, f"no MongoDB answered at {db.redact(url)} (from {source})")


def _file_observer(tracking: dict[str, Any], reason: str) -> tuple[RunObserver, str]:
    directory = Path(tracking["file_dir"])
    return FileStorageObserver(str(directory)), f"recording this run in {directory}/ ({reason})"


class SacredReporter:
    """The library's :class:`~medseg.engine.reporting.Reporter` on top of a Sacred run."""

    def __init__(self, run) -> None:
        self.run = run

    def log_scalar(self, name: str, value: float, step: int) -> None:
        self.run.log_scalar(name, float(value), step)

    def add_artifact(self, path: str | Path, name: str | None = None) -> None:
        path = Path(path)
        self.run.add_artifact(str(path), name=name or path.name)

    def set_info(self, key: str, value: Any) -> None:
        self.run.info[key] = value
