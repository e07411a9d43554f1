"""Real SADAAN runs that fail (in the test process, to plant the exception), or that find
no database and are loaded later with `medseg db import`. test_recorded_runs.py checks the
completed, interrupted and resumed ones."""

import ast
import importlib.util
import json
import re

import pytest

from tests.tracking.support import (SADAAN, environment, medseg_cli, run_experiment,
                                    sadaan_updates)

pytestmark = pytest.mark.slow


def python_value(text: str):
    """A command-line value as Sacred reads it: a Python literal, else a string."""
    try:
        return ast.literal_eval(text)
    except (ValueError, SyntaxError):
        return text


def load_sadaan_module():
    spec = importlib.util.spec_from_file_location("sadaan_in_process", SADAAN)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_failed_run_keeps_what_happened_before_the_exception(tmp_path, database, sadaan_data,
                                                             monkeypatch):
    """In the test process, so that an exception can be planted in the second validation."""
    from medseg.tasks.sadaan import SADAANTask

    validate = SADAANTask.validate
    calls = []

    def failing_validate(self, *args, **kwargs):
        calls.append(1)
        if len(calls) == 2:
            raise RuntimeError("validation hit a corrupt case")
        return validate(self, *args, **kwargs)

    monkeypatch.setattr(SADAANTask, "validate", failing_validate)
    monkeypatch.setenv("MEDSEG_MONGO_URL", database.url)
    monkeypatch.chdir(tmp_path)
    updates = dict(update.split("=", 1) for update in sadaan_updates(
        sadaan_data, database, "training.num_epochs=3"))
    updates = {key: python_value(value) for key, value in updates.items()}
    experiment = load_sadaan_module().ex
    with pytest.raises(RuntimeError, match="corrupt case"):
        experiment.run(config_updates=updates, options={"--capture": "sys"})

    run = database.run(1)
    assert run["status"] == "FAILED"
    assert "validation hit a corrupt case" in run["fail_trace"][-1]
    metrics = database.metrics(1)
    assert metrics["val_dice"]["steps"] == [1]
    assert metrics["train_loss"]["steps"] == list(range(1, 9))  # epoch 2 trained, then failed
    assert run["info"]["best_epoch"] == 1


def test_unreachable_database_then_import_shows_the_run_like_any_other(tmp_path, database,
                                                                       sadaan_data):
    from incense import ExperimentLoader

    from medseg import db

    dead = f"mongodb://127.0.0.1:{db.free_port()}"
    done = run_experiment(SADAAN, *sadaan_updates(sadaan_data, database, "training.num_epochs=2",
                                                  "logging.visualize_predictions=True",
                                                  "tracking.max_artifact_mb=0.001"),
                          cwd=tmp_path, env=environment(MEDSEG_MONGO_URL=dead))
    assert done.returncode == 0, done.output
    said = [line for line in done.output.splitlines() if "MongoDB" in line]
    assert said == [f"WARNING - medseg - tracking: no MongoDB answers at {dead} (from "
                    "MEDSEG_MONGO_URL); recording this run in sacred_runs/ instead (`medseg db "
                    "import sacred_runs` loads it into MongoDB later)"]
    local = tmp_path / "sacred_runs" / "1"
    local_metrics = json.loads((local / "metrics.json").read_text())

    loaded = medseg_cli("db", "import", "sacred_runs", "--url", database.url, "--db-name",
                        database.name, cwd=tmp_path)
    assert loaded.returncode == 0, loaded.output
    assert re.search(r"sacred_runs/1: imported as run 1 \(COMPLETED, \d+ metrics, \d+ artifacts\)",
                     loaded.stdout)
    run = database.run(1)
    assert run["status"] == "COMPLETED"
    assert run["config"] == json.loads((local / "config.json").read_text())
    assert run["captured_out"] == (local / "cout.txt").read_text()
    assert {name for name, _ in run["experiment"]["sources"]} >= {"sadaan.py"}
    metrics = database.metrics(1)
    assert set(metrics) == set(local_metrics)
    assert metrics["val_dice"]["values"] == local_metrics["val_dice"]["values"]
    assert database.artifact_bytes(1, "predictions_epoch_002.png") == (
        local / "predictions_epoch_002.png").read_bytes()
    # tracking.max_artifact_mb: checkpoints over the limit are recorded by path only.
    assert set(run["info"]["checkpoint_paths"]) == {"best_model", "last_model"}
    assert not any(a["name"].endswith(".pth") for a in run["artifacts"])

    experiment = ExperimentLoader(mongo_uri=database.url, db_name=database.name).find_by_id(1)
    assert list(experiment.metrics["val_dice"].index) == [1, 2]
    assert experiment.artifacts["training_curves.png"].content == (
        local / "training_curves.png").read_bytes()

    again = medseg_cli("db", "import", "sacred_runs", "--url", database.url, "--db-name",
                       database.name, cwd=tmp_path)
    assert "sacred_runs/1: already imported as run 1" in again.stdout
    assert database.db.runs.count_documents({}) == 1
