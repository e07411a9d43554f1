"""Helpers shared by the test suites (tests/ is on pytest's python path)."""

from __future__ import annotations

import copy
import importlib.util
import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def load_experiment(name: str):
    """The module ``experiments/<name>.py`` (imported once per test process)."""
    module_name = f"medseg_experiment_{name}"
    if module_name not in sys.modules:
        spec = importlib.util.spec_from_file_location(module_name, ROOT / "experiments" / f"{name}.py")
        module = importlib.util.module_from_spec(spec)
        sys.modules[module_name] = module
        spec.loader.exec_module(module)
    return sys.modules[module_name]


def file_runs(directory: Path) -> list[dict]:
    """run.json of every run a file observer wrote under ``directory`` (none if absent)."""
    return [json.loads(p.read_text()) for p in sorted(Path(directory).glob("*/run.json"))]


def merge(base: dict, updates: dict) -> dict:
    """``base`` updated recursively with ``updates`` (config updates for ``ex.run``)."""
    merged = copy.deepcopy(base)
    for key, value in updates.items():
        if isinstance(value, dict) and isinstance(merged.get(key), dict):
            merged[key] = merge(merged[key], value)
        else:
            merged[key] = value
    return merged
