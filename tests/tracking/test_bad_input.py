"""Each database mistake gives one clear line. Connection problems: the run goes on,
recorded to files. Configuration mistakes: the run stops before it starts and nothing is
recorded. A password never shows up anywhere."""

import json
import re

import pymongo
import pytest

from medseg import db
from tests.tracking.support import PROBE, environment, run_experiment


def lines_about_tracking(output: str) -> list[str]:
    return [line for line in output.splitlines()
            if "tracking:" in line or line.startswith("error:")]


def assert_nothing_recorded(cwd) -> None:
    assert not (cwd / "sacred_runs").exists()


@pytest.mark.parametrize("url, reason", [
    ("mongodb://127.0.0.1:notaport", "Port contains non-digit characters"),
    ("mongodb://127.0.0.1:99999", "Port must be an integer between 0 and 65535"),
    ("mongodb://", "Must provide at least one hostname"),
    ("http://127.0.0.1:27017", "must start with mongodb:// or mongodb+srv://"),
    ("mongodb://127.0.0.1/?bogusOption=1", "Unknown option"),
])
def test_malformed_url_stops_before_the_run(tmp_path, url, reason):
    done = run_experiment(PROBE, "tracking.observer=mongo", cwd=tmp_path,
                          env=environment(MEDSEG_MONGO_URL=url))
    assert done.returncode == 2
    [line] = lines_about_tracking(done.output)
    assert line.startswith("error: MEDSEG_MONGO_URL") and reason in line
    assert "Traceback" not in done.output
    assert "Started run" not in done.output
    assert_nothing_recorded(tmp_path)


def test_malformed_tracking_url_names_the_config_entry(tmp_path):
    done = run_experiment(PROBE, "tracking.url=mongodb://127.0.0.1:notaport", cwd=tmp_path)
    assert done.returncode == 2
    assert lines_about_tracking(done.output) == [
        "error: tracking.url='mongodb://127.0.0.1:notaport' is not a valid MongoDB URL: Port "
        "contains non-digit characters. Hint: username and password must be escaped according "
        "to RFC 3986, use urllib.parse.quote_plus"]


def test_wrong_port_goes_on_recording_to_files(tmp_path):
    url = f"mongodb://127.0.0.1:{db.free_port()}"
    done = run_experiment(PROBE, "tracking.observer=mongo", "points=30", cwd=tmp_path,
                          env=environment(MEDSEG_MONGO_URL=url))
    assert done.returncode == 0, done.output
    assert lines_about_tracking(done.output) == [
        f"WARNING - medseg - tracking: no MongoDB answers at {url} (from MEDSEG_MONGO_URL); "
        "recording this run in sacred_runs/ instead (`medseg db import sacred_runs` loads it "
        "into MongoDB later)"]
    run = tmp_path / "sacred_runs" / "1"
    assert json.loads((run / "run.json").read_text())["status"] == "COMPLETED"
    assert json.loads((run / "metrics.json").read_text())["loss"]["steps"] == list(range(30))


def test_wrong_credentials_stop_before_the_run_without_showing_the_password(tmp_path, auth_server):
    url = auth_server.url("root", "Wrong-Guess-42")
    done = run_experiment(PROBE, "tracking.observer=mongo", cwd=tmp_path,
                          env=environment(MEDSEG_MONGO_URL=url))
    assert done.returncode == 2
    assert lines_about_tracking(done.output) == [
        f"error: MongoDB at mongodb://root:***@{auth_server.address}/?authSource=admin (from "
        "MEDSEG_MONGO_URL) rejected the user and password: authentication failed; correct them "
        "in MEDSEG_MONGO_URL"]
    assert "Wrong-Guess-42" not in done.output
    assert_nothing_recorded(tmp_path)


def test_missing_credentials_say_how_to_give_them(tmp_path, auth_server):
    done = run_experiment(PROBE, "tracking.observer=mongo", cwd=tmp_path,
                          env=environment(MEDSEG_MONGO_URL=f"mongodb://{auth_server.address}"))
    assert done.returncode == 2
    [line] = lines_about_tracking(done.output)
    assert "requires a user and password" in line and "MEDSEG_MONGO_URL" in line


def test_read_only_database_stops_before_the_run(tmp_path, auth_server):
    done = run_experiment(PROBE, "tracking.observer=mongo", "tracking.db_name=readonly",
                          cwd=tmp_path, env=environment(MEDSEG_MONGO_URL=auth_server.url("reader")))
    assert done.returncode == 2
    assert lines_about_tracking(done.output) == [
        f"error: MongoDB at mongodb://reader:***@{auth_server.address}/?authSource=admin (from "
        "MEDSEG_MONGO_URL): the user may not write to database 'readonly' (read-only); grant it "
        "the readWrite role or choose another tracking.db_name"]
    assert auth_server.passwords["reader"] not in done.output
    assert_nothing_recorded(tmp_path)


def test_password_in_tracking_url_is_refused_because_config_is_stored(tmp_path, auth_server):
    done = run_experiment(PROBE, f"tracking.url={auth_server.url('root')}", cwd=tmp_path)
    assert done.returncode == 2
    [line] = lines_about_tracking(done.output)
    assert line == (f"error: tracking.url 'mongodb://root:***@{auth_server.address}/?authSource="
                    "admin' contains a password, and the config is stored with every run; leave "
                    "tracking.url unset and put the URL in $MEDSEG_MONGO_URL instead")
    assert auth_server.passwords["root"] not in done.output
    assert_nothing_recorded(tmp_path)


def test_password_from_environment_appears_nowhere(tmp_path, auth_server):
    password = auth_server.passwords["root"]
    done = run_experiment(PROBE, "tracking.observer=mongo", "tracking.db_name=secrets",
                          "output_lines=5", cwd=tmp_path,
                          env=environment(MEDSEG_MONGO_URL=auth_server.url("root")))
    assert done.returncode == 0, done.output
    assert "mongodb://root:***@" in done.output
    assert password not in done.output
    client = pymongo.MongoClient(auth_server.url("root"))
    database = client["secrets"]
    run = database.runs.find_one({"_id": done.started_id()})
    assert run["status"] == "COMPLETED"
    stored = json.dumps([run, list(database.metrics.find()), list(database["fs.files"].find())],
                        default=str)
    assert password not in stored
    assert "root:" not in stored
    files = [p for p in tmp_path.rglob("*") if p.is_file()]
    assert all(password not in p.read_text(errors="ignore") for p in files)
    client.close()


def test_missing_artifact_is_one_line_and_the_rest_is_kept(tmp_path, database):
    done = run_experiment(PROBE, *database.tracking(), "missing_artifact=True", cwd=tmp_path,
                          env=environment(MEDSEG_MONGO_URL=database.url))
    assert done.returncode == 0, done.output
    missing = [line for line in done.output.splitlines() if "never_written.png" in line]
    assert len(missing) == 1
    assert re.search(r"artifact 'never_written.png': no file at \S+never_written.png; nothing "
                     r"stored for it", missing[0])
    run = database.run(done.started_id())
    assert run["status"] == "COMPLETED"
    assert [a["name"] for a in run["artifacts"]] == ["figure_0.png", "figure_1.png"]
    assert len(database.metrics(run["_id"])["loss"]["steps"]) == 20
