"""Sacred observers that keep every record of a run, whatever the database does.

:class:`FileRunObserver` is Sacred's file observer with metric series kept below a fixed
number of points, JSON files replaced atomically, and a missing artifact reported in one
line instead of silently disabling the observer (Sacred drops an observer for the rest of
the run after any error in it).

:class:`MongoRunObserver` records into MongoDB from a background thread. Every event is
first written to a local copy of the run (a file-observer folder under
``<file_dir>/unsynced/``), then delivered; a delivery that fails is retried until the
database answers again, so a database that goes away mid-run loses nothing. When the run
ends, the observer waits at most ``flush_timeout_s`` for the database; if it is still away,
the local copy stays, complete, and one line says how to load it (``medseg db import``).
Sacred's own QueuedMongoObserver instead waits for ever at the end of a run and duplicates
metric points when a write is retried.
"""

from __future__ import annotations

import copy
import json
import logging
import mimetypes
import os
import shutil
import threading
import time
from dataclasses import dataclass
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any

from sacred.dependencies import get_digest
from sacred.observers import FileStorageObserver, RunObserver
from sacred.serializer import flatten

from medseg import db
from medseg.errors import ConfigError, DiskFullError, MedsegError
from medseg.files import is_no_space, no_space_error
from medseg.tracking import connection
from medseg.tracking.compare import config_changes
from medseg.tracking.rundir import SYNC_MARKER
from medseg.tracking.series import MetricSeries

log = logging.getLogger("medseg")

#: Stay clear of MongoDB's 16 MB document limit.
DOCUMENT_LIMIT = 15 * 1024 * 1024
#: A run whose heartbeat is this recent is taken to be running still.
STILL_RUNNING = timedelta(minutes=2)
_OBSERVER_FILES = ("run.json", "config.json", "cout.txt", "metrics.json", SYNC_MARKER)


def add_points(series: dict[str, MetricSeries], metrics_by_name: dict, max_points: int) -> None:
    """Feed Sacred's ``log_metrics`` batch (name -> steps, values, timestamps) into ``series``."""
    for name, batch in metrics_by_name.items():
        target = series.setdefault(name, MetricSeries(max_points))
        for step, value, timestamp in zip(batch["steps"], batch["values"], batch["timestamps"]):
            target.add(step, value, timestamp)


def report_missing_artifact(name: str, filename: str) -> None:
    log.warning("artifact %r: no file at %s; nothing stored for it", name, filename)


def snapshot(info: dict) -> dict:
    """A JSON-ready copy of the run's live ``info``, which the main thread may be changing."""
    for _ in range(10):
        try:
            return flatten(copy.deepcopy(dict(info)))
        except RuntimeError:  # changed size during the copy
            time.sleep(0.01)
    return flatten(dict(info))


def _link_or_copy(source: Path, target: Path) -> None:
    """Hard-link when possible: instant, no extra disk, and a checkpoint replaced later by
    an atomic rename keeps its old content here."""
    target.unlink(missing_ok=True)
    try:
        os.link(source, target)
    except OSError:
        shutil.copyfile(source, target)


