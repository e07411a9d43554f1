"""Helpers shared by the test suites (tests/ is on pytest's python path)."""

from __future__ import annotations

import copy
import importlib
import json
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def load_experiment(name: str):
    """The module ``experiments/<name>.py``, imported as ``experiments.<name>`` (the same
    module object a test gets with ``from experiments import <name>``)."""
    return importlib.import_module(f"experiments.{name}")


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


def shared_tracking_entry(key: str) -> bool:
    """Entries of the shared tracking ingredient (and ``tags``), whose effects
    tests/tracking/test_tracking_config.py shows once for every experiment, and
    ``training.distributed_backend`` and ``training.distributed_timeout``, shown once by
    tests/experiments/test_ddp.py (they matter only under torchrun)."""
    return key.startswith("tracking.") or key in ("tags", "training.distributed_backend",
                                                  "training.distributed_timeout")


_PROGRESS_BAR = re.compile(r"\| *\d+/\d+ \[[\d:]+<[\d:?]+")


def shows_progress_bar(text: str) -> bool:
    """Whether ``text`` holds a tqdm bar's counter and times (``| 4/4 [00:04<00:00``), with
    or without a rate and postfix after them."""
    return _PROGRESS_BAR.search(text) is not None


def nested(dotted: dict) -> dict:
    """``{"a.b": 1}`` -> ``{"a": {"b": 1}}``, merged."""
    result: dict = {}
    for key, value in dotted.items():
        *sections, name = key.split(".")
        node = result
        for section in sections:
            node = node.setdefault(section, {})
        node[name] = value
    return result


def flatten(config: dict, prefix: str = "") -> list[str]:
    """The dotted keys of a nested config's leaves."""
    keys = []
    for name, value in config.items():
        if isinstance(value, dict):
            keys += flatten(value, f"{prefix}{name}.")
        else:
            keys.append(f"{prefix}{name}")
    return keys


def add_effect_probe(ex) -> dict:
    """Give ``ex`` a test-only command ``effect_probe`` that returns
    ``probe["function"](_config)`` inside a run (so captured factories see the config), and
    return that ``probe`` dict."""
    probe: dict = {}

    @ex.command(unobserved=True)
    def effect_probe(_config):
        return probe["function"](_config)

    return probe


def substitute(value, tmp, substitutions: dict):
    """A string config value with its placeholders (``CHECKPOINT_1`` ...) and ``TMP`` (the
    test's folder) filled in; other values unchanged."""
    if isinstance(value, str):
        for placeholder, replacement in substitutions.items():
            value = value.replace(placeholder, str(replacement))
        return value.replace("TMP", str(tmp))
    return value


def schedule_observation(config) -> tuple:
    """The optimizer and the learning rate of every step over (at most) 8 epochs of 4 steps,
    as a run builds them for ``config``; the monitored metric never improves (so a plateau
    schedule reduces)."""
    import torch

    from ingredients.optimizer import optimizer_settings
    from medseg.engine.fit import make_optimization

    net = torch.nn.Linear(2, 2)
    training = config["training"]
    optimizer, schedule = make_optimization(net.parameters(), optimizer_settings(config),
                                            num_epochs=training["num_epochs"], steps_per_epoch=4,
                                            monitor_mode=training["monitor_mode"])
    lrs = []
    for _ in range(min(training["num_epochs"], 8)):
        for _ in range(4):
            net(torch.ones(1, 2)).sum().backward()
            optimizer.step()
            schedule.after_optimizer_step()
            lrs.append(round(schedule.current_lr(), 10))
        schedule.after_epoch(1.0)
    group = optimizer.param_groups[0]
    return type(optimizer).__name__, group.get("weight_decay"), group.get("momentum"), lrs
