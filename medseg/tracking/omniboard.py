"""omniboard (npm) against medseg's database: installed once into a cache folder, started
with the database URL in its environment (not on its command line, where other users of the
machine could read a password), and kept running.

omniboard itself listens on a Unix socket in a private folder; :class:`Omniboard` serves it
on the address the user chose (127.0.0.1 unless told otherwise: omniboard has no login)
through :class:`~medseg.tracking.proxy.Proxy`, and restarts it when it stops answering while
the database answers: omniboard 2.16.1 gives up on its database connection after 30 s (ten
retries 3 s apart) and then answers every request with HTTP 500 "pool destroyed" until it
is restarted, so a database restart used to leave it dead.
"""

from __future__ import annotations

import fcntl
import json
import logging
import os
import re
import shutil
import subprocess
import tempfile
import time
from pathlib import Path

from medseg import db
from medseg.errors import MedsegError
from medseg.tracking.proxy import Proxy, UnixHTTPConnection

log = logging.getLogger("medseg")

VERSION = "2.16.1"


def cache_dir() -> Path:
    """``$MEDSEG_CACHE_DIR``, else ``$XDG_CACHE_HOME/medseg``, else ``~/.cache/medseg``."""
    if os.environ.get("MEDSEG_CACHE_DIR"):
        return Path(os.environ["MEDSEG_CACHE_DIR"]).expanduser()
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "medseg"


