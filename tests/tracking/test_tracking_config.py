"""Each ``tracking`` entry (and the top-level ``tags``) changes what is recorded; the probe
experiment shows the effect of every one. ``tracking.flush_timeout_s`` is shown by
test_observers (bounded wait) and ``tracking.max_artifact_mb`` by test_sadaan_runs."""

import json
import re
from dataclasses import dataclass

import pytest

from ingredients.tracking import TRACKING_FIELDS
from medseg import db
from tests.tracking.support import PROBE, Database, Finished, environment, run_experiment


@dataclass
class Recorded:
    tmp_path: object
    database: Database
    done: Finished

    def from_database(self):
        run = self.database.run(self.done.started_id())
        return run, self.database.metrics(run["_id"])

    def from_files(self, file_dir="sacred_runs"):
        folder = self.tmp_path / file_dir / str(self.done.started_id())
        run = json.loads((folder / "run.json").read_text())
        return run, json.loads((folder / "metrics.json").read_text())

    def nothing_in_database(self) -> bool:
        return self.database.db.runs.count_documents({}) == 0


def check_observer_none(recorded):
    assert "this run is not recorded (tracking.observer='none')" in recorded.done.output
    assert not (recorded.tmp_path / "sacred_runs").exists() and recorded.nothing_in_database()


def check_observer_file(recorded):
    run, metrics = recorded.from_files()
    assert run["status"] == "COMPLETED" and metrics["loss"]["steps"] == list(range(20))
    assert recorded.nothing_in_database()


def check_url(recorded):
    assert ", from tracking.url)" in recorded.done.output
    run, metrics = recorded.from_database()
    assert run["status"] == "COMPLETED" and metrics["loss"]["steps"] == list(range(20))


def check_db_name(recorded):
    client = recorded.database.client
    assert client["t_other_name"].runs.find_one({"_id": 1})["status"] == "COMPLETED"
    assert recorded.nothing_in_database()
    client.drop_database("t_other_name")


def check_file_dir(recorded):
    run, _ = recorded.from_files("elsewhere")
    assert run["status"] == "COMPLETED"
    assert not (recorded.tmp_path / "sacred_runs").exists()


def check_metric_points(recorded):
    _, metrics = recorded.from_database()
    steps = metrics["loss"]["steps"]
    assert 250 <= len(steps) <= 501
    assert steps[0] == 0 and steps[-1] == 19_999
    assert len({b - a for a, b in zip(steps[:-2], steps[1:-1])}) == 1


def check_output(recorded):
    out = recorded.from_database()[0]["captured_out"]
    assert len(out) <= 200_000 + 100
    assert "line 0000000" in out and "line 0029999" in out
    left_out = int(re.search(r"\[\.\.\. (\d+) characters left out \.\.\.\]", out).group(1))
    assert left_out > 2_500_000
    assert "progress 3000/3000" in out and "progress 1/3000" not in out and "\r" not in out


def check_info(recorded):
    run, _ = recorded.from_database()
    assert run["info"]["big"] == {"stored_as_artifact": "info_big.json", "size_kb": 196.1}
    stored = recorded.database.artifact_bytes(run["_id"], "info_big.json")
    assert json.loads(stored) == ["y" * 1000] * 200


def check_tags(recorded):
    assert recorded.from_database()[0]["config"]["tags"] == ["baseline", "small lr"]


CASES = {
    "tracking.observer=none": (["tracking.observer=none"], check_observer_none),
    "tracking.observer=file": (["tracking.observer=file"], check_observer_file),
    "tracking.url": (["tracking.url={url}"], check_url),
    "tracking.db_name": (["tracking.db_name=t_other_name"], check_db_name),
    "tracking.file_dir": (["tracking.observer=file", "tracking.file_dir=elsewhere"],
                          check_file_dir),
    "tracking.max_metric_points": (["tracking.max_metric_points=500", "points=20000"],
                                   check_metric_points),
    "tracking.max_output_mb": (["tracking.max_output_mb=0.2", "output_lines=30000",
                                "progress_updates=3000"], check_output),
    "tracking.max_info_kb": (["tracking.max_info_kb=64", "info_kb=200"], check_info),
    "tags": (['tags=["baseline","small lr"]'], check_tags),
}


def test_every_tracking_entry_has_a_case():
    covered = {name.split("=")[0].removeprefix("tracking.") for name in CASES} - {"tags"}
    assert covered | {"flush_timeout_s", "max_artifact_mb"} == set(TRACKING_FIELDS)


@pytest.mark.parametrize("case", list(CASES))
def test_tracking_entry_changes_what_is_recorded(case, tmp_path, database):
    updates, check = CASES[case]
    updates = [u.format(url=database.url) for u in updates]
    # Only tracking.url may lead to the database in its own case.
    url = f"mongodb://127.0.0.1:{db.free_port()}" if case == "tracking.url" else database.url
    done = run_experiment(PROBE, *database.tracking(), *updates, cwd=tmp_path,
                          env=environment(MEDSEG_MONGO_URL=url))
    assert done.returncode == 0, done.output
    check(Recorded(tmp_path, database, done))


@pytest.mark.parametrize("given", [None, "t_given_name"])
def test_the_database_named_in_the_url_receives_the_run_unless_db_name_is_given(
        given, tmp_path, database):
    """`MEDSEG_MONGO_URL=mongodb://host:port/NAME` (the form omniboard reads) records into
    NAME; `tracking.db_name`, when given, wins; the run's line names the database."""
    updates = ["tracking.observer=mongo"] + ([f"tracking.db_name={given}"] if given else [])
    done = run_experiment(PROBE, *updates, cwd=tmp_path,
                          env=environment(MEDSEG_MONGO_URL=f"{database.url}/{database.name}"))
    assert done.returncode == 0, done.output
    expected = given or database.name
    assert (f"recording this run in MongoDB at {database.url}/{database.name} (database "
            f"{expected!r}, from MEDSEG_MONGO_URL)") in done.output
    client = database.client
    assert client[expected].runs.find_one({"_id": done.started_id()})["status"] == "COMPLETED"
    if given:
        assert database.db.runs.count_documents({}) == 0
        client.drop_database(given)
