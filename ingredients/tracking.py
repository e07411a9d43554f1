"""Where runs are recorded (``tracking``) and what they log how often (``logging``).

Observer choice, in order: ``tracking.url`` or ``$MEDSEG_MONGO_URL`` -> MongoDB; else the
local server of ``medseg db start`` if it answers -> MongoDB; else the file observer under
``tracking.file_dir``. The run's log says which, in one line, with any password hidden.

Bad input is sorted by what fixes it: a malformed URL, wrong credentials or a read-only
database are configuration mistakes and stop the run before it starts (ConfigError); a
database that does not answer is a connection problem, and the run goes on recording to
files, which ``medseg db import`` loads into MongoDB later.
"""

from __future__ import annotations

import json
import logging
import tempfile
from datetime import datetime
from pathlib import Path
from typing import Any

from ingredients.fields import Field, FieldIngredient
from ingredients.observers import (ContinueRun, FileRunObserver, MongoRunObserver,
                                   report_missing_artifact)
from medseg import config as c
from medseg import db
from medseg.errors import ConfigError, MedsegError
from medseg.tracking import connection

log = logging.getLogger("medseg")

URL_VARIABLE = connection.URL_VARIABLE
#: Written next to a run's checkpoints: which recorded run they belong to, so that
#: ``checkpoint.resume`` can continue that run.
RUN_LINK = "sacred_run.json"

LOGGING_FIELDS = {
    "log_frequency": Field(10, c.integer(minimum=1),
                           "Optimizer steps between logged training losses"),
    "visualize_predictions": Field(False, c.boolean(),
                                   "Save a prediction overlay PNG after each validation"),
    "progress_bar": Field(True, c.boolean(),
                          "Show tqdm progress bars (only final lines are stored)"),
}

TRACKING_FIELDS = {
    "observer": Field("auto", c.choice("auto", "mongo", "file", "none"),
                      "Where runs go: 'auto' (MongoDB if one answers, else files), 'mongo' (also "
                      "starts the local server when no URL is set), 'file', 'none'"),
    "url": Field(None, c.optional(c.text()),
                 f"MongoDB URL without a password (default: ${URL_VARIABLE}, then medseg db)"),
    "db_name": Field(None, c.optional(c.text()),
                     "MongoDB database (default: the one the URL names, else 'medseg'); when "
                     "given, it wins over the URL's"),
    "file_dir": Field("sacred_runs", c.text(),
                      "File observer directory; also keeps runs the database could not take"),
    "max_artifact_mb": Field(200, c.number(minimum=0),
                             "Checkpoints larger than this are recorded by path, not stored"),
    "flush_timeout_s": Field(60.0, c.number(minimum=0),
                             "At the end of a run, how long to wait for an unanswering database "
                             "before keeping the rest locally"),
    "max_metric_points": Field(10_000, c.integer(minimum=2),
                               "Points kept per metric; longer series are thinned evenly"),
    "max_output_mb": Field(1.0, c.number(above=0),
                           "Captured output kept per run (the start and the end of it)"),
    "max_info_kb": Field(64, c.number(above=0),
                         "Larger info entries are stored as JSON artifacts instead"),
}


class LoggingIngredient(FieldIngredient):
    def __init__(self, **defaults: Any) -> None:
        super().__init__("logging", LOGGING_FIELDS, defaults, resume_may_change=True)


class TrackingIngredient(FieldIngredient):
    def __init__(self, **defaults: Any) -> None:
        super().__init__("tracking", TRACKING_FIELDS, defaults, resume_may_change=True)

    def validate(self, config) -> None:
        super().validate(config)
        url = config[self.path]["url"]
        if url is None:
            return
        connection.check_url(url, "tracking.url")
        if connection.has_password(url):
            raise ConfigError(f"tracking.url {db.redact(url)!r} contains a password, and the "
                              "config is stored with every run; leave tracking.url unset and "
                              f"put the URL in ${URL_VARIABLE} instead")


def choose_observer(tracking: dict[str, Any], resume: str | None = None):
    """``(observer or None, line saying where the run goes, logging level of that line)``.

    Raises ConfigError for a malformed URL, wrong credentials or a read-only database.
    """
    mode = tracking["observer"]
    if mode == "none":
        return None, "tracking: this run is not recorded (tracking.observer='none')", logging.INFO
    if mode == "file":
        return (_file_observer(tracking, resume), f"tracking: recording this run in "
                f"{tracking['file_dir']}/ (tracking.observer='file')", logging.INFO)
    url, source = connection.resolve_url(tracking["url"])
    connection.check_url(url, source)
    implicit = source == "medseg db"
    if implicit and mode == "mongo" and not db.ping(url, timeout_s=0.5):
        try:
            url, source = db.start().url, "medseg db, started for this run"
        except MedsegError as error:
            return _fallback(tracking, f"the local database server could not start: {error}",
                             resume=resume)
    db_name, _ = connection.resolve_db_name(url, tracking["db_name"])
    try:
        connection.check_database(url, db_name, source, timeout_s=1.0 if implicit else 5.0)
    except connection.DatabaseUnreachable as error:
        if implicit and mode == "auto":
            return _fallback(tracking, "no database configured and `medseg db` is not running",
                             logging.INFO, resume=resume)
        return _fallback(tracking, str(error), resume=resume)
    observer = MongoRunObserver(
        url, db_name, source=source, file_dir=tracking["file_dir"],
        max_metric_points=tracking["max_metric_points"],
        flush_timeout_s=tracking["flush_timeout_s"],
        continue_run=_run_to_continue(resume, url, db_name))
    return observer, (f"tracking: recording this run in MongoDB at {db.redact(url)} "
                      f"(database {db_name!r}, from {source})"), logging.INFO


