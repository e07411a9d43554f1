"""Real SADAAN runs recorded once against the real server (completed; interrupted, then
resumed from its checkpoint), then read back every way a user reads them: the database
itself (config of every ingredient, metrics, artifacts in GridFS, captured output, info),
`medseg runs rerun` and `compare`, omniboard, sacredboard and the incense notebooks.

One module, so that the runs are recorded once per test session (pytest runs a module's
tests in one worker: --dist loadfile)."""

import json
import re
import signal
import subprocess
import time
import urllib.error
import urllib.parse
import urllib.request
from dataclasses import dataclass
from pathlib import Path

import gridfs
import nbformat
import pytest
from nbclient import NotebookClient

from medseg import db
from medseg.engine.checkpoint import load_checkpoint
from medseg.tracking import omniboard
from tests.tracking.support import (REPO, SADAAN, Database, browser_page, environment,
                                    interrupt_when, medseg_cli, open_database, run_experiment,
                                    sadaan_updates, start_experiment, start_viewer)

pytestmark = pytest.mark.slow

INGREDIENTS = ["dataset", "model", "loss_weights", "augmentation", "optimizer", "checkpoint",
               "training", "logging", "tracking"]


@dataclass
class RecordedRuns:
    """Real SADAAN runs in one database: ``completed`` (2 epochs, prediction PNGs, tags,
    a comment) and ``resumed`` (interrupted during its training, then resumed from its last
    checkpoint to 3 epochs)."""

    database: Database
    workdir: Path
    data: Path
    completed: int
    resumed: int
    interrupted_document: dict
    interrupted_val_steps: list[int]
    resume_checkpoint: Path
    outputs: dict[str, str]


@pytest.fixture(scope="module")
def recorded_runs(mongo_server, sadaan_data, tmp_path_factory) -> RecordedRuns:
    database = open_database(mongo_server, "recorded_runs")
    workdir = tmp_path_factory.mktemp("recorded-runs")
    env = environment(MEDSEG_MONGO_URL=database.url)
    completed = run_experiment(
        SADAAN, *sadaan_updates(sadaan_data, database, "training.num_epochs=2",
                                "logging.visualize_predictions=True", 'tags=["baseline","tiny"]'),
        cwd=workdir, env=env, comment="first baseline")
    assert completed.returncode == 0, completed.output[-3000:]

    interrupted_updates = sadaan_updates(sadaan_data, database, "training.num_epochs=30",
                                         "checkpoint.save_frequency=1")
    process = start_experiment(SADAAN, *interrupted_updates, cwd=workdir, env=env)
    run_id = completed.started_id() + 1
    checkpoint = workdir / "checkpoints" / "sadaan" / str(run_id) / "last_model.pth"
    interrupt_when(process, checkpoint.exists)
    interrupted_output = process.communicate(timeout=300)[0]
    interrupted_document = database.run(run_id)
    interrupted_val_steps = database.metrics(run_id)["val_dice"]["steps"]

    resumed = run_experiment(
        SADAAN, *sadaan_updates(sadaan_data, database, "training.num_epochs=3",
                                "checkpoint.save_frequency=1", f"checkpoint.resume={checkpoint}"),
        cwd=workdir, env=env)
    assert resumed.returncode == 0, resumed.output[-3000:]
    return RecordedRuns(database, workdir, sadaan_data, completed.started_id(),
                        resumed.started_id(), interrupted_document, interrupted_val_steps,
                        checkpoint, {"completed": completed.output,
                                     "interrupted": interrupted_output,
                                     "resumed": resumed.output})


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


def test_rerun_repeats_a_run_with_its_exact_config(recorded_runs, tmp_path):
    database, original = recorded_runs.database, recorded_runs.completed
    env = environment(MEDSEG_MONGO_URL=database.url)
    rerun = medseg_cli("runs", "rerun", str(original), "--db-name", database.name, cwd=tmp_path,
                       env=env)
    assert rerun.returncode == 0, rerun.output[-3000:]
    assert rerun.stdout.startswith(f"re-running run {original} (sadaan main) with its stored "
                                   f"config:\ncd {recorded_runs.workdir} && ")
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


def get(url: str, timeout: float = 10):
    with urllib.request.urlopen(url, timeout=timeout) as response:
        body = response.read()
    return json.loads(body) if response.headers.get_content_type() == "application/json" else body


