"""``medseg db import``: load file-observer runs into MongoDB as Sacred's MongoObserver
would have stored them (run document, metrics collection, artifacts and sources in GridFS),
so omniboard, sacredboard and incense show them like any other run.

Importing is safe to repeat: a run already imported is skipped, and an import cut off half
way is finished by the next one. A run kept locally while its database was away
(``medseg_sync.json``) completes its database run instead of becoming a new one.

A run whose process was killed (``kill -9``, a machine going down) never recorded its end: it
stays RUNNING in its files, with a heartbeat that stopped. Once that heartbeat is older than
:data:`STILL_RUNNING`, it is imported as FAILED, stopped at its last heartbeat, with a
``fail_trace`` saying so.
"""

from __future__ import annotations

import hashlib
import mimetypes
import socket
from dataclasses import dataclass
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any

from medseg.tracking.rundir import StoredRun, find_runs, parse_time, read_run

#: A run whose heartbeat is more recent than this may still be running.
STILL_RUNNING = timedelta(minutes=2)
FORMAT = "MongoObserver-0.7.0"


@dataclass
class ImportResult:
    path: Path
    run_id: int | None
    action: str  # "imported", "completed", "skipped"
    detail: str

    def line(self) -> str:
        return f"{self.path}: {self.detail}"


def import_path(path: str | Path, database) -> list[ImportResult]:
    """Import every run at ``path`` (a run folder or a folder of them) into ``database``."""
    return [import_run(read_run(run_path), database) for run_path in find_runs(path)]


def import_run(stored: StoredRun, database) -> ImportResult:
    if _may_still_run(stored):
        return ImportResult(stored.path, None, "skipped",
                            "still running (recent heartbeat); import it after it ends")
    runs = database["runs"]
    target = _database_run_it_completes(stored, database)
    key = import_key(stored)
    if target is not None and runs.find_one({"_id": target, "meta.medseg_import.key": key}):
        return ImportResult(stored.path, target, "skipped",
                            f"already imported into database run {target}")
    if target is None:
        earlier = runs.find_one({"meta.medseg_import.key": key}, {"meta.medseg_import": 1})
        if earlier is not None and not earlier["meta"]["medseg_import"].get("incomplete"):
            return ImportResult(stored.path, earlier["_id"], "skipped",
                                f"already imported as run {earlier['_id']}")
        run_id = earlier["_id"] if earlier is not None else _reserve_id(runs, stored, key)
        action = "imported"
    else:
        run_id, action = target, "completed"
    counts = _write(stored, database, run_id, keep_existing=target is not None)
    if target is None:
        runs.update_one({"_id": run_id}, {"$unset": {"meta.medseg_import.incomplete": ""}})
    else:  # marked last: an import cut off before this point is done again
        runs.update_one({"_id": run_id}, {"$set": {"meta.medseg_import": {
            "key": key, "source": str(stored.path.resolve())}}})
    status = _run_document(stored)["status"]
    if _died(stored):
        status += f": its process died after its last heartbeat, {_last_heartbeat(stored)} UTC"
    verb = "imported as run" if action == "imported" else "completed database run"
    notes = "".join(f"; {problem}" for problem in stored.problems)
    detail = f"{verb} {run_id} ({status}, {counts[0]} metrics, {counts[1]} artifacts){notes}"
    return ImportResult(stored.path, run_id, action, detail)


def import_key(stored: StoredRun) -> str:
    """Identifies a run folder across imports: machine, folder and start time."""
    text = f"{socket.gethostname()}|{stored.path.resolve()}|{stored.run.get('start_time')}"
    return hashlib.sha1(text.encode()).hexdigest()


def _last_heartbeat(stored: StoredRun) -> datetime | None:
    return parse_time(stored.run.get("heartbeat")) or stored.start_time


def _may_still_run(stored: StoredRun) -> bool:
    if stored.run.get("status") not in ("RUNNING", "QUEUED"):
        return False
    heartbeat = _last_heartbeat(stored)
    return heartbeat is not None and datetime.utcnow() - heartbeat < STILL_RUNNING


def _died(stored: StoredRun) -> bool:
    """Whether the run's process ended without recording an end (it was killed)."""
    return stored.run.get("status") in ("RUNNING", "QUEUED") and not _may_still_run(stored)


def _database_run_it_completes(stored: StoredRun, database) -> int | None:
    sync = stored.sync
    if not sync or sync.get("db_name") != database.name:
        return None
    doc = database["runs"].find_one({"_id": sync["run_id"]}, {"start_time": 1})
    if doc is None or not _same_moment(doc.get("start_time"), parse_time(sync.get("start_time"))):
        return None
    return sync["run_id"]


def _same_moment(a: datetime | None, b: datetime | None) -> bool:
    return a is not None and b is not None and abs(a - b) < timedelta(milliseconds=2)


def _reserve_id(runs, stored: StoredRun, key: str) -> int:
    """Insert the run document under the next free id, marked incomplete until its metrics
    and artifacts are in; a repeated import finds and finishes it."""
    import pymongo
    from pymongo.errors import DuplicateKeyError

    document = _run_document(stored)
    document["meta"] = {**document.get("meta", {}),
                        "medseg_import": {"key": key, "source": str(stored.path.resolve()),
                                          "incomplete": True}}
    while True:
        last = list(runs.find({}, {"_id": 1}).sort("_id", pymongo.DESCENDING).limit(1))
        document["_id"] = last[0]["_id"] + 1 if last else 1
        try:
            runs.insert_one(document)
            return document["_id"]
        except DuplicateKeyError:
            continue