def _to_millisecond(moment: datetime) -> datetime:
    """MongoDB keeps datetimes to the millisecond."""
    return moment.replace(microsecond=moment.microsecond // 1000 * 1000)


class FileRunObserver(FileStorageObserver):
    def __init__(self, basedir: str | Path, max_metric_points: int,
                 continue_run: ContinueRun | None = None) -> None:
        super().__init__(str(basedir))
        self.max_metric_points = max_metric_points
        self.continue_run = continue_run
        self.series: dict[str, MetricSeries] = {}
        self._written_cout: str | None = None
        self._prior_out, self._prior_info = "", {}
        #: A full disk met while recording (the run is stopped with it: see SacredReporter).
        self.failure: DiskFullError | None = None

    def _write(self, target: Path, partial: Path | None, write) -> None:
        """``write()``; a full disk removes what it left half-written and is kept as
        ``failure`` (Sacred swallows an observer's errors and drops the observer)."""
        try:
            write()
        except OSError as error:
            if not is_no_space(error):
                raise
            for path in (partial, target if partial is None else None):
                if path is not None:
                    path.unlink(missing_ok=True)
            if self.failure is None:
                self.failure = no_space_error(target, f"the record of this run in {self.dir} "
                                                      "is incomplete")
            raise self.failure from None

    def location(self) -> dict[str, str]:
        return {"kind": "file", "dir": str(Path(self.basedir).resolve())}

    def log_metrics(self, metrics_by_name, info):
        add_points(self.series, metrics_by_name, self.max_metric_points)
        self.write_metrics(self.series)

    def write_metrics(self, series: dict[str, MetricSeries]) -> None:
        self.save_json({name: {"steps": s.steps, "values": s.values,
                               "timestamps": [t.isoformat() for t in s.timestamps]}
                        for name, s in series.items()}, "metrics.json")

    def save_json(self, obj, filename):
        target = Path(self.dir) / filename
        partial = target.with_name(f".{filename}.partial")

        def write():
            with open(partial, "w") as handle:
                json.dump(flatten(obj), handle, sort_keys=True, indent=2)
            os.replace(partial, target)

        self._write(target, partial, write)

    def save_cout(self):
        # Sacred appends only what is new, but the captured output filter rewrites earlier
        # text (progress bars collapsed, the middle of a long output left out).
        if self.cout == self._written_cout:
            return
        target = Path(self.dir) / "cout.txt"
        partial = target.with_name(".cout.txt.partial")
        self._write(target, partial, lambda: (partial.write_text(self.cout, encoding="utf-8"),
                                              os.replace(partial, target)))
        self._written_cout = self.cout

    def save_file(self, filename, target_name=None):
        target_name = target_name or os.path.basename(filename)
        if target_name in _OBSERVER_FILES:
            raise FileExistsError(f"an artifact may not be called {target_name}: the file "
                                  "observer keeps its own file of that name")
        source, target = Path(filename), Path(self.dir) / target_name
        if source.resolve() != target.resolve():
            self._write(target, None, lambda: _link_or_copy(source, target))

    def heartbeat_event(self, info, captured_out, beat_time, result):
        super().heartbeat_event({**self._prior_info, **snapshot(info)},
                                self._prior_out + captured_out, beat_time, result)

    def artifact_event(self, name, filename, metadata=None, content_type=None):
        if not Path(filename).is_file():
            report_missing_artifact(name, filename)
            return
        if name in self.run_entry["artifacts"]:  # replaced (a continued run's checkpoints)
            self.run_entry["artifacts"].remove(name)
        super().artifact_event(name, filename, metadata, content_type)

    def _continue(self, ex_info, command, host_info, start_time, config, meta_info):
        """Continue the recorded run of the resumed checkpoint, as MongoRunObserver does:
        same folder and id, its metric points logged after the checkpoint was saved dropped
        (the resumed training logs those steps again), output and info kept."""
        target = self.continue_run
        folder = Path(self.basedir) / str(target.run_id)
        try:
            previous = json.loads((folder / "run.json").read_text())
        except (OSError, ValueError):
            log.warning("tracking: run %s is not in %s/; recording the resumed training as a "
                        "new run", target.run_id, self.basedir)
            return None
        heartbeat = previous.get("heartbeat")
        if previous.get("status") == "RUNNING" and heartbeat and _recent(
                datetime.fromisoformat(heartbeat)):
            log.warning("tracking: run %s is still running; recording the resumed training as "
                        "a new run", target.run_id)
            return None
        self.dir = str(folder)
        ex_info["sources"] = self.save_sources(ex_info)
        old_config = _read_json(folder / "config.json")
        resume = {"time": start_time.isoformat(), "checkpoint": str(target.checkpoint),
                  "previous_status": previous.get("status"),
                  "config_changes": [{"key": key, "before": before, "after": after}
                                     for key, (before, after)
                                     in config_changes(old_config, flatten(config)).items()]}
        prior_info = _read_json(folder / "info.json")
        self._prior_info = {**prior_info, "resumes": [*prior_info.get("resumes", []), resume]}
        try:
            earlier_out = (folder / "cout.txt").read_text(encoding="utf-8")
        except OSError:
            earlier_out = ""
        self._prior_out = (f"{earlier_out}\n[medseg: resumed {start_time:%Y-%m-%d %H:%M:%S} "
                           f"UTC from {target.checkpoint}]\n")
        given = {k: v for k, v in meta_info.items() if v is not None}
        self.run_entry = {**{k: v for k, v in previous.items()
                             if k not in ("stop_time", "result", "fail_trace")},
                          "experiment": dict(ex_info), "command": command,
                          "host": dict(host_info), "meta": {**previous.get("meta", {}), **given},
                          "status": "RUNNING", "heartbeat": None,
                          "artifacts": list(previous.get("artifacts", [])),
                          "resources": list(previous.get("resources", []))}
        self.config, self.info, self.cout = config, dict(self._prior_info), self._prior_out
        self.cout_write_cursor = 0
        for name, points in _read_json(folder / "metrics.json").items():
            series = MetricSeries.restore(self.max_metric_points, points["steps"],
                                          points["values"],
                                          [datetime.fromisoformat(t) for t in points["timestamps"]])
            series.drop_after(target.saved_at)
            self.series[name] = series
        self.write_metrics(self.series)
        self.save_json(self.run_entry, "run.json")
        self.save_json(self.config, "config.json")
        self.save_json(self.info, "info.json")
        self.save_cout()
        log.info("tracking: the resumed training continues run %s in %s", target.run_id, folder)
        return target.run_id

    def started_event(self, ex_info, command, host_info, start_time, config, meta_info, _id):
        try:
            if self.continue_run is not None:
                run_id = self._continue(ex_info, command, host_info, start_time, config,
                                        meta_info)
                if run_id is not None:
                    return run_id
            return super().started_event(ex_info, command, host_info, start_time, config,
                                         meta_info, _id)
        except OSError as error:
            if not is_no_space(error):
                raise
            self.failure = self.failure or no_space_error(
                error.filename2 or error.filename or self.basedir,
                f"the run is not recorded in {self.basedir}")
            raise self.failure from None

    def _finish_series(self) -> None:
        for series in self.series.values():
            series.finish()
        if self.series:
            self.write_metrics(self.series)

    def _final(self, event) -> None:
        """A final event; after a full disk, a best effort (the failure is reported)."""
        if self.run_entry is None:  # the run could not even be started here
            return
        try:
            self._finish_series()
            event()
        except MedsegError:
            if self.failure is None:
                raise

    def completed_event(self, stop_time, result):
        self._final(lambda: super(FileRunObserver, self).completed_event(stop_time, result))

    def interrupted_event(self, interrupt_time, status):
        self._final(lambda: super(FileRunObserver, self).interrupted_event(interrupt_time, status))

    def failed_event(self, fail_time, fail_trace):
        self._final(lambda: super(FileRunObserver, self).failed_event(fail_time, fail_trace))


@dataclass
class ContinueRun:
    """A resumed run continues database run ``run_id``; points logged after the checkpoint
    was saved are dropped, since the resumed training logs them again."""

    run_id: int
    checkpoint: Path
    saved_at: datetime


@dataclass
class _Upload:
    name: str
    path: Path
    content_type: str | None
    metadata: dict | None
    file_id: Any
    attempted: bool = False


class MongoRunObserver(RunObserver):
    priority = 30

    def __init__(self, url: str, db_name: str, *, source: str, file_dir: str | Path,
                 max_metric_points: int, flush_timeout_s: float,
                 continue_run: ContinueRun | None = None, retry_interval_s: float = 2.0,
                 sync_interval_s: float = 1.0) -> None:
        self.url, self.db_name, self.source = url, db_name, source
        self.file_dir = Path(file_dir)
        self.max_metric_points = max_metric_points
        self.flush_timeout_s = flush_timeout_s
        self.continue_run = continue_run
        self.retry_interval_s, self.sync_interval_s = retry_interval_s, sync_interval_s
        self.run_id: int | None = None
        self.fallback: FileRunObserver | None = None
        self.journal: FileRunObserver | None = None
        self._lock = threading.RLock()
        self._synced = threading.Condition(self._lock)
        self._wake, self._stopping = threading.Event(), threading.Event()
        self._worker: threading.Thread | None = None
        self._entry: dict[str, Any] = {}
        self._entry_version, self._saved_version = 0, -1
        self._series: dict[str, MetricSeries] = {}
        self._metric_ids: dict[str, Any] = {}
        self._delivered: dict[str, tuple[int | None, int]] = {}
        self._uploads: list[_Upload] = []
        self._superseded: list[Any] = []
        self._prior_out, self._prior_info = "", {}
        self._failing_since: float | None = None
        self._journal_problem_reported = False

    # ------------------------------------------------------------------ where
    def location(self) -> dict[str, str]:
        if self.fallback is not None:
            return self.fallback.location()
        return {"kind": "mongo", "server": connection.server_address(self.url),
                "db_name": self.db_name}

    @property
    def journal_root(self) -> Path | None:
        return Path(self.journal.basedir) if self.journal is not None else None

    # ------------------------------------------------------------------ start
    def started_event(self, ex_info, command, host_info, start_time, config, meta_info, _id):
        from pymongo.errors import ConnectionFailure, OperationFailure

        try:
            self.run_id = self._open_run(copy.deepcopy(ex_info), command, host_info, start_time,
                                         config, meta_info)
        except ConnectionFailure as error:
            self.fallback = FileRunObserver(self.file_dir, self.max_metric_points)
            run_id = self.fallback.started_event(ex_info, command, host_info, start_time, config,
                                                 meta_info, None)
            log.warning("tracking: MongoDB at %s stopped answering as the run started (%s); "
                        "recording run %s in %s/ instead; `medseg db import %s` loads it later",
                        db.redact(self.url), type(error).__name__, run_id, self.file_dir,
                        Path(self.fallback.dir))
            return run_id
        except OperationFailure as error:
            raise ConfigError(f"MongoDB at {db.redact(self.url)} refused to record the run: "
                              f"{str(error).split(', full error')[0]}") from None
        stamp = start_time.strftime("%Y%m%dT%H%M%S")
        journal_root = self.file_dir / "unsynced" / f"{self.db_name}-{self.run_id}-{stamp}"
        self.journal = FileRunObserver(journal_root, self.max_metric_points)
        self.journal.started_event(copy.deepcopy(ex_info), command, host_info, start_time, config,
                                   meta_info, str(self.run_id))
        prior_artifacts = [{"name": a["name"], "file_id": str(a["file_id"])}
                           for a in self._entry["artifacts"]]
        self.journal.save_json({"db_name": self.db_name, "run_id": self.run_id,
                                "server": connection.server_address(self.url),
                                "start_time": self._entry["start_time"].isoformat(),
                                "prior_artifacts": prior_artifacts}, SYNC_MARKER)
        if self._series:
            self.journal.write_metrics(self._series)
        self._worker = threading.Thread(target=self._work, name="medseg-mongo-sync", daemon=True)
        self._worker.start()
        return self.run_id

    def _open_run(self, ex_info, command, host_info, start_time, config, meta_info) -> int:
        import gridfs

        self._client = connection.client(self.url, timeout_s=5.0)
        database = self._client[self.db_name]
        self._runs, self._metrics = database["runs"], database["metrics"]
        self._fs = gridfs.GridFS(database)
        entry = {"experiment": dict(ex_info), "format": "MongoObserver-0.7.0", "command": command,
                 "host": dict(host_info), "start_time": _to_millisecond(start_time),
                 "config": flatten(config), "meta": meta_info, "status": "RUNNING",
                 "resources": [], "artifacts": [], "captured_out": "", "info": {},
                 "heartbeat": None}
        entry["experiment"]["sources"] = self._save_sources(ex_info)
        if self.continue_run is not None:
            run_id = self._continue(entry)
            if run_id is not None:
                return run_id
        self._entry = entry
        return self._insert(entry)

    def _save_sources(self, ex_info) -> list:
        sources = []
        for name, _ in ex_info["sources"]:
            path = os.path.join(ex_info["base_dir"], name)
            with open(path, "rb") as handle:
                sources.append([name, self._fs.put(handle, filename=path)])
        return sources

    def _insert(self, entry: dict) -> int:
        import pymongo
        from pymongo.errors import DuplicateKeyError

        while True:
            last = list(self._runs.find({}, {"_id": 1}).sort("_id", pymongo.DESCENDING).limit(1))
            entry["_id"] = last[0]["_id"] + 1 if last else 1
            try:
                self._runs.insert_one(entry)
                return entry["_id"]
            except DuplicateKeyError:  # another run took the id first
                continue

    def _continue(self, entry: dict) -> int | None:
        target = self.continue_run
        previous = self._runs.find_one({"_id": target.run_id})
        reason = None
        if previous is None:
            reason = f"run {target.run_id} is not in database {self.db_name!r}"
        elif previous.get("status") == "RUNNING" and _recent(previous.get("heartbeat")):
            reason = f"run {target.run_id} is still running"
        if reason is not None:
            log.warning("tracking: %s; recording the resumed training as a new run", reason)
            return None
        prior_info = {k: v for k, v in previous.get("info", {}).items() if k != "metrics"}
        changes = config_changes(previous.get("config", {}), entry["config"])
        # Plain JSON values only: incense reads info through json.dumps.
        resume = {"time": entry["start_time"].isoformat(), "checkpoint": str(target.checkpoint),
                  "previous_status": previous.get("status"),
                  # A list, not a mapping: dotted keys do not belong in MongoDB field names.
                  "config_changes": [{"key": key, "before": before, "after": after}
                                     for key, (before, after) in changes.items()]}
        self._prior_info = {**prior_info, "resumes": [*prior_info.get("resumes", []), resume]}
        self._prior_out = (f"{previous.get('captured_out', '')}\n[medseg: resumed "
                           f"{entry['start_time']:%Y-%m-%d %H:%M:%S} UTC "
                           f"from {target.checkpoint}]\n")
        given = {k: v for k, v in entry["meta"].items() if v is not None}
        meta = {**previous.get("meta", {}), **given}
        self._entry = {**{k: v for k, v in previous.items()
                          if k not in ("stop_time", "result", "fail_trace")},
                       **entry, "_id": target.run_id, "start_time": previous["start_time"],
                       "meta": meta, "artifacts": list(previous.get("artifacts", [])),
                       "captured_out": self._prior_out, "info": dict(self._prior_info)}
        for document in self._metrics.find({"run_id": target.run_id}):
            series = MetricSeries.restore(self.max_metric_points, document["steps"],
                                          document["values"], document["timestamps"])
            series.drop_after(target.saved_at)
            self._series[document["name"]] = series
            self._metric_ids[document["name"]] = document["_id"]
            self._delivered[document["name"]] = (None, series.generation)
        self._runs.replace_one({"_id": target.run_id}, self._entry)
        log.info("tracking: the resumed training continues run %s", target.run_id)
        return target.run_id

    # ------------------------------------------------------------------ events
    def heartbeat_event(self, info, captured_out, beat_time, result):
        if self.fallback is not None:
            return self.fallback.heartbeat_event(info, captured_out, beat_time, result)
        info = {**self._prior_info, **snapshot(info)}
        with self._lock:
            output = self._prior_out + captured_out
            self._entry.update(info=info, captured_out=output, heartbeat=beat_time,
                               result=flatten(result))
            self._entry_version += 1
            self._write_journal(lambda: (
                self.journal.heartbeat_event(info, output, beat_time, result),
                self.journal.write_metrics(self._series)))
        self._wake.set()

    def log_metrics(self, metrics_by_name, info):
        if self.fallback is not None:
            return self.fallback.log_metrics(metrics_by_name, info)
        with self._lock:
            add_points(self._series, metrics_by_name, self.max_metric_points)
        self._wake.set()

    def artifact_event(self, name, filename, metadata=None, content_type=None):
        if self.fallback is not None:
            return self.fallback.artifact_event(name, filename, metadata, content_type)
        if not Path(filename).is_file():
            report_missing_artifact(name, filename)
            return
        from bson import ObjectId

        with self._lock:
            self._write_journal(lambda: self.journal.artifact_event(name, filename))
            self._uploads = [u for u in self._uploads if u.name != name]
            self._uploads.append(_Upload(name, Path(self.journal.dir) / name,
                                         content_type or mimetypes.guess_type(name)[0], metadata,
                                         ObjectId()))
        self._wake.set()

    def resource_event(self, filename):
        if self.fallback is not None:
            return self.fallback.resource_event(filename)
        with self._lock:
            self._write_journal(lambda: self.journal.resource_event(filename))
            self._entry["resources"] = [*self._entry["resources"], [filename, get_digest(filename)]]
            self._entry_version += 1
        self._wake.set()

    def completed_event(self, stop_time, result):
        if self.fallback is not None:
            return self.fallback.completed_event(stop_time, result)
        self._finish({"status": "COMPLETED", "stop_time": stop_time, "result": flatten(result)},
                     lambda: self.journal.completed_event(stop_time, result))

    def interrupted_event(self, interrupt_time, status):
        if self.fallback is not None:
            return self.fallback.interrupted_event(interrupt_time, status)
        self._finish({"status": status, "stop_time": interrupt_time},
                     lambda: self.journal.interrupted_event(interrupt_time, status))

    def failed_event(self, fail_time, fail_trace):
        if self.fallback is not None:
            return self.fallback.failed_event(fail_time, fail_trace)
        self._finish({"status": "FAILED", "stop_time": fail_time, "fail_trace": fail_trace},
                     lambda: self.journal.failed_event(fail_time, fail_trace))

    def join(self):
        if self._worker is not None and self._worker.is_alive():
            self._flush()

    def _write_journal(self, write) -> None:
        try:
            write()
        except OSError as error:
            if not self._journal_problem_reported:
                log.warning("tracking: cannot write the local copy of run %s in %s (%s); "
                            "the database still gets every record", self.run_id,
                            self.journal_root, error)
                self._journal_problem_reported = True

    def _finish(self, changes: dict, journal_event) -> None:
        if self.journal is None:  # the run failed to start: nothing was recorded
            return
        with self._lock:
            self._entry.update(changes)
            self._entry_version += 1
            for series in self._series.values():
                series.finish()
            self._write_journal(lambda: (self.journal.write_metrics(self._series), journal_event()))
        started = time.monotonic()
        if self._flush():
            shutil.rmtree(self.journal_root, ignore_errors=True)
            _remove_if_empty(self.journal_root.parent)  # unsynced/
            _remove_if_empty(self.file_dir)
            return
        log.warning("tracking: MongoDB at %s did not take the last records of run %s within "
                    "%.0f s; the complete run is kept in %s — load it with `medseg db import %s`",
                    db.redact(self.url), self.run_id, time.monotonic() - started,
                    self.journal_root, self.journal_root)

    def _flush(self) -> bool:
        """Wait until the database holds everything (at most ``flush_timeout_s``)."""
        deadline = time.monotonic() + self.flush_timeout_s
        try:
            with self._synced:
                while not self._everything_delivered() and time.monotonic() < deadline:
                    self._wake.set()
                    self._synced.wait(min(1.0, max(deadline - time.monotonic(), 0.01)))
                delivered = self._everything_delivered()
        except KeyboardInterrupt:
            delivered = False
        self._stopping.set()
        self._wake.set()
        self._worker.join(timeout=10)
        return delivered

    # ------------------------------------------------------------------ delivery
    def _everything_delivered(self) -> bool:
        return (not self._uploads and self._saved_version == self._entry_version
                and all(self._delivered.get(name) == (len(s), s.generation)
                        for name, s in self._series.items()))

    def _work(self) -> None:
        while not self._stopping.is_set():
            self._wake.wait(self.sync_interval_s)
            self._wake.clear()
            delivered = self._sync()
            with self._synced:
                self._synced.notify_all()
            if not delivered:
                self._stopping.wait(self.retry_interval_s)

    def _sync(self) -> bool:
        from pymongo.errors import PyMongoError

        try:
            self._upload_artifacts()
            self._deliver_metrics()
            self._save_entry()
            self._delete_superseded()
        except (PyMongoError, OSError) as error:
            if self._failing_since is None:
                self._failing_since = time.monotonic()
                log.warning("tracking: MongoDB at %s does not answer (%s); run %s goes on, its "
                            "records wait in %s and are sent when it answers again",
                            db.redact(self.url), type(error).__name__, self.run_id,
                            self.journal_root)
            return False
        if self._failing_since is not None:
            log.info("tracking: MongoDB answers again after %.0f s; run %s is up to date there",
                     time.monotonic() - self._failing_since, self.run_id)
            self._failing_since = None
        return True

    def _upload_artifacts(self) -> None:
        while True:
            with self._lock:
                if not self._uploads:
                    return
                upload = self._uploads[0]
            if upload.attempted:  # a write cut off half way may have left chunks behind
                self._fs.delete(upload.file_id)
            upload.attempted = True
            with open(upload.path, "rb") as handle:
                self._fs.put(handle, _id=upload.file_id, content_type=upload.content_type,
                             filename=f"artifact://runs/{self.run_id}/{upload.name}",
                             metadata=upload.metadata)
            with self._lock:
                if upload in self._uploads:
                    self._uploads.remove(upload)
                artifacts = self._entry["artifacts"]
                self._superseded += [a["file_id"] for a in artifacts if a["name"] == upload.name]
                self._entry["artifacts"] = [a for a in artifacts if a["name"] != upload.name] + [
                    {"name": upload.name, "file_id": upload.file_id}]
                self._entry_version += 1

    def _deliver_metrics(self) -> None:
        from bson import ObjectId

        with self._lock:
            due = {name: (len(s), s.generation, s.as_document()) for name, s in self._series.items()
                   if self._delivered.get(name) != (len(s), s.generation)}
            for name in due:
                if name not in self._metric_ids:
                    self._metric_ids[name] = ObjectId()
                    self._entry_version += 1  # info.metrics gains an entry
        for name, (count, generation, points) in due.items():
            delivered, delivered_generation = self._delivered.get(name, (0, None))
            self._delivered[name] = (None, generation)  # unknown until this write is confirmed
            key = {"_id": self._metric_ids[name]}
            if delivered and delivered_generation == generation and delivered < count:
                self._metrics.update_one(key, {"$push": {
                    field: {"$each": points[field][delivered:]} for field in points}})
            else:
                self._metrics.replace_one(key, {"run_id": self.run_id, "name": name, **points},
                                          upsert=True)
            self._delivered[name] = (count, generation)

    def _save_entry(self) -> None:
        with self._lock:
            if self._saved_version == self._entry_version:
                return
            version = self._entry_version
            document = {key: value for key, value in self._entry.items() if key != "_id"}
            references = [{"name": name, "id": str(object_id)}
                          for name, object_id in self._metric_ids.items()]
            document["info"] = {**document.get("info", {}), "metrics": references}
        self._runs.update_one({"_id": self.run_id}, {"$set": _storable(document)})
        with self._lock:
            self._saved_version = max(self._saved_version, version)

    def _delete_superseded(self) -> None:
        while self._superseded:
            self._fs.delete(self._superseded[0])
            self._superseded.pop(0)


def _recent(moment: datetime | None) -> bool:
    return moment is not None and datetime.utcnow() - moment < STILL_RUNNING


def _read_json(path: Path) -> dict:
    try:
        value = json.loads(path.read_text())
    except (OSError, ValueError):
        return {}
    return value if isinstance(value, dict) else {}


def _remove_if_empty(directory: Path) -> None:
    try:
        directory.rmdir()
    except OSError:
        pass


def _storable(document: dict) -> dict:
    """The run document made encodable and kept under the size limit: the captured output
    is cut to its tail, then the largest ``info`` entries are left out, each with a note."""
    import bson
    from sacred.observers.mongo import force_bson_encodeable

    try:
        size = len(bson.encode(document))
    except bson.errors.InvalidDocument:
        document = force_bson_encodeable(document)
        size = len(bson.encode(document))
    if size <= DOCUMENT_LIMIT:
        return document
    log.warning("tracking: the run document would take %.1f MB; storing the tail of the "
                "captured output and leaving out the largest info entries", size / 2**20)
    document = dict(document, captured_out=document.get("captured_out", "")[-1_000_000:])
    info = dict(document.get("info", {}))
    by_size = sorted((k for k in info if k != "metrics"),
                     key=lambda k: len(bson.encode({"v": info[k]})), reverse=True)
    for key in by_size:
        if len(bson.encode(dict(document, info=info))) <= DOCUMENT_LIMIT:
            break
        size = len(bson.encode({"v": info[key]}))
        info[key] = f"(left out: {size} bytes, too large for the run document)"
    return dict(document, info=info)
