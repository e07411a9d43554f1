"""The `medseg` command line around the database and recorded runs (fast: the probe
experiment and file-observer runs)."""

import json
import subprocess

import pytest

from medseg import db
from medseg.tracking import connection
from tests.tracking.support import PROBE, environment, medseg_cli, run_experiment


@pytest.mark.parametrize("url, shown", [
    ("mongodb://user:s3cret@host:27017/?authSource=admin",
     "mongodb://user:***@host:27017/?authSource=admin"),
    ("mongodb://user:s3cret@host:notaport", "mongodb://user:***@host:notaport"),
    ("mongodb://user:p@ss:w0rd@host", "mongodb://user:***@host"),
    ("mongodb://host:27017/db", "mongodb://host:27017/db"),
    ("mongodb://user@host", "mongodb://user@host"),
])
def test_redact_hides_the_password_even_in_malformed_urls(url, shown):
    assert db.redact(url) == shown


@pytest.mark.parametrize("url, given, expected", [
    ("mongodb://127.0.0.1:27017/myproject", None, ("myproject", "named in the URL")),
    ("mongodb://u:p@host/myproject?authSource=admin", None, ("myproject", "named in the URL")),
    ("mongodb://127.0.0.1:27017/myproject", "other", ("other", "given")),
    ("mongodb://127.0.0.1:27017/?authSource=admin", None, ("medseg", "default")),
    ("mongodb://127.0.0.1:27017", None, ("medseg", "default")),
])
def test_the_database_named_in_a_url_is_used_unless_one_is_given(url, given, expected):
    assert connection.resolve_db_name(url, given) == expected


def test_db_start_status_stop(tmp_path):
    port = db.free_port()
    env = environment(MEDSEG_DB_DIR=str(tmp_path / "state"), MEDSEG_DB_PORT=str(port))
    started = medseg_cli("db", "start", env=env)
    try:
        assert started.returncode == 0, started.output
        assert started.stdout.startswith(
            f"database server running: mongodb://127.0.0.1:{port} (pid ")
        # Auto mode finds the local server.
        run_experiment(PROBE, "tracking.db_name=medseg", cwd=tmp_path, env=env)
        status = medseg_cli("db", "status", env=env)
        assert status.returncode == 0
        assert f"database server answers at mongodb://127.0.0.1:{port}" in status.stdout
        assert "database 'medseg': 1 runs" in status.stdout
        assert status.stdout.endswith(f"experiments record into database 'medseg' at mongodb://"
                                      f"127.0.0.1:{port} (from medseg db; tracking.db_name=NAME "
                                      "overrides it)\n")
        named = medseg_cli("db", "status", env={
            **env, "MEDSEG_MONGO_URL": f"mongodb://127.0.0.1:{port}/myproject"})
        assert named.stdout.splitlines()[-1] == (
            f"experiments record into database 'myproject' at mongodb://127.0.0.1:{port}/"
            "myproject (from MEDSEG_MONGO_URL, named in the URL; tracking.db_name=NAME "
            "overrides it)")
    finally:
        stopped = medseg_cli("db", "stop", env=env)
    assert stopped.stdout.strip() == "database server stopped"
    after = medseg_cli("db", "status", env=env)
    assert after.returncode == 1
    assert "no database server answers" in after.stdout


def test_import_of_a_missing_folder_is_one_line(tmp_path):
    done = medseg_cli("db", "import", str(tmp_path / "nowhere"), cwd=tmp_path)
    assert done.returncode == 2
    assert done.stderr == (f"error: {tmp_path / 'nowhere'} does not exist; expected a "
                           "file-observer run folder (with run.json) or a folder of them\n")


def test_import_when_no_database_answers_says_how_to_get_one(tmp_path):
    run_experiment(PROBE, "tracking.observer=file", cwd=tmp_path)
    url = f"mongodb://127.0.0.1:{db.free_port()}"
    done = medseg_cli("db", "import", "sacred_runs", "--url", url, cwd=tmp_path)
    assert done.returncode == 2
    assert done.stderr == (f"error: no MongoDB answers at {url} (from --url); start it with "
                           "`medseg db start` or give --url\n")


def test_compare_file_runs_shows_config_differences_and_metrics(tmp_path):
    for points in (10, 30):
        assert run_experiment(PROBE, "tracking.observer=file", f"points={points}", "seed=1",
                              cwd=tmp_path).returncode == 0
    done = medseg_cli("runs", "compare", "sacred_runs/1", "sacred_runs/2", cwd=tmp_path)
    assert done.returncode == 0, done.output
    rows = {line.split()[0]: line.split()[1:] for line in done.stdout.splitlines()[1:]
            if line.strip()}
    assert rows["points"] == ["10", "30"]
    assert "seed" not in rows  # equal in both: not a difference
    assert rows["loss"] == ["8.5", "/", "4", "18.5", "/", "4"]  # last / best (lowest)
    assert rows["score"] == ["9.5", "/", "-", "19.5", "/", "-"]  # no direction, no "best"
    assert rows["status"] == ["COMPLETED", "COMPLETED"]


def test_compare_unknown_run_is_one_line(tmp_path, database):
    done = medseg_cli("runs", "compare", "999", "--url", database.url, "--db-name", database.name)
    assert done.returncode == 2
    assert done.stderr == f"error: there is no run 999 in database '{database.name}'\n"


def test_rerun_dry_run_prints_a_command_that_can_be_pasted(tmp_path):
    run_experiment(PROBE, "tracking.observer=file", "points=7", cwd=tmp_path)
    done = medseg_cli("runs", "rerun", "sacred_runs/1", "--dry-run", cwd=tmp_path)
    assert done.returncode == 0, done.output
    first, command = done.stdout.splitlines()
    assert first == ("the command that re-runs sacred_runs/1 (metrics_probe main) with its "
                     "stored config:")
    assert command.startswith(f"cd {tmp_path} && ") and f"{PROBE} main with " in command
    assert command.endswith(" -c 'rerun of sacred_runs/1'")
    assert not (tmp_path / "sacred_runs" / "2").exists()
    # Pasted into a shell, later, from elsewhere: the same experiment with the same config.
    pasted = subprocess.run(["bash", "-c", command], cwd="/", env=environment(),
                            capture_output=True, text=True, timeout=120)
    assert pasted.returncode == 0, pasted.stderr
    first, second = (json.loads((tmp_path / "sacred_runs" / str(i) / "config.json").read_text())
                     for i in (1, 2))
    assert second == first and second["points"] == 7
    meta = json.loads((tmp_path / "sacred_runs" / "2" / "run.json").read_text())["meta"]
    assert meta["comment"] == "rerun of sacred_runs/1"


def test_rerun_of_a_file_run_runs_again_with_the_same_config(tmp_path):
    run_experiment(PROBE, "tracking.observer=file", "points=7", cwd=tmp_path)
    done = medseg_cli("runs", "rerun", "sacred_runs/1", cwd=tmp_path)
    assert done.returncode == 0, done.output
    first, second = (json.loads((tmp_path / "sacred_runs" / str(i) / "config.json").read_text())
                     for i in (1, 2))
    assert first == second
    meta = json.loads((tmp_path / "sacred_runs" / "2" / "run.json").read_text())["meta"]
    assert meta["comment"] == "rerun of sacred_runs/1"
