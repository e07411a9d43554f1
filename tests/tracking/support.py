"""Helpers for the tracking tests: experiments run as a user runs them (a subprocess in a
scratch folder) and a database of its own per test on the session's server."""

from __future__ import annotations

import contextlib
import os
import re
import signal
import subprocess
import sys
import time
import uuid
from dataclasses import dataclass
from pathlib import Path

import pymongo

REPO = Path(__file__).resolve().parents[2]
PROBE = Path(__file__).with_name("metrics_experiment.py")
SADAAN = REPO / "experiments" / "sadaan.py"
#: A SADAAN run of a few seconds an epoch on two CPU cores: 4 training cases of 32x32x16,
#: one case per step so that per-step losses are logged, a narrow network.
TINY_SADAAN = ["training.image_size=[32,32,16]", "training.num_workers=0",
               "training.warmup_epochs=0", "training.batch_size=1",
               "training.gradient_accumulation_steps=1", "logging.log_frequency=1",
               "logging.progress_bar=False", "model.base_channels=4"]


@dataclass
class Finished:
    returncode: int
    stdout: str
    stderr: str

    @property
    def output(self) -> str:
        return self.stdout + self.stderr

    def started_id(self) -> int | str:
        match = re.search(r'Started run with ID "([^"]+)"', self.output)
        assert match, f"no run started:\n{self.output[-3000:]}"
        return int(match.group(1)) if match.group(1).isdigit() else match.group(1)


def environment(**variables: str) -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO), env.get("PYTHONPATH")]))
    env.update(variables)
    return env


def command(script: Path, *updates: str, comment: str | None = None) -> list[str]:
    argv = [sys.executable, str(script)]
    if updates:
        argv += ["with", *updates]
    if comment:
        argv += ["-c", comment]
    return argv


def run_experiment(script: Path, *updates: str, cwd: Path, env: dict[str, str] | None = None,
                   comment: str | None = None, timeout: float = 600) -> Finished:
    done = subprocess.run(command(script, *updates, comment=comment), cwd=cwd,
                          env=env or environment(), capture_output=True, text=True,
                          timeout=timeout)
    return Finished(done.returncode, done.stdout, done.stderr)


def medseg_cli(*arguments: str, cwd: Path | None = None, env: dict[str, str] | None = None,
               timeout: float = 600) -> Finished:
    done = subprocess.run([sys.executable, "-m", "medseg.cli", *arguments], cwd=cwd,
                          env=env or environment(), capture_output=True, text=True,
                          timeout=timeout)
    return Finished(done.returncode, done.stdout, done.stderr)


@dataclass
class Database:
    url: str
    name: str
    client: pymongo.MongoClient

    @property
    def db(self):
        return self.client[self.name]

    def run(self, run_id):
        return self.db.runs.find_one({"_id": run_id})

    def metrics(self, run_id) -> dict[str, dict]:
        return {m["name"]: m for m in self.db.metrics.find({"run_id": run_id})}

    def artifact_bytes(self, run_id, name: str) -> bytes:
        import gridfs

        entry = next(a for a in self.run(run_id)["artifacts"] if a["name"] == name)
        return gridfs.GridFS(self.db).get(entry["file_id"]).read()

    def tracking(self, observer: str = "mongo") -> list[str]:
        """Config updates that send a run to this database (the URL goes by environment)."""
        return [f"tracking.observer={observer}", f"tracking.db_name={self.name}"]


def open_database(url: str, label: str) -> Database:
    name = f"t_{re.sub(r'[^A-Za-z0-9]', '_', label)[:30]}_{uuid.uuid4().hex[:6]}"
    return Database(url, name, pymongo.MongoClient(url, serverSelectionTimeoutMS=10000))


def sadaan_updates(data: Path, database: Database, *extra: str) -> list[str]:
    return [f"dataset_path={data}", *TINY_SADAAN, *database.tracking(), *extra]


def start_experiment(script: Path, *updates: str, cwd: Path,
                     env: dict[str, str]) -> subprocess.Popen:
    """The run in the background, output piped; Ctrl-C (SIGINT) reaches it as it would from a
    terminal even when the tests themselves run with SIGINT ignored (a background job)."""
    return subprocess.Popen(command(script, *updates), cwd=cwd, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True,
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))


def interrupt_when(process: subprocess.Popen, ready, timeout: float = 300) -> None:
    """Send Ctrl-C (SIGINT) to ``process`` once ``ready()`` is true."""
    deadline = time.monotonic() + timeout
    while not ready():
        assert process.poll() is None, "the run ended before it could be interrupted"
        assert time.monotonic() < deadline, "the run did not get far enough in time"
        time.sleep(0.2)
    process.send_signal(signal.SIGINT)


#: Debian's chromium, driven by Playwright (which never downloads a browser of its own here:
#: `make test` installs chromium with apt when it is missing).
CHROMIUM = "/usr/bin/chromium"
CHROMIUM_FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                  "--disable-component-update", "--disable-sync", "--no-first-run"]


@contextlib.contextmanager
def browser_page(width: int = 1400, height: int = 1000):
    """A page of a fresh headless Chromium (no stored settings)."""
    from playwright.sync_api import sync_playwright

    assert Path(CHROMIUM).exists(), (f"no browser at {CHROMIUM}: `make test` installs Debian's "
                                     "chromium, or `apt-get install chromium`")
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_FLAGS)
        try:
            yield browser.new_page(viewport={"width": width, "height": height})
        finally:
            browser.close()


def start_viewer(name: str, database: Database, port: int, log: Path,
                 *extra: str) -> subprocess.Popen:
    """`medseg db omniboard|sacredboard` as a user starts it; Ctrl-C (SIGINT) stops it."""
    with open(log, "w") as output:
        return subprocess.Popen(
            [sys.executable, "-m", "medseg.cli", "db", name, "--port", str(port), "--url",
             database.url, "--db-name", database.name, *extra], cwd=REPO, env=environment(),
            stdout=output, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
