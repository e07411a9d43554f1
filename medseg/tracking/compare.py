"""Side-by-side comparison of recorded runs: what config differs, and how the metrics ended.

Runs come from MongoDB (by id) or from file-observer folders (by path), as
:class:`RunSummary` objects, so ``medseg runs compare 3 7 sacred_runs/2`` mixes both.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

from medseg.errors import DataError
from medseg.tracking.rundir import parse_time, read_run


@dataclass
class RunSummary:
    label: str
    experiment: str
    command: str
    status: str
    start_time: datetime | None
    stop_time: datetime | None
    config: dict[str, Any]
    info: dict[str, Any]
    result: Any
    #: metric name -> (steps, values)
    metrics: dict[str, tuple[list[int], list[float]]] = field(default_factory=dict)
    comment: str | None = None
    experiment_info: dict[str, Any] = field(default_factory=dict)
    meta: dict[str, Any] = field(default_factory=dict)


def flatten_config(config: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    """``{"training": {"batch_size": 2}}`` -> ``{"training.batch_size": 2}``."""
    flat = {}
    for key, value in config.items():
        name = f"{prefix}{key}"
        if isinstance(value, Mapping) and value:
            flat.update(flatten_config(value, f"{name}."))
        else:
            flat[name] = value
    return flat


def config_changes(before: Mapping[str, Any],
                   after: Mapping[str, Any]) -> dict[str, tuple[Any, Any]]:
    """Entries whose value differs, as ``key -> (before, after)`` (missing -> None)."""
    old, new = flatten_config(before), flatten_config(after)
    return {key: (old.get(key), new.get(key)) for key in sorted(set(old) | set(new))
            if old.get(key) != new.get(key)}


def summary_from_document(document: Mapping[str, Any],
                          metrics: Sequence[Mapping[str, Any]]) -> RunSummary:
    meta = document.get("meta") or {}
    return RunSummary(
        label=f"run {document['_id']}", experiment=document.get("experiment", {}).get("name", "?"),
        command=document.get("command") or meta.get("command") or "main",
        status=document.get("status", "?"), start_time=document.get("start_time"),
        stop_time=document.get("stop_time") or document.get("heartbeat"),
        config=document.get("config", {}), info=document.get("info", {}),
        result=document.get("result"),
        metrics={m["name"]: (list(m["steps"]), list(m["values"])) for m in metrics},
        comment=meta.get("comment"), experiment_info=document.get("experiment", {}), meta=meta)


def summary_from_folder(path: str | Path) -> RunSummary:
    stored = read_run(path)
    run = stored.run
    return RunSummary(
        label=str(path), experiment=run.get("experiment", {}).get("name", "?"),
        command=run.get("command") or "main", status=run.get("status", "?"),
        start_time=stored.start_time,
        stop_time=parse_time(run.get("stop_time")) or parse_time(run.get("heartbeat")),
        config=stored.config, info=stored.info, result=run.get("result"),
        metrics={name: (s.steps, s.values) for name, s in stored.metrics.items()},
        comment=(run.get("meta") or {}).get("comment"), experiment_info=run.get("experiment", {}),
        meta=run.get("meta") or {})


def load_summaries(references: Sequence[str], database_factory) -> list[RunSummary]:
    """Each reference is a database run id or a file-observer run folder; the database is
    only opened (``database_factory()``) when an id is given."""
    summaries, database = [], None
    for reference in references:
        if reference.isdigit():
            database = database if database is not None else database_factory()
            document = database["runs"].find_one({"_id": int(reference)})
            if document is None:
                raise DataError(f"there is no run {reference} in database {database.name!r}")
            metrics = list(database["metrics"].find({"run_id": int(reference)}))
            summaries.append(summary_from_document(document, metrics))
        elif Path(reference).exists():
            summaries.append(summary_from_folder(reference))
        else:
            raise DataError(f"{reference!r} is neither a run id nor a file-observer run folder")
    return summaries


def _show(value: Any) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return "nan" if math.isnan(value) else f"{value:.4g}"
    return str(value)


def _duration(summary: RunSummary) -> str:
    if summary.start_time is None or summary.stop_time is None:
        return "-"
    return str(summary.stop_time - summary.start_time).split(".")[0]


_HIGHER_IS_BETTER = ("dice", "iou", "accuracy", "auc", "precision", "recall", "f1")


def metric_direction(summary: RunSummary, name: str) -> str | None:
    """'max' or 'min' where "best" means something (the monitored metric, scores, losses),
    None for quantities such as the learning rate or memory."""
    if name == summary.info.get("monitor"):
        return summary.config.get("training", {}).get("monitor_mode")
    if any(word in name for word in _HIGHER_IS_BETTER):
        return "max"
    if "loss" in name:
        return "min"
    return None


def _best(summary: RunSummary, name: str) -> float | None:
    values = [v for v in summary.metrics[name][1] if not math.isnan(v)]
    direction = metric_direction(summary, name)
    if not values or direction is None:
        return None
    return max(values) if direction == "max" else min(values)


def compare_table(summaries: Sequence[RunSummary], *, all_config: bool = False) -> str:
    """A text table: one column per run; header facts, the config entries that differ (all
    with ``all_config``), then each metric's last and best value."""
    flat = [flatten_config(s.config) for s in summaries]
    keys = sorted(set().union(*flat))
    differing = [k for k in keys if all_config or len({repr(f.get(k)) for f in flat}) > 1]
    rows: list[tuple[str, list[str]]] = [
        ("experiment", [s.experiment for s in summaries]),
        ("command", [s.command for s in summaries]),
        ("status", [s.status for s in summaries]),
        ("started", [f"{s.start_time:%Y-%m-%d %H:%M}" if s.start_time else "-"
                     for s in summaries]),
        ("duration", [_duration(s) for s in summaries]),
        ("comment", [s.comment or "-" for s in summaries]),
        ("best_epoch", [_show(s.info.get("best_epoch")) for s in summaries]),
        ("best_metric", [_show(s.info.get("best_metric")) for s in summaries]),
    ]
    title = "config (all entries)" if all_config else "config (entries that differ)"
    rows.append((title, [""] * len(summaries)))
    rows += [(f"  {key}", [_show(f.get(key)) for f in flat]) for key in differing]
    if not differing:
        rows.append(("  (none)", [""] * len(summaries)))
    metric_names = sorted(set().union(*(s.metrics for s in summaries)))
    rows.append(("metrics (last / best)", [""] * len(summaries)))
    for name in metric_names:
        cells = []
        for s in summaries:
            if name in s.metrics and s.metrics[name][1]:
                cells.append(f"{_show(s.metrics[name][1][-1])} / {_show(_best(s, name))}")
            else:
                cells.append("-")
        rows.append((f"  {name}", cells))
    return _render(["", *[s.label for s in summaries]], rows)


def _render(header: list[str], rows: list[tuple[str, list[str]]]) -> str:
    table = [header, *[[name, *cells] for name, cells in rows]]
    widths = [max(len(row[i]) for row in table) for i in range(len(header))]
    return "\n".join("  ".join(cell.ljust(width) for cell, width in zip(row, widths)).rstrip()
                     for row in table)
