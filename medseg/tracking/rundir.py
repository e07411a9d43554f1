"""Runs recorded by a file observer (Sacred's ``FileStorageObserver`` layout).

A run folder holds ``run.json``, ``config.json``, ``info.json``, ``metrics.json``,
``cout.txt`` and one file per artifact; the sources it names live in ``_sources/`` of the
folder above. medseg writes the same layout when no database answers, and keeps a run in it
while the database is away (then ``medseg_sync.json`` says which database run it completes).
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

from medseg.errors import DataError

SYNC_MARKER = "medseg_sync.json"


@dataclass
class Series:
    steps: list[int]
    values: list[float]
    timestamps: list[datetime]


@dataclass
class StoredRun:
    path: Path
    run: dict[str, Any]
    config: dict[str, Any]
    info: dict[str, Any]
    captured_out: str
    metrics: dict[str, Series]
    #: ``(name, file)``; ``file`` is None when the artifact is missing from the folder.
    artifacts: list[tuple[str, Path | None]]
    sources: list[tuple[str, Path | None]]
    sync: dict[str, Any] | None = None
    problems: list[str] = field(default_factory=list)

    @property
    def start_time(self) -> datetime | None:
        return parse_time(self.run.get("start_time"))


def parse_time(value: Any) -> datetime | None:
    if value is None or isinstance(value, datetime):
        return value
    try:
        return datetime.fromisoformat(str(value))
    except ValueError:
        return None


def find_runs(path: str | Path) -> list[Path]:
    """The run folders at ``path``: the folder itself, or its numbered sub-folders."""
    path = Path(path)
    if not path.exists():
        raise DataError(f"{path} does not exist; expected a file-observer run folder "
                        "(with run.json) or a folder of them")
    if (path / "run.json").is_file():
        return [path]
    if path.is_dir():
        found = [child for child in path.iterdir()
                 if child.is_dir() and (child / "run.json").is_file()]
        found += [run for child in path.iterdir() if child.is_dir() and child.name == "unsynced"
                  for pending in sorted(child.iterdir()) if pending.is_dir()
                  for run in find_runs_in(pending)]
        if found:
            return sorted(found, key=_run_order)
    raise DataError(f"{path} holds no file-observer run: expected run.json in it or in its "
                    "sub-folders")


def find_runs_in(path: Path) -> list[Path]:
    return [child for child in path.iterdir() if child.is_dir() and (child / "run.json").is_file()]


def _run_order(path: Path) -> tuple[int, int, str]:
    pending = path.parent.parent.name == "unsynced"
    return (1 if pending else 0, int(path.name) if path.name.isdigit() else 0, str(path))


def read_run(path: str | Path) -> StoredRun:
    path = Path(path)
    run = _read_json(path / "run.json", required=True)
    problems = []
    metrics = {}
    for name, data in _read_json(path / "metrics.json", default={}).items():
        try:
            metrics[name] = Series([int(s) for s in data["steps"]],
                                   [float(v) for v in data["values"]],
                                   [parse_time(t) for t in data["timestamps"]])
        except (KeyError, TypeError, ValueError):
            problems.append(f"metric {name!r} in {path / 'metrics.json'} is malformed; left out")
    artifacts = []
    for name in run.get("artifacts", []):
        file = path / name
        artifacts.append((name, file if file.is_file() else None))
        if not file.is_file():
            problems.append(f"artifact {name!r} is listed in run.json but {file} is missing")
    sources = []
    for name, stored in run.get("experiment", {}).get("sources", []):
        file = (path.parent / stored) if isinstance(stored, str) else None
        sources.append((name, file if file is not None and file.is_file() else None))
    cout = path / "cout.txt"
    return StoredRun(
        path=path, run=run, config=_read_json(path / "config.json", default={}),
        info=_read_json(path / "info.json", default={}),
        captured_out=cout.read_text(errors="replace") if cout.is_file() else "",
        metrics=metrics, artifacts=artifacts, sources=sources,
        sync=_read_json(path / SYNC_MARKER, default=None), problems=problems)


def _read_json(path: Path, *, required: bool = False, default: Any = None) -> Any:
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        if required:
            raise DataError(f"{path} is missing; not a file-observer run folder") from None
        return default
    except (OSError, ValueError) as error:
        raise DataError(f"{path} cannot be read as JSON ({error})") from None
