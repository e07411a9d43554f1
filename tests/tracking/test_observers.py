"""What the observers promise, checked with the small probe experiment (fast): every point,
artifact and status arrives, concurrent runs do not collide, and a database that stays away
at the end of a run costs a bounded wait and leaves a complete local copy to import."""

import json
import subprocess
import time
from datetime import datetime, timedelta

import pytest

from medseg import db
from tests.tracking.metrics_experiment import value
from tests.tracking.support import (PROBE, command, environment, medseg_cli, open_database,
                                    run_experiment)


def assert_complete_metrics(metrics: dict, points: int, names=("loss", "score")) -> None:
    for name in names:
        assert metrics[name]["steps"] == list(range(points)), name
        assert metrics[name]["values"] == [value(name, s) for s in range(points)], name


def test_completed_run_is_in_the_database_and_its_local_copy_is_gone(tmp_path, database):
    done = run_experiment(PROBE, *database.tracking(), "points=40", cwd=tmp_path,
                          env=environment(MEDSEG_MONGO_URL=database.url))
    assert done.returncode == 0, done.output
    run = database.run(done.started_id())
    assert run["status"] == "COMPLETED" and run["result"] == {"points": 40}
    assert_complete_metrics(database.metrics(run["_id"]), 40)
    assert {m["name"] for m in run["info"]["metrics"]} == {"loss", "score"}
    assert database.artifact_bytes(run["_id"], "figure_0.png").startswith(b"\x89PNG")
    assert not (tmp_path / "sacred_runs").exists()


@pytest.mark.parametrize("stop, status",
                         [("fail_at=7", "FAILED"), ("interrupt_at=7", "INTERRUPTED")])
def test_failed_and_interrupted_runs_keep_everything_up_to_the_stop(tmp_path, database, stop,
                                                                    status):
    done = run_experiment(PROBE, *database.tracking(), "points=40", "output_lines=3", stop,
                          cwd=tmp_path, env=environment(MEDSEG_MONGO_URL=database.url))
    assert done.returncode != 0
    run = database.run(done.started_id())
    assert run["status"] == status
    assert_complete_metrics(database.metrics(run["_id"]), 7)
    # Output after the last heartbeat is kept too (Sacred alone drops it for such runs).
    assert "line 0000002" in run["captured_out"]
    if status == "FAILED":
        assert "failing on purpose after 7 points" in "".join(run["fail_trace"])


def test_file_observer_records_final_status_and_all_points(tmp_path):
    done = run_experiment(PROBE, "tracking.observer=file", "points=40", "fail_at=9", cwd=tmp_path)
    assert done.returncode != 0
    run = tmp_path / "sacred_runs" / "1"
    assert json.loads((run / "run.json").read_text())["status"] == "FAILED"
    assert_complete_metrics(json.loads((run / "metrics.json").read_text()), 9)
    assert (run / "figure_1.png").read_bytes().startswith(b"\x89PNG")


def test_eight_concurrent_runs_get_unique_ids_and_complete_metrics(tmp_path, database):
    env = environment(MEDSEG_MONGO_URL=database.url)
    argv = command(PROBE, *database.tracking(), "points=300", "pause_s=0.005")
    processes = [subprocess.Popen(argv, cwd=tmp_path, env=env, stdout=subprocess.PIPE,
                                  stderr=subprocess.STDOUT, text=True) for _ in range(8)]
    outputs = [p.communicate(timeout=300)[0] for p in processes]
    assert all(p.returncode == 0 for p in processes), outputs
    runs = list(database.db.runs.find())
    assert sorted(r["_id"] for r in runs) == list(range(1, 9))
    for run in runs:
        assert run["status"] == "COMPLETED"
        assert_complete_metrics(database.metrics(run["_id"]), 300)
        assert [a["name"] for a in run["artifacts"]] == ["figure_0.png", "figure_1.png"]
    assert database.db.metrics.count_documents({}) == 16


