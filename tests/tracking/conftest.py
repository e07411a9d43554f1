"""Fixtures of the tracking tests: a database per test, tiny SADAAN data, and a server that
requires authentication."""

from __future__ import annotations

import uuid
from dataclasses import dataclass
from pathlib import Path

import pymongo
import pytest

from medseg.data.synthetic.sadaan import generate_sadaan_dataset
from tests.tracking.support import open_database


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