def _run_document(stored: StoredRun) -> dict[str, Any]:
    run = stored.run
    document = {
        "experiment": {**run.get("experiment", {}), "sources": []},
        "format": FORMAT,
        "command": run.get("command"),
        "host": run.get("host", {}),
        "start_time": stored.start_time,
        "config": stored.config,
        "meta": run.get("meta", {}),
        "status": run.get("status", "UNKNOWN"),
        "resources": run.get("resources", []),
        "artifacts": [],
        "captured_out": stored.captured_out,
        "info": {k: v for k, v in stored.info.items() if k != "metrics"},
        "heartbeat": parse_time(run.get("heartbeat")),
    }
    for key in ("result", "fail_trace"):
        if key in run:
            document[key] = run[key]
    if run.get("stop_time"):
        document["stop_time"] = parse_time(run["stop_time"])
    if _died(stored):
        heartbeat = _last_heartbeat(stored)
        document.update(status="FAILED", stop_time=heartbeat, fail_trace=[
            f"medseg: the process of this run ended without recording how (killed, or its "
            f"machine went down); its last heartbeat was at {heartbeat} UTC. Imported from "
            f"{stored.path.resolve()} by `medseg db import`.\n"])
    return document


def _write(stored: StoredRun, database, run_id: int, *, keep_existing: bool) -> tuple[int, int]:
    """Make database run ``run_id`` hold everything in ``stored``; return the number of
    metrics and artifacts it then has."""
    import gridfs

    runs, fs = database["runs"], gridfs.GridFS(database)
    existing = runs.find_one({"_id": run_id}) or {}
    artifacts = _store_artifacts(stored, fs, run_id, existing.get("artifacts", []),
                                 (stored.sync or {}).get("prior_artifacts", []))
    metric_refs = [_store_metric(database["metrics"], run_id, name, series)
                   for name, series in sorted(stored.metrics.items())]
    update = _run_document(stored)
    update["artifacts"] = artifacts
    update["info"]["metrics"] = metric_refs
    if keep_existing:
        # The database run already has its sources and the meta it started with.
        del update["meta"]
        update["experiment"]["sources"] = existing.get("experiment", {}).get("sources", [])
    else:
        update["meta"]["medseg_import"] = existing.get("meta", {}).get("medseg_import", {})
        update["experiment"]["sources"] = _store_sources(stored, fs, existing)
    runs.update_one({"_id": run_id}, {"$set": update})
    _remove_unreferenced_artifacts(fs, run_id, stored, artifacts)
    return len(metric_refs), len(artifacts)


def _store_artifacts(stored: StoredRun, fs, run_id: int, in_database: list[dict],
                     prior: list[dict]) -> list[dict]:
    from bson import ObjectId

    local_names = {name for name, file in stored.artifacts if file is not None}
    result = [{"name": a["name"], "file_id": ObjectId(a["file_id"])} for a in prior
              if a["name"] not in local_names]
    present = {a["name"]: a["file_id"] for a in in_database}
    for name, file in stored.artifacts:
        if file is None:
            continue
        file_id = present.get(name)
        if file_id is None or not _same_size(fs, file_id, file):
            with open(file, "rb") as handle:
                file_id = fs.put(handle, filename=f"artifact://runs/{run_id}/{name}",
                                 content_type=mimetypes.guess_type(name)[0])
        result.append({"name": name, "file_id": file_id})
    return result


def _same_size(fs, file_id, path: Path) -> bool:
    stored = fs.find_one({"_id": file_id})
    return stored is not None and stored.length == path.stat().st_size


def _remove_unreferenced_artifacts(fs, run_id: int, stored: StoredRun, kept: list[dict]) -> None:
    """Files left by an import that was cut off, or replaced by a newer version."""
    keep = {a["file_id"] for a in kept}
    names = [f"artifact://runs/{run_id}/{name}" for name, _ in stored.artifacts]
    for grid_out in fs.find({"filename": {"$in": names}}):
        if grid_out._id not in keep:
            fs.delete(grid_out._id)


def _store_metric(metrics, run_id: int, name: str, series) -> dict[str, str]:
    document = {"run_id": run_id, "name": name, "steps": series.steps, "values": series.values,
                "timestamps": series.timestamps}
    metrics.replace_one({"run_id": run_id, "name": name}, document, upsert=True)
    stored = metrics.find_one({"run_id": run_id, "name": name}, {"_id": 1})
    return {"name": name, "id": str(stored["_id"])}


def _store_sources(stored: StoredRun, fs, existing: dict) -> list:
    already = existing.get("experiment", {}).get("sources") or []
    if already:
        return already
    base_dir = stored.run.get("experiment", {}).get("base_dir", "")
    sources = []
    for name, file in stored.sources:
        if file is None:
            continue
        with open(file, "rb") as handle:
            sources.append([name, fs.put(handle, filename=str(Path(base_dir) / name))])
    return sources
