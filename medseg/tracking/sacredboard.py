"""sacredboard against medseg's database: installed once into an environment of its own
(it is unmaintained and needs ``pymongo<4``, which medseg's environment cannot have), every
version pinned in ``docs/sacredboard-requirements.txt``, and started through
``tools/sacredboard_shim.py``, which makes its runs page work against the embedded server and
binds it to the address the user chose (see that file). The shim lives outside the library
because it imports sacredboard, which only that environment has."""

from __future__ import annotations

import fcntl
import os
import subprocess
import sys
from pathlib import Path

from medseg.errors import MedsegError
from medseg.tracking.omniboard import cache_dir

VERSION = "0.4.2"
ROOT = Path(__file__).resolve().parents[2]
REQUIREMENTS = ROOT / "docs" / "sacredboard-requirements.txt"
SHIM = ROOT / "tools" / "sacredboard_shim.py"


def install(directory: Path | None = None) -> Path:
    """Create the environment of ``REQUIREMENTS`` unless it is there; return its Python."""
    directory = directory or cache_dir() / "sacredboard-env"
    python = directory / "bin" / "python"
    stamp = directory / "requirements.txt"
    wanted = REQUIREMENTS.read_text()
    if stamp.is_file() and stamp.read_text() == wanted and python.exists():
        return python
    directory.parent.mkdir(parents=True, exist_ok=True)
    with open(directory.parent / ".sacredboard-install.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # a second install waits for the first
        if stamp.is_file() and stamp.read_text() == wanted and python.exists():
            return python
        log_path = directory.parent / "sacredboard-install.log"
        with open(log_path, "w") as log:
            for step in ([sys.executable, "-m", "venv", "--clear", str(directory)],
                         [str(python), "-m", "pip", "install", "-r", str(REQUIREMENTS)]):
                done = subprocess.run(step, stdout=log, stderr=subprocess.STDOUT,
                                      stdin=subprocess.DEVNULL)
                if done.returncode != 0:
                    tail = "\n".join(log_path.read_text(errors="replace").splitlines()[-5:])
                    raise MedsegError(f"could not install sacredboard {VERSION} into {directory} "
                                      f"(see {log_path}):\n{tail}")
        stamp.write_text(wanted)
    return python


def start(python: Path, url: str, db_name: str, *, host: str, port: int,
          log=None) -> subprocess.Popen:
    """Start sacredboard on ``host:port``; the URL goes in its environment, not on its
    command line. With ``log`` (a file) its output goes there, else to the terminal."""
    # -I: the shim's folder (which holds this module, also called sacredboard) stays off sys.path
    return subprocess.Popen([str(python), "-I", str(SHIM), host, str(port), db_name],
                            env={**os.environ, "MONGO_URI": url}, stdout=log,
                            stderr=subprocess.STDOUT if log else None, stdin=subprocess.DEVNULL)
