"""Fixtures of the tracking tests: a database per test, an authenticating server, and a set
of real SADAAN runs recorded once (completed; interrupted then resumed) that several slow
tests read."""

from __future__ import annotations

import uuid
from dataclasses import dataclass
from pathlib import Path

import pymongo
import pytest

from medseg.data.synthetic.sadaan import generate_sadaan_dataset
from tests.tracking.support import (SADAAN, Database, environment, interrupt_when, open_database,
                                    run_experiment, sadaan_updates, start_experiment)


@pytest.fixture
def database(mongo_server, request):
    """A database of its own on the session's server."""
    database = open_database(mongo_server, request.node.name)
    yield database
    database.client.drop_database(database.name)
    database.client.close()


@pytest.fixture(scope="session")
def sadaan_data(tmp_path_factory) -> Path:
    return generate_sadaan_dataset(tmp_path_factory.mktemp("sadaan") / "data", num_train=4,
                                   num_val=2, num_test=2, image_size=(32, 32, 16))


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


@pytest.fixture(scope="session")
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


@dataclass
class AuthServer:
    """A server that requires SCRAM authentication, with a read-write ``root`` user and a
    ``reader`` who may only read database ``readonly``."""

    address: str
    passwords: dict[str, str]
    server: object

    def url(self, user: str, password: str | None = None) -> str:
        password = self.passwords[user] if password is None else password
        return f"mongodb://{user}:{password}@{self.address}/?authSource=admin"


@pytest.fixture(scope="session")
def auth_server(tmp_path_factory) -> AuthServer:
    from medseg import db

    directory = tmp_path_factory.mktemp("auth-server")
    server = db.start_on_free_port(directory)
    passwords = {"root": f"Root-{uuid.uuid4().hex[:10]}", "reader": f"Read-{uuid.uuid4().hex[:10]}"}
    client = pymongo.MongoClient(server.url)
    client.admin.command("createUser", "root", pwd=passwords["root"],
                         roles=[{"role": "root", "db": "admin"}])
    client.admin.command("createUser", "reader", pwd=passwords["reader"],
                         roles=[{"role": "read", "db": "readonly"}])
    client.close()
    server.stop()
    server.auth = True
    server.start()
    yield AuthServer(f"127.0.0.1:{server.port}", passwords, server)
    server.stop()
