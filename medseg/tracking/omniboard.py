"""omniboard (npm) against medseg's database: installed once into a cache folder, started
in the foreground with the database URL in its environment (not on its command line, where
other users of the machine could read a password)."""

from __future__ import annotations

import fcntl
import json
import os
import re
import shutil
import subprocess
from pathlib import Path

from medseg.errors import MedsegError

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


def environment(url: str, db_name: str, port: int) -> dict[str, str]:
    return {**os.environ, "MONGO_URI": url_with_database(url, db_name), "PORT": str(port)}


def start(executable: Path, url: str, db_name: str, port: int, log=None) -> subprocess.Popen:
    """Start omniboard; with ``log`` (a file) its output goes there, else to the terminal,
    where Ctrl-C stops it together with ``medseg db omniboard``."""
    return subprocess.Popen([str(executable)], env=environment(url, db_name, port),
                            stdout=log, stderr=subprocess.STDOUT if log else None,
                            stdin=subprocess.DEVNULL)