def install(directory: Path | None = None) -> Path:
    """Install omniboard ``VERSION`` with npm unless it is there; return its executable."""
    directory = directory or cache_dir() / "omniboard"
    executable = directory / "node_modules" / ".bin" / "omniboard"
    if _installed_version(directory) == VERSION and executable.exists():
        return executable
    npm = shutil.which("npm")
    if npm is None:
        raise MedsegError("npm was not found; install Node.js 14 or newer (it brings npm), or "
                          "run omniboard with docker compose (see docs/tracking.md)")
    directory.mkdir(parents=True, exist_ok=True)
    with open(directory / ".install.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # a second install waits for the first
        if _installed_version(directory) == VERSION and executable.exists():
            return executable
        (directory / "package.json").write_text(json.dumps(
            {"name": "medseg-omniboard", "private": True}, indent=2))
        log_path = directory / "npm-install.log"
        with open(log_path, "w") as log:
            done = subprocess.run([npm, "install", "--no-audit", "--no-fund", "--prefix",
                                   str(directory), f"omniboard@{VERSION}"],
                                  stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
        if done.returncode != 0 or not executable.exists():
            tail = "\n".join(log_path.read_text(errors="replace").splitlines()[-5:])
            raise MedsegError(f"npm could not install omniboard@{VERSION} "
                              f"(see {log_path}):\n{tail}")
    return executable


def _installed_version(directory: Path) -> str | None:
    try:
        return json.loads((directory / "node_modules" / "omniboard" / "package.json")
                          .read_text())["version"]
    except (OSError, ValueError, KeyError):
        return None


def url_with_database(url: str, db_name: str) -> str:
    """omniboard takes the database from the URL's path: ``mongodb://h:p/DB?options``."""
    scheme, rest = url.split("://", 1)
    authority, tail = re.match(r"([^/?]*)(.*)", rest).groups()
    query = tail[tail.index("?"):] if "?" in tail else ""
    return f"{scheme}://{authority}/{db_name}{query}"


#: What a run's plot opens on: the losses; :func:`headline_metrics` adds each experiment's
#: monitored metric. The rest (memory, timings, per-structure scores) stay one click away in
#: the plot's metric list.
HEADLINE_METRICS = ("train_loss", "val_loss")
#: Where omniboard 2.16.1 keeps the plot's default selection in the browser's localStorage
#: (its MetricsPlotView prefixes a ``dbKey`` prop that nothing passes, hence "undefined").
#: Without an entry, every series of a run is selected.
PLOT_DEFAULTS_KEY = "undefined|MetricsPlotView|default"


def headline_metrics(database) -> list[str]:
    """The losses and every monitored metric (``training.monitor``) of the runs in
    ``database``: what a plot should open on."""
    monitors = database["runs"].distinct("config.training.monitor")
    names = list(HEADLINE_METRICS)
    names += sorted({m for m in monitors if isinstance(m, str)} - set(names))
    return names


#: Where omniboard keeps the runs table's state (filters included) for its database "default"
#: (the one ``MONGO_URI`` names).
RUNS_TABLE_KEY = "default|RunsTable|1"
#: The runs table's default filter: the runs of data commands (experiment ``<name>_data``)
#: left out. It shows as a filter label; one click on it disables it and lists them too.
TRAINING_RUNS_FILTER = {"name": "experiment.name", "operator": "$regex",
                        "value": "^(?!.*_data$)", "disabled": False}


def defaults_script(metric_names: list[str]) -> str:
    """A ``<script>`` that gives omniboard its defaults where the browser has none: the plot
    opens on ``metric_names``, the runs table leaves out data runs. omniboard keeps the
    user's own choices under the same keys, so once made they are kept."""
    defaults = {
        PLOT_DEFAULTS_KEY: {"metricNameOptions": [{"label": name, "value": name,
                                                   "selected": True} for name in metric_names]},
        RUNS_TABLE_KEY: {"filters": {"status": [], "advanced": [TRAINING_RUNS_FILTER]}},
    }
    settings = "".join(
        "if (!window.localStorage.getItem(%s)) { window.localStorage.setItem(%s, %s); } "
        % (json.dumps(key), json.dumps(key), json.dumps(json.dumps(value)))
        for key, value in defaults.items())
    return f"<script>(function () {{ {settings}}})();</script>"


def environment(url: str, db_name: str, listen: str | int) -> dict[str, str]:
    """omniboard's settings: the database URL, and where it listens (``PORT``: a port, or
    the path of a Unix socket)."""
    return {**os.environ, "MONGO_URI": url_with_database(url, db_name), "PORT": str(listen)}


class Omniboard:
    """omniboard on ``host:port``, restarted whenever it stops answering while its database
    answers. :meth:`serve` blocks until Ctrl-C (or :meth:`stop` from another thread)."""

    def __init__(self, executable: Path, url: str, db_name: str, *, host: str, port: int,
                 plot_metrics: list[str], log_file=None, check_interval_s: float = 5.0,
                 start_grace_s: float = 30.0) -> None:
        self.executable, self.url, self.db_name = executable, url, db_name
        self.log_file = log_file
        self.check_interval_s, self.start_grace_s = check_interval_s, start_grace_s
        self.restarts = 0
        self._folder = Path(tempfile.mkdtemp(prefix="medseg-omniboard-"))  # mode 0700
        self.socket_path = self._folder / "omniboard.sock"
        try:
            self.proxy = Proxy((host, port), self.socket_path, defaults_script(plot_metrics),
                               unavailable="omniboard is restarting; reload in a few seconds")
        except OSError as error:
            shutil.rmtree(self._folder, ignore_errors=True)
            raise MedsegError(f"cannot listen on {host}:{port} ({error.strerror}); choose "
                              "another port with --port") from None
        self.process: subprocess.Popen | None = None
        self._started_at = 0.0
        self._stopping = False

    @property
    def address(self) -> str:
        host, port = self.proxy.server_address[:2]
        return f"http://{host}:{port}"

    def serve(self) -> None:
        self.proxy.serve_in_background()
        self._start()
        try:
            while not self._stopping:
                time.sleep(self.check_interval_s)
                if not self._stopping:
                    self._check()
        finally:
            self.close()

    def stop(self) -> None:
        self._stopping = True

    def close(self) -> None:
        self._stopping = True
        self._terminate()
        self.proxy.shutdown()
        self.proxy.server_close()
        shutil.rmtree(self._folder, ignore_errors=True)

    def answers(self) -> bool:
        """Whether omniboard answers a query of the runs (which needs its database)."""
        connection = UnixHTTPConnection(self.socket_path, timeout=10)
        try:
            connection.request("GET", "/sacred/api/v1/Runs?select=_id&limit=1")
            return connection.getresponse().status == 200
        except OSError:
            return False
        finally:
            connection.close()

    def _start(self) -> None:
        self.socket_path.unlink(missing_ok=True)
        self.process = subprocess.Popen(
            [str(self.executable)], env=environment(self.url, self.db_name, self.socket_path),
            stdout=self.log_file, stderr=subprocess.STDOUT if self.log_file else None,
            stdin=subprocess.DEVNULL)
        self._started_at = time.monotonic()

    def _terminate(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()

    def _check(self) -> None:
        exited = self.process.poll() is not None
        if not exited and (time.monotonic() - self._started_at < self.start_grace_s
                           or self.answers() or not db.ping(self.url, timeout_s=2.0)):
            return
        reason = (f"omniboard exited (code {self.process.returncode})" if exited else
                  "omniboard stopped answering while the database answers (it does not "
                  "reconnect after a database restart)")
        log.warning("%s; restarting it", reason)
        self._terminate()
        self._start()
        self.restarts += 1
