"""Real SADAAN runs against the real server: completed, failed, interrupted and resumed runs
hold the config of every ingredient, every metric point, the artifacts in GridFS, the
captured output and the info; runs recorded to files while the database was unreachable
load with `medseg db import`; `medseg runs rerun` and `compare` work on them."""

import ast
import importlib.util
import json
import re

import gridfs
import pytest

from medseg.engine.checkpoint import load_checkpoint
from tests.tracking.support import (SADAAN, environment, medseg_cli, run_experiment,
                                    sadaan_updates)

pytestmark = [pytest.mark.slow, pytest.mark.xdist_group("recorded_runs")]

INGREDIENTS = ["dataset", "model", "loss_weights", "augmentation", "optimizer", "checkpoint",
               "training", "logging", "tracking"]


def test_completed_run_holds_config_metrics_artifacts_output_and_info(recorded_runs):
    database, run_id = recorded_runs.database, recorded_runs.completed
    run = database.run(run_id)
    assert run["status"] == "COMPLETED"
    assert set(INGREDIENTS) <= set(run["config"])
    assert run["config"]["training"]["num_epochs"] == 2
    assert run["config"]["model"]["base_channels"] == 4
    assert run["config"]["tags"] == ["baseline", "tiny"]
    assert run["meta"]["comment"] == "first baseline"
    assert "sadaan.py" in [name for name, _ in run["experiment"]["sources"]]

    metrics = database.metrics(run_id)
    history = load_checkpoint(recorded_runs.workdir / "checkpoints" / "sadaan" / str(run_id)
                              / "last_model.pth")["history"]
    assert metrics["val_dice"]["steps"] == [1, 2]
    assert metrics["val_dice"]["values"] == pytest.approx([h["val_dice"] for h in history])
    assert metrics["train_loss"]["steps"] == list(range(1, 9))  # 4 steps an epoch, all logged
    assert metrics["rss_mb"]["steps"] == [1, 2]
    assert metrics["test_dice"]["steps"] == [0]
    assert {m["name"] for m in run["info"]["metrics"]} == set(metrics)

    names = [a["name"] for a in run["artifacts"]]
    for expected in ["predictions_epoch_001.png", "predictions_epoch_002.png",
                     "training_curves.png", "best_model.pth", "test_metrics.json"]:
        assert expected in names
    local = recorded_runs.workdir / "checkpoints" / "sadaan" / str(run_id)
    assert database.artifact_bytes(run_id, "predictions_epoch_002.png") == (
        local / "predictions_epoch_002.png").read_bytes()
    files = gridfs.GridFS(database.db)
    png = next(a for a in run["artifacts"] if a["name"] == "training_curves.png")
    assert files.get(png["file_id"]).content_type == "image/png"

    assert "epoch 2/2" in run["captured_out"] and "\r" not in run["captured_out"]
    assert run["info"]["best_epoch"] == run["result"]["best_epoch"]
    assert run["info"]["best_metric"] == pytest.approx(max(metrics["val_dice"]["values"]))
    assert run["info"]["model"]["parameters"] > 0
    assert run["info"]["dataset"]["path"] == str(recorded_runs.data)


def test_interrupted_run_is_recorded_then_resumed_in_the_same_run(recorded_runs):
    database = recorded_runs.database
    interrupted = recorded_runs.interrupted_document
    assert interrupted["status"] == "INTERRUPTED"
    assert recorded_runs.interrupted_val_steps[0] == 1
    assert recorded_runs.resumed == interrupted["_id"]
    assert "Started run with ID" in recorded_runs.outputs["resumed"]

    run = database.run(recorded_runs.resumed)
    metrics = database.metrics(recorded_runs.resumed)
    assert run["status"] == "COMPLETED"
    assert run["start_time"] == interrupted["start_time"]
    # One series per metric, each epoch and each step once: what omniboard plots as one line.
    assert database.db.metrics.count_documents({"run_id": run["_id"], "name": "val_dice"}) == 1
    assert metrics["val_dice"]["steps"] == [1, 2, 3]
    assert metrics["train_loss"]["steps"] == list(range(1, 13))
    [resume] = run["info"]["resumes"]
    assert resume["checkpoint"] == str(recorded_runs.resume_checkpoint)
    assert resume["previous_status"] == "INTERRUPTED"
    changed = {c["key"]: (c["before"], c["after"]) for c in resume["config_changes"]}
    assert changed["training.num_epochs"] == (30, 3)
    assert run["info"]["resumed_from"]["run"]["run_id"] == run["_id"]
    out = run["captured_out"]
    assert out.index(f'Started run with ID "{run["_id"]}"') < out.index("[medseg: resumed") < (
        out.index("epoch 3/3"))
    assert [a["name"] for a in run["artifacts"]].count("training_curves.png") == 1
    assert database.artifact_bytes(run["_id"], "training_curves.png").startswith(b"\x89PNG")


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


def test_rerun_repeats_a_run_with_its_exact_config(recorded_runs, tmp_path):
    database, original = recorded_runs.database, recorded_runs.completed
    env = environment(MEDSEG_MONGO_URL=database.url)
    rerun = medseg_cli("runs", "rerun", str(original), "--db-name", database.name, cwd=tmp_path,
                       env=env)
    assert rerun.returncode == 0, rerun.output[-3000:]
    assert rerun.stdout.startswith(f"re-running run {original} (sadaan main): (in "
                                   f"{recorded_runs.workdir}) ")
    new_id = rerun.started_id()
    first, second = database.run(original), database.run(new_id)
    assert second["config"] == first["config"]
    assert second["meta"]["comment"] == f"rerun of run {original}"
    before, after = database.metrics(original), database.metrics(new_id)
    assert after["val_dice"]["values"] == pytest.approx(before["val_dice"]["values"], rel=1e-5)
    assert after["train_loss"]["values"] == pytest.approx(before["train_loss"]["values"], rel=1e-5)

    same = medseg_cli("runs", "compare", str(original), str(new_id), "--db-name", database.name,
                      env=env)
    assert same.returncode == 0, same.output
    assert re.search(r"config \(entries that differ\)\s*\n\s+\(none\)", same.stdout)
    different = medseg_cli("runs", "compare", str(original), str(recorded_runs.resumed),
                           "--db-name", database.name, env=env)
    rows = {line.split()[0]: line.split()[1:]
            for line in different.stdout.splitlines() if line.strip()}
    assert rows["training.num_epochs"] == ["2", "3"]
    assert rows["status"] == ["COMPLETED", "COMPLETED"]
    last, _, best = rows["val_dice"][:3]  # "last / best" of the first run
    values = database.metrics(original)["val_dice"]["values"]
    assert float(last) == pytest.approx(values[-1], rel=1e-3)
    assert float(best) == pytest.approx(max(values), rel=1e-3)
