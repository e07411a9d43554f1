"""The embedded MongoDB-compatible server (PyPI ``secantusdb``) behind ``medseg db``.

It listens on 127.0.0.1 only and keeps its data in a user directory, so Sacred's
MongoObserver, incense and omniboard work on a machine without MongoDB or Docker.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from urllib.parse import urlsplit, urlunsplit

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


def redact(url: str) -> str:
    """The URL with its password replaced, for messages and logs."""
    parts = urlsplit(url)
    if parts.password is None:
        return url
    host = parts.hostname or ""
    if parts.port:
        host = f"{host}:{parts.port}"
    netloc = f"{parts.username}:***@{host}"
    return urlunsplit((parts.scheme, netloc, parts.path, parts.query, parts.fragment))


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


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _server_executable() -> str:
    beside_python = Path(sys.executable).with_name("secantusd-py")
    if beside_python.exists():
        return str(beside_python)
    found = shutil.which("secantusd-py")
    if found is None:
        raise MedsegError("secantusd-py was not found; install the package with "
                          "`pip install secantusdb` (make install does)")
    return found


def start(port: int | None = None, storage: Path | None = None, wait_s: float = 30.0) -> ServerState:
    """Start the server in the background unless one already answers; return its state."""
    port = port or default_port()
    state = read_state()
    if state and state.port == port and _alive(state.pid) and ping(state.url):
        return state
    if ping(local_url(port)):
        raise MedsegError(f"another MongoDB server already answers on {DEFAULT_HOST}:{port}; "
                          "use it through MEDSEG_MONGO_URL or pick MEDSEG_DB_PORT")
    storage = Path(storage or data_dir() / "data")
    storage.mkdir(parents=True, exist_ok=True)
    log_path = data_dir() / "server.log"
    with open(log_path, "ab") as log:
        process = subprocess.Popen(
            [_server_executable(), "--host", DEFAULT_HOST, "--port", str(port),
             "--storage-path", str(storage), "--standalone"],
            stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
            start_new_session=True)
    state = ServerState(pid=process.pid, port=port, storage=str(storage), log=str(log_path))
    deadline = time.monotonic() + wait_s
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise MedsegError(f"the database server exited with code {process.returncode}; "
                              f"last lines of {log_path}:\n{_tail(log_path)}")
        if ping(state.url):
            _state_file().write_text(json.dumps(asdict(state)))
            return state
        time.sleep(0.2)
    process.terminate()
    raise MedsegError(f"the database server did not answer on port {port} within {wait_s:.0f} s; "
                      f"see {log_path}")


def stop(wait_s: float = 15.0) -> bool:
    """Stop the server started by :func:`start`; return whether one was running."""
    state = read_state()
    if state is None or not _alive(state.pid):
        _state_file().unlink(missing_ok=True)
        return False
    os.kill(state.pid, signal.SIGTERM)
    deadline = time.monotonic() + wait_s
    while _alive(state.pid) and time.monotonic() < deadline:
        _reap(state.pid)
        time.sleep(0.1)
    if _alive(state.pid):
        os.kill(state.pid, signal.SIGKILL)
    _state_file().unlink(missing_ok=True)
    return True


def _reap(pid: int) -> None:
    try:
        os.waitpid(pid, os.WNOHANG)
    except ChildProcessError:
        pass


def _tail(path: Path, lines: int = 10) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return "(no log)"