def test_database_gone_at_the_end_costs_a_bounded_wait_then_import_completes_the_run(tmp_path):
    server = db.start_on_free_port(tmp_path / "server")
    database = open_database(server.url, "gone_at_end")
    process = subprocess.Popen(
        command(PROBE, *database.tracking(), "points=60", "pause_s=0.05",
                "tracking.flush_timeout_s=3"),
        cwd=tmp_path, env=environment(MEDSEG_MONGO_URL=server.url), stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT, text=True)
    try:
        output = ""
        while "Started run" not in output:
            output += process.stdout.readline()
        server.stop()
        started = time.monotonic()
        output += process.communicate(timeout=120)[0]
        waited = time.monotonic() - started
        assert process.returncode == 0, output
        # The rest of the run, the bounded wait, and slack for a loaded machine.
        assert waited < 3 + 3 + 15
        [kept] = [line for line in output.splitlines() if "did not take the last records" in line]
        journal = next((tmp_path / "sacred_runs" / "unsynced").iterdir())
        assert f"load it with `medseg db import {journal.relative_to(tmp_path)}`" in kept
        assert json.loads((journal / "1" / "run.json").read_text())["status"] == "COMPLETED"

        server.start()
        loaded = medseg_cli("db", "import", "sacred_runs", "--url", server.url,
                            "--db-name", database.name, cwd=tmp_path)
        assert loaded.returncode == 0, loaded.output
        assert "completed database run 1 (COMPLETED, 2 metrics, 2 artifacts)" in loaded.stdout
        run = database.run(1)
        assert run["status"] == "COMPLETED" and run["result"] == {"points": 60}
        assert_complete_metrics(database.metrics(1), 60)
        assert database.artifact_bytes(1, "figure_1.png").startswith(b"\x89PNG")
        artifact_files = {"filename": {"$regex": "^artifact://"}}
        files = database.db["fs.files"].count_documents(artifact_files)

        again = medseg_cli("db", "import", "sacred_runs", "--url", server.url,
                           "--db-name", database.name, cwd=tmp_path)
        assert again.returncode == 0, again.output
        assert database.db.runs.count_documents({}) == 1
        assert database.db.metrics.count_documents({}) == 2
        assert database.db["fs.files"].count_documents(artifact_files) == files
    finally:
        database.client.close()
        server.stop()


def test_a_killed_run_is_imported_once_as_dead_at_its_last_heartbeat(tmp_path, database):
    """`kill -9` mid-run: nothing records the end, the local copy stays RUNNING. Once its
    heartbeat is old, `medseg db import` marks the database run FAILED at that heartbeat,
    says so, and a second import leaves it alone."""
    process = subprocess.Popen(command(PROBE, *database.tracking(), "points=100000",
                                       "pause_s=0.01"),
                               cwd=tmp_path, env=environment(MEDSEG_MONGO_URL=database.url),
                               stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    output = ""
    while "Started run" not in output:
        output += process.stdout.readline()
    time.sleep(13)  # past Sacred's first heartbeat (10 s), which delivers the first points
    process.kill()
    process.communicate(timeout=30)
    [journal] = (tmp_path / "sacred_runs" / "unsynced").iterdir()
    run_file = journal / "1" / "run.json"
    run = json.loads(run_file.read_text())
    assert run["status"] == "RUNNING" and database.run(1)["status"] == "RUNNING"
    # As if it had been killed ten minutes ago: its heartbeat is long past.
    heartbeat = datetime.utcnow() - timedelta(minutes=10)
    run_file.write_text(json.dumps({**run, "heartbeat": heartbeat.isoformat()}))

    arguments = ["db", "import", "sacred_runs", "--url", database.url, "--db-name", database.name]
    loaded = medseg_cli(*arguments, cwd=tmp_path)
    assert loaded.returncode == 0, loaded.output
    assert (f"completed database run 1 (FAILED: its process died after its last heartbeat, "
            f"{heartbeat} UTC, 2 metrics, 2 artifacts)") in loaded.stdout
    assert loaded.stdout.endswith("1 of 1 runs loaded into database "
                                  f"{database.name!r}\n")
    stored = database.run(1)
    assert stored["status"] == "FAILED"
    assert abs(stored["stop_time"] - heartbeat) < timedelta(milliseconds=2)
    assert "ended without recording how (killed" in stored["fail_trace"][0]
    assert len(database.metrics(1)["loss"]["steps"]) > 10

    again = medseg_cli(*arguments, cwd=tmp_path)
    assert again.returncode == 0, again.output
    assert "already imported into database run 1" in again.stdout
    assert again.stdout.endswith(f"0 of 1 runs loaded into database {database.name!r}\n")


def test_observer_mongo_starts_the_local_server_when_no_url_is_set(tmp_path, monkeypatch):
    port = db.free_port()
    monkeypatch.setenv("MEDSEG_DB_PORT", str(port))
    monkeypatch.setenv("MEDSEG_DB_DIR", str(tmp_path / "state"))
    try:
        done = run_experiment(PROBE, "tracking.observer=mongo", "tracking.db_name=started",
                              cwd=tmp_path, env=environment())
        assert done.returncode == 0, done.output
        assert (f"recording this run in MongoDB at mongodb://127.0.0.1:{port} (database "
                "'started', from medseg db, started for this run)") in done.output
        database = open_database(db.local_url(port), "started")
        assert database.client["started"].runs.find_one({"_id": 1})["status"] == "COMPLETED"
        database.client.close()
    finally:
        assert db.stop()
