"""Fixtures for every suite.

- No test reaches a developer's own database: ``MEDSEG_MONGO_URL`` is removed, the default
  local port is one nothing listens on, and ``medseg db`` keeps its state in a temporary
  folder. Tests that run experiments still set ``tracking.observer`` explicitly.
- ``mongo_server``: the URL of a real MongoDB-compatible server (PyPI ``secantusdb``) that
  the session starts on a free 127.0.0.1 port with temporary storage, and stops (by its
  PID, waiting for the exit) at the end. Each test that writes to it uses its own database
  name, so tests do not see each other's runs.
- Under pytest-xdist each worker (and every process it starts: experiments from the shell,
  torchrun ranks, Ray trials, loader workers) computes on one thread. Two workers on two
  cores with torch's default of one thread per core oversubscribe them, and OpenMP's
  spinning threads then make a step several times slower (a SADAAN learning test: 30 s
  alone, far longer beside the other worker).
- The root logger's level is restored after each test: an in-process Sacred run with
  ``--loglevel`` sets it for the whole process, which hid the warnings a later test of the
  same worker looked for.
"""

from __future__ import annotations

import logging
import os

if "PYTEST_XDIST_WORKER" in os.environ:
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    os.environ.setdefault("MKL_NUM_THREADS", "1")

import pytest  # noqa: E402
import torch  # noqa: E402

if "PYTEST_XDIST_WORKER" in os.environ:
    torch.set_num_threads(int(os.environ["OMP_NUM_THREADS"]))

from medseg import db  # noqa: E402

#: Nothing listens on port 1 of 127.0.0.1; the "local server" of auto mode is never found.
UNUSED_PORT = "1"


@pytest.fixture(autouse=True)
def _no_personal_database(monkeypatch, tmp_path_factory):
    monkeypatch.delenv("MEDSEG_MONGO_URL", raising=False)
    monkeypatch.setenv("MEDSEG_DB_PORT", UNUSED_PORT)
    monkeypatch.setenv("MEDSEG_DB_DIR", str(tmp_path_factory.getbasetemp() / "medseg-db-state"))


@pytest.fixture(autouse=True)
def _root_log_level():
    root = logging.getLogger()
    level = root.level
    yield
    root.setLevel(level)


@pytest.fixture(scope="session")
def mongo_server(tmp_path_factory) -> str:
    """``mongodb://127.0.0.1:PORT`` of the session's database server."""
    server = db.start_on_free_port(tmp_path_factory.mktemp("mongo-server"))
    yield server.url
    server.stop()
