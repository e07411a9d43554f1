"""The tools users browse runs with, started against the test server after real runs:
omniboard (npm), sacredboard (its own pinned environment) and the incense notebooks."""

import json
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.parse
import urllib.request
from pathlib import Path

import nbformat
import pytest
from nbclient import NotebookClient

from medseg import db
from medseg.tracking import omniboard
from tests.tracking.support import REPO, environment

pytestmark = [pytest.mark.slow, pytest.mark.xdist_group("recorded_runs")]

SACREDBOARD_REQUIREMENTS = REPO / "docs" / "sacredboard-requirements.txt"


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


def stop(process: subprocess.Popen) -> None:
    process.terminate()
    try:
        process.wait(timeout=15)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait(timeout=15)


def test_omniboard_lists_runs_metrics_and_artifacts(recorded_runs, tmp_path):
    """`medseg db omniboard` as a user starts it: npm-installed on first use (kept in
    ~/.cache/medseg/omniboard for the next time), stopped with Ctrl-C."""
    database = recorded_runs.database
    port = db.free_port()
    log_path = tmp_path / "omniboard.log"
    with open(log_path, "w") as log:
        process = subprocess.Popen(
            [sys.executable, "-m", "medseg.cli", "db", "omniboard", "--port", str(port),
             "--url", database.url, "--db-name", database.name], cwd=REPO, env=environment(),
            stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    api = f"http://127.0.0.1:{port}/sacred/api/v1"
    try:
        runs = wait_for(f"{api}/Runs?select=_id,status,config,meta,info", process, log_path)
        by_id = {run["_id"]: run for run in runs}
        completed, resumed = by_id[recorded_runs.completed], by_id[recorded_runs.resumed]
        assert completed["status"] == resumed["status"] == "COMPLETED"
        assert completed["config"]["tags"] == ["baseline", "tiny"]  # omniboard's tags column
        assert completed["meta"]["comment"] == "first baseline"  # omniboard's notes column
        stored = database.run(recorded_runs.completed)
        assert completed["info"]["best_epoch"] == stored["info"]["best_epoch"]
        assert "baseline" in get(f"{api}/Runs?distinct=config.tags")

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
    finally:
        process.send_signal(signal.SIGINT)
        stopped = process.wait(timeout=30)
    assert stopped == 0
    assert f"omniboard {omniboard.VERSION}: http://127.0.0.1:{port} shows database" in (
        log_path.read_text())
    with pytest.raises(urllib.error.URLError):
        get(f"{api}/Runs", timeout=3)


def sacredboard_environment() -> Path:
    """The environment of docs/sacredboard-requirements.txt, created once and cached."""
    folder = omniboard.cache_dir() / "sacredboard-env"
    stamp = folder / "requirements.txt"
    wanted = SACREDBOARD_REQUIREMENTS.read_text()
    if not (stamp.is_file() and stamp.read_text() == wanted):
        subprocess.run([sys.executable, "-m", "venv", "--clear", str(folder)], check=True)
        subprocess.run([str(folder / "bin" / "pip"), "install", "-q", "-r",
                        str(SACREDBOARD_REQUIREMENTS)], check=True)
        stamp.write_text(wanted)
    return folder


def test_sacredboard_lists_our_runs_and_their_metrics(recorded_runs, tmp_path):
    database = recorded_runs.database
    folder = sacredboard_environment()
    port = db.free_port()
    log_path = tmp_path / "sacredboard.log"
    with open(log_path, "w") as log:
        process = subprocess.Popen([str(folder / "bin" / "sacredboard"), "-mu", database.url,
                                    database.name, "--port", str(port), "--no-browser"],
                                   stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
    base = f"http://127.0.0.1:{port}"
    try:
        listed = wait_for(f"{base}/api/run", process, log_path)
        rows = {int(row["id"]): row for row in listed["data"]}
        assert rows[recorded_runs.completed]["experiment_name"] == "sadaan"
        assert rows[recorded_runs.completed]["status"] == "COMPLETED"
        assert recorded_runs.resumed in rows
        detail = get(f"{base}/api/run/{recorded_runs.resumed}")["data"][0]["object"]
        metric_id = next(m["id"] for m in detail["info"]["metrics"] if m["name"] == "val_dice")
        metric = get(f"{base}/api/run/{recorded_runs.resumed}/metric/{metric_id}")
        assert metric["steps"] == [1, 2, 3]
        assert b"sacredboard" in get(f"{base}/runs").lower()
    finally:
        stop(process)


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