def wait_for(url: str, process: subprocess.Popen, log: Path, timeout: float = 300):
    deadline = time.monotonic() + timeout
    while True:
        try:
            return get(url)
        except (urllib.error.URLError, ConnectionError, TimeoutError):
            assert process.poll() is None, f"it exited:\n{log.read_text()[-3000:]}"
            assert time.monotonic() < deadline, f"no answer at {url}:\n{log.read_text()[-3000:]}"
            time.sleep(0.5)


def test_omniboard_lists_runs_metrics_and_artifacts(recorded_runs, tmp_path):
    """`medseg db omniboard` as a user starts it: npm-installed on first use (kept in
    ~/.cache/medseg/omniboard for the next time), on 127.0.0.1, stopped with Ctrl-C."""
    database = recorded_runs.database
    port = db.free_port()
    log_path = tmp_path / "omniboard.log"
    process = start_viewer("omniboard", database, port, log_path)
    api = f"http://127.0.0.1:{port}/sacred/api/v1"
    try:
        runs = wait_for(f"{api}/Runs?select=_id,status,config,meta,info", process, log_path)
        by_id = {run["_id"]: run for run in runs}
        completed, resumed = by_id[recorded_runs.completed], by_id[recorded_runs.resumed]
        assert completed["status"] == resumed["status"] == "COMPLETED"
        assert completed["config"]["tags"] == ["baseline", "tiny"]
        assert completed["meta"]["comment"] == "first baseline"  # omniboard's notes column
        stored = database.run(recorded_runs.completed)
        assert completed["info"]["best_epoch"] == stored["info"]["best_epoch"]

        query = urllib.parse.quote(json.dumps({"run_id": str(recorded_runs.resumed)}))
        series = [m for m in get(f"{api}/Metrics?query={query}") if m["name"] == "val_dice"]
        assert [m["steps"] for m in series] == [[1, 2, 3]]  # the resumed run: one series

        files = get(f"{api}/files/artifacts/{recorded_runs.completed}")
        names = {f["filename"].rsplit("/", 1)[-1]: f for f in files}
        assert {"predictions_epoch_001.png", "training_curves.png", "best_model.pth"} <= set(names)
        png = names["training_curves.png"]
        assert png["contentType"] == "image/png"
        preview = get(f"{api}/files/preview/{png['_id']}")
        assert preview == database.artifact_bytes(recorded_runs.completed, "training_curves.png")

        plotted, offered = plot_of_run(port, recorded_runs.completed,
                                       tmp_path / "omniboard-plot.png")
    finally:
        process.send_signal(signal.SIGINT)
        stopped = process.wait(timeout=30)
    assert stopped == 0
    # A SADAAN run logs dozens of series (per-structure scores, memory, timings); the plot
    # opens on the losses and the monitored metric, the rest one click away in its list.
    assert plotted == ["train_loss", "val_loss", "val_dice"]
    assert {"rss_mb", "val_dice_spleen", "epoch_time_s"} <= set(offered)
    assert len(offered) > 40
    output = log_path.read_text()
    assert (f"omniboard {omniboard.VERSION}: http://127.0.0.1:{port} (this machine only; "
            "--host 0.0.0.0 opens it to the network)") in output
    assert "plots open on train_loss, val_loss, val_dice" in output
    with pytest.raises(urllib.error.URLError):
        get(f"{api}/Runs", timeout=3)


def plot_of_run(port: int, run_id: int, screenshot: Path) -> tuple[list[str], list[str]]:
    """Open omniboard in a fresh browser, click run ``run_id``: the series its plot shows,
    and every series its metric list offers. Saves a screenshot of the page."""
    with browser_page() as page:
        page.goto(f"http://127.0.0.1:{port}/sacred")
        page.locator(".fixedDataTableRowLayout_rowWrapper", has_text=f"{run_id}").filter(
            has_text="sadaan").first.wait_for(timeout=120_000)
        page.get_by_text(str(run_id), exact=True).first.click()
        page.wait_for_selector(".js-plotly-plot", timeout=60_000)
        page.wait_for_timeout(1000)
        plotted = page.evaluate("[...document.querySelector('.js-plotly-plot').data]"
                                ".map(t => t.name).filter(n => !n.endsWith('.unsmoothed'))")
        offered = page.evaluate("[...document.querySelectorAll('#metrics select option')]"
                                ".map(o => o.value)")
        page.screenshot(path=str(screenshot), full_page=True)
    return plotted, offered


