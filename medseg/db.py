"""The embedded MongoDB-compatible server (PyPI ``secantusdb``) behind ``medseg db``.

It listens on 127.0.0.1 only and keeps its data in a user directory, so Sacred's
MongoObserver, incense and omniboard work on a machine without MongoDB or Docker.
:class:`LocalServer` is one server process (the tests start their own on a free port);
:func:`start` / :func:`stop` manage the user's background server and its state file.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

from medseg.errors import MedsegError

DEFAULT_HOST = "127.0.0.1"
DEFAULT_PORT = 27017


def data_dir() -> Path:
    """``$MEDSEG_DB_DIR``, else ``$XDG_DATA_HOME/medseg/db``, else ``~/.local/share/medseg/db``."""
    if os.environ.get("MEDSEG_DB_DIR"):
        return Path(os.environ["MEDSEG_DB_DIR"]).expanduser()
    base = os.environ.get("XDG_DATA_HOME") or Path.home() / ".local" / "share"
    return Path(base) / "medseg" / "db"


def default_port() -> int:
    value = os.environ.get("MEDSEG_DB_PORT", str(DEFAULT_PORT))
    if not value.isdigit() or not 0 < int(value) < 65536:
        raise MedsegError(f"MEDSEG_DB_PORT must be a port number, got {value!r}")
    return int(value)


def local_url(port: int | None = None) -> str:
    return f"mongodb://{DEFAULT_HOST}:{port or default_port()}"


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on right now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.bind((DEFAULT_HOST, 0))
        return probe.getsockname()[1]


def redact(url: str) -> str:
    """The URL with its password replaced, for messages and logs.

    Works on malformed URLs too (a bad port, a missing host), which is exactly when a URL
    ends up in an error message.
    """
    scheme_end = url.find("://")
    if scheme_end < 0:
        return url
    rest = url[scheme_end + 3:]
    authority = re.split(r"[/?]", rest, maxsplit=1)[0]
    at = authority.rfind("@")
    if at < 0 or ":" not in authority[:at]:
        return url
    user = authority[:at].split(":", 1)[0]
    return f"{url[:scheme_end + 3]}{user}:***@{rest[at + 1:]}"


def ping(url: str, timeout_s: float = 0.5) -> bool:
    """Whether a MongoDB server answers at ``url`` within ``timeout_s``."""
    import pymongo
    from pymongo.errors import ConfigurationError, InvalidURI, PyMongoError

    try:
        client = pymongo.MongoClient(url, serverSelectionTimeoutMS=int(timeout_s * 1000),
                                     connectTimeoutMS=int(timeout_s * 1000))
    except (ConfigurationError, InvalidURI, ValueError):
        return False
    try:
        client.admin.command("ping")
        return True
    except PyMongoError:
        return False
    finally:
        client.close()


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _reap(pid: int) -> None:
    try:
        os.waitpid(pid, os.WNOHANG)
    except ChildProcessError:
        pass


def _server_executable() -> str:
    beside_python = Path(sys.executable).with_name("secantusd-py")
    if beside_python.exists():
        return str(beside_python)
    found = shutil.which("secantusd-py")
    if found is None:
        raise MedsegError("secantusd-py was not found; install the package with "
                          "`pip install secantusdb` (make install does)")
    return found


def _tail(path: Path, lines: int = 10) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return "(no log)"


class LocalServer:
    """One secantusdb process on 127.0.0.1:``port`` keeping its data in ``storage``.

    ``start`` waits until the server answers; ``stop`` signals the process and waits for
    it to exit, so the port and the storage are free for the next start.
    """

    def __init__(self, port: int, storage: Path, log: Path, *, auth: bool = False) -> None:
        self.port, self.storage, self.log, self.auth = port, Path(storage), Path(log), auth
        self.pid: int | None = None
        self._process: subprocess.Popen | None = None

    @property
    def url(self) -> str:
        return local_url(self.port)

    def start(self, wait_s: float = 30.0) -> None:
        self.storage.mkdir(parents=True, exist_ok=True)
        self.log.parent.mkdir(parents=True, exist_ok=True)
        command = [_server_executable(), "--host", DEFAULT_HOST, "--port", str(self.port),
                   "--storage-path", str(self.storage), "--standalone"]
        if self.auth:
            command.append("--auth")
        with open(self.log, "ab") as log:
            self._process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT,
                                             stdin=subprocess.DEVNULL, start_new_session=True)
        self.pid = self._process.pid
        deadline = time.monotonic() + wait_s
        while time.monotonic() < deadline:
            if self._process.poll() is not None:
                raise MedsegError(f"the database server exited with code "
                                  f"{self._process.returncode}; last lines of {self.log}:\n"
                                  f"{_tail(self.log)}")
            if self._answers():
                return
            time.sleep(0.2)
        self.stop()
        raise MedsegError(f"the database server did not answer on port {self.port} within "
                          f"{wait_s:.0f} s; see {self.log}")

    def _answers(self) -> bool:
        # With --auth a ping still answers: the handshake needs no credentials.
        return ping(self.url)

    def stop(self, wait_s: float = 15.0) -> bool:
        """Stop the process; return whether it was running."""
        if self.pid is None or not _alive(self.pid):
            return False
        stop_process(self.pid, wait_s, self._process)
        return True


def stop_process(pid: int, wait_s: float, process: subprocess.Popen | None = None) -> None:
    """SIGTERM, wait for the exit (reaping a child), SIGKILL if it does not come."""
    os.kill(pid, signal.SIGTERM)
    deadline = time.monotonic() + wait_s
    while time.monotonic() < deadline:
        if process is not None and process.poll() is not None:
            return
        _reap(pid)
        if not _alive(pid):
            return
        time.sleep(0.1)
    os.kill(pid, signal.SIGKILL)
    if process is not None:
        process.wait(timeout=wait_s)


def start_on_free_port(directory: Path, *, auth: bool = False, attempts: int = 3) -> LocalServer:
    """A server on a free port keeping its data in ``directory/data`` (tests, notebooks);
    tried again on another port if the chosen one was taken in the meantime."""
    for attempt in range(attempts):
        server = LocalServer(free_port(), directory / "data", directory / "server.log", auth=auth)
        try:
            server.start()
            return server
        except MedsegError:
            if attempt + 1 == attempts:
                raise


@dataclass
class ServerState:
    pid: int
    port: int
    storage: str
    log: str

    @property
    def url(self) -> str:
        return local_url(self.port)


def _state_file() -> Path:
    return data_dir() / "server.json"


def read_state() -> ServerState | None:
    try:
        return ServerState(**json.loads(_state_file().read_text()))
    except (OSError, ValueError, TypeError):
        return None


def start(port: int | None = None, storage: Path | None = None,
          wait_s: float = 30.0) -> ServerState:
    """Start the user's background server unless it already answers; return its state."""
    port = port or default_port()
    state = read_state()
    if state and state.port == port and _alive(state.pid) and ping(state.url):
        return state
    if ping(local_url(port)):
        raise MedsegError(f"another MongoDB server already answers on {DEFAULT_HOST}:{port}; "
                          "use it through MEDSEG_MONGO_URL or pick MEDSEG_DB_PORT")
    server = LocalServer(port, Path(storage or data_dir() / "data"), data_dir() / "server.log")
    server.start(wait_s)
    state = ServerState(pid=server.pid, port=port, storage=str(server.storage), log=str(server.log))
    _state_file().write_text(json.dumps(asdict(state)))
    return state


def stop(wait_s: float = 15.0) -> bool:
    """Stop the server started by :func:`start`; return whether one was running."""
    state = read_state()
    if state is None or not _alive(state.pid):
        _state_file().unlink(missing_ok=True)
        return False
    stop_process(state.pid, wait_s)
    _state_file().unlink(missing_ok=True)
    return True