def _file_observer(tracking: dict[str, Any], resume: str | None = None) -> FileRunObserver:
    return FileRunObserver(tracking["file_dir"], tracking["max_metric_points"],
                           continue_run=_file_run_to_continue(resume, tracking["file_dir"]))


def _file_run_to_continue(resume: str | None, file_dir: str) -> ContinueRun | None:
    """The file-observer run that wrote checkpoint ``resume``, if it is in ``file_dir``."""
    link = read_run_link(resume)
    database = link.get("database") or {}
    if (database.get("kind") != "file" or link.get("run_id") is None
            or Path(database.get("dir", "")).resolve() != Path(file_dir).resolve()):
        return None
    checkpoint = Path(resume)
    return ContinueRun(link["run_id"], checkpoint,
                       datetime.utcfromtimestamp(checkpoint.stat().st_mtime))


def _fallback(tracking: dict[str, Any], reason: str, level: int = logging.WARNING,
              resume: str | None = None):
    directory = tracking["file_dir"]
    return (_file_observer(tracking, resume),
            f"tracking: {reason}; recording this run in {directory}/ instead "
            f"(`medseg db import {directory}` loads it into MongoDB later)", level)


def _run_to_continue(resume: str | None, url: str, db_name: str) -> ContinueRun | None:
    """The database run that wrote checkpoint ``resume``, if it is in this database."""
    link = read_run_link(resume)
    database = link.get("database") or {}
    if (database.get("kind") != "mongo" or database.get("db_name") != db_name
            or database.get("server") != connection.server_address(url)
            or not isinstance(link.get("run_id"), int)):
        return None
    checkpoint = Path(resume)
    return ContinueRun(link["run_id"], checkpoint,
                       datetime.utcfromtimestamp(checkpoint.stat().st_mtime))


def read_run_link(checkpoint: str | Path | None) -> dict[str, Any]:
    """What :func:`link_checkpoint_directory` wrote next to ``checkpoint`` ({} if nothing)."""
    if checkpoint is None:
        return {}
    try:
        return json.loads((Path(checkpoint).parent / RUN_LINK).read_text())
    except (OSError, ValueError):
        return {}


def link_checkpoint_directory(run, directory: str | Path) -> None:
    """Note in a run's checkpoint folder which recorded run it belongs to."""
    if run._id is None or not run.observers:
        return
    observer = run.observers[0]
    location = observer.location() if hasattr(observer, "location") else None
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    (directory / RUN_LINK).write_text(json.dumps(
        {"experiment": run.experiment_info["name"], "run_id": run._id,
         "start_time": run.start_time.isoformat() if run.start_time else None,
         "database": location}, indent=2))


def raise_recording_failure(run) -> None:
    """Stop the run when an observer could not record it (a full disk): Sacred only logs an
    observer's error and goes on without it, and the run would end "Completed" with a record
    left RUNNING."""
    for observer in run.observers:
        failure = getattr(observer, "failure", None) or getattr(
            getattr(observer, "fallback", None), "failure", None)
        if failure is not None:
            raise failure


class SacredReporter:
    """The library's :class:`~medseg.engine.reporting.Reporter` on top of a Sacred run.

    An artifact whose file is missing is reported in one line and the run goes on; an info
    entry larger than ``tracking.max_info_kb`` becomes a JSON artifact and ``info`` keeps a
    note of it, so the run document stays small.
    """

    def __init__(self, run) -> None:
        self.run = run
        tracking = run.config.get("tracking", {})
        max_info_kb = tracking.get("max_info_kb", TRACKING_FIELDS["max_info_kb"].default)
        self.max_info_bytes = int(max_info_kb * 1024)

    def log_scalar(self, name: str, value: float, step: int) -> None:
        raise_recording_failure(self.run)
        self.run.log_scalar(name, float(value), step)

    def add_artifact(self, path: str | Path, name: str | None = None) -> None:
        raise_recording_failure(self.run)
        path = Path(path)
        name = name or path.name
        if not path.is_file():
            report_missing_artifact(name, str(path))
            return
        self.run.add_artifact(str(path), name=name)

    def set_info(self, key: str, value: Any) -> None:
        raise_recording_failure(self.run)
        text = json.dumps(value, default=str)
        if len(text) <= self.max_info_bytes:
            self.run.info[key] = value
            return
        name = f"info_{key}.json"
        with tempfile.TemporaryDirectory(prefix="medseg-info-") as folder:
            path = Path(folder) / name
            path.write_text(text)
            self.run.add_artifact(str(path), name=name)
        self.run.info[key] = {"stored_as_artifact": name, "size_kb": round(len(text) / 1024, 1)}
        log.info("info %r takes %.0f kB; stored as artifact %s", key, len(text) / 1024, name)