def test_sacredboard_page_lists_our_runs(recorded_runs, tmp_path):
    """`medseg db sacredboard`, as the seed's `sacredboard -m localhost:27017:sadaan`: its
    runs page (which filters by status as it loads) lists the runs, in a real browser."""
    database = recorded_runs.database
    port = db.free_port()
    log_path = tmp_path / "sacredboard.log"
    process = start_viewer("sacredboard", database, port, log_path)
    base = f"http://127.0.0.1:{port}"
    try:
        listed = wait_for(f"{base}/api/run", process, log_path)
        rows = {int(row["id"]): row for row in listed["data"]}
        assert rows[recorded_runs.completed]["experiment_name"] == "sadaan"
        detail = get(f"{base}/api/run/{recorded_runs.resumed}")["data"][0]["object"]
        metric_id = next(m["id"] for m in detail["info"]["metrics"] if m["name"] == "val_dice")
        metric = get(f"{base}/api/run/{recorded_runs.resumed}/metric/{metric_id}")
        assert metric["steps"] == [1, 2, 3]

        with browser_page() as page:
            page.goto(f"{base}/runs")
            page.wait_for_selector("text=Showing 1 to", timeout=60_000)
            table = [row.split("\t") for row in page.locator("table tbody tr").all_inner_texts()]
            page.screenshot(path=str(tmp_path / "sacredboard-runs.png"), full_page=True)
    finally:
        process.send_signal(signal.SIGINT)
        process.wait(timeout=30)
    shown = {int(cells[1]): cells for cells in table if len(cells) > 2 and cells[1].isdigit()}
    assert {recorded_runs.completed, recorded_runs.resumed} <= set(shown)
    assert "sadaan" in shown[recorded_runs.completed][2]
    # the result column: the dict's numbers as text, not "[object Object]"
    assert f"best_epoch={recorded_runs.database.run(recorded_runs.completed)['result']['best_epoch']}" \
        in shown[recorded_runs.completed][-1]
    assert not re.search(r'HTTP/1\.1" 5\d\d', log_path.read_text())  # no server error
    assert (f"sacredboard 0.4.2: http://127.0.0.1:{port} (this machine only; --host 0.0.0.0 "
            "opens it to the network)") in log_path.read_text()


@pytest.mark.parametrize("notebook", sorted((REPO / "notebooks").glob("*.ipynb")),
                         ids=lambda path: path.stem)
def test_notebook_runs_against_the_recorded_runs(notebook, recorded_runs, tmp_path, monkeypatch):
    monkeypatch.setenv("MEDSEG_MONGO_URL", recorded_runs.database.url)
    monkeypatch.setenv("MEDSEG_DB_NAME", recorded_runs.database.name)
    monkeypatch.setenv("MEDSEG_EXPERIMENT", "sadaan")
    monkeypatch.setenv("MEDSEG_RUN_ID", str(recorded_runs.resumed))
    nb = nbformat.read(notebook, as_version=4)
    NotebookClient(nb, timeout=300, kernel_name="python3",
                   resources={"metadata": {"path": str(tmp_path)}}).execute()
    outputs = [o for cell in nb.cells if cell.cell_type == "code" for o in cell.outputs]
    assert not [o for o in outputs if o.output_type == "error"]
    images = [o for o in outputs if "image/png" in o.get("data", {})]
    text = "\n".join(o.get("data", {}).get("text/plain", "") + o.get("text", "") for o in outputs)
    if notebook.stem == "compare_runs":
        assert f"completed sadaan runs: [{recorded_runs.completed}, {recorded_runs.resumed}" in text
        assert "training.num_epochs" in text and "first baseline" in text
        assert len(images) == 1  # the overlaid learning curves
    else:
        assert "resumed" in text and "rss_mb" in text
        assert len(images) >= 2 + 3  # curves, memory, and PNG artifacts


def test_both_notebooks_are_there():
    """The parametrised test above runs whatever notebooks exist; these two must."""
    names = {path.stem for path in (REPO / "notebooks").glob("*.ipynb")}
    assert names >= {"compare_runs", "pipeline_report"}
