"""Temporary files named after the process that writes them, and their removal once that
process is gone.

A file being written goes to a hidden temporary name first (``.best_model.pth.<pid>-x.tmp``,
``.dataset.<pid>-x.partial``) and is renamed into place when complete. Ctrl-C and SIGTERM
remove it on the way out; SIGKILL (or a power cut) cannot, so the next run in the same folder
removes the temporaries of processes that no longer exist. The process id in the name is
what tells a leftover from a file another running process is writing right now.
"""

from __future__ import annotations

import contextlib
import errno
import logging
import os
import re
import shutil
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

from medseg.errors import DiskFullError

log = logging.getLogger("medseg")

_OWNER = re.compile(r"\.(\d+)-[^./]*\.(?:tmp|partial|old)$")
#: A temporary without a process id in its name (written by an older version) is taken to
#: be left over once it is this old.
_UNOWNED_AGE_S = 3600.0


def temporary_prefix(name: str) -> str:
    """Prefix of a temporary file or folder standing in for ``name`` in this process."""
    return f".{name}.{os.getpid()}-"


def make_temporary_file(target: Path, suffix: str = ".tmp") -> tuple[int, str]:
    """``tempfile.mkstemp`` beside ``target``, named for :func:`remove_leftovers`."""
    return tempfile.mkstemp(dir=target.parent, prefix=temporary_prefix(target.name), suffix=suffix)


def make_temporary_dir(target: Path, suffix: str) -> Path:
    return Path(tempfile.mkdtemp(dir=target.parent, prefix=temporary_prefix(target.name),
                                 suffix=suffix))


def _process_exists(pid: int) -> bool:
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process
        return True
    return True


def is_leftover(path: Path) -> bool:
    """Whether ``path`` is a temporary (``.*.tmp``, ``.*.partial``, ``.*.old``) whose writer
    is gone."""
    match = _OWNER.search(path.name)
    if match:
        return not _process_exists(int(match.group(1)))
    try:
        return time.time() - path.lstat().st_mtime > _UNOWNED_AGE_S
    except OSError:
        return False


def remove_leftovers(directory: str | Path, name: str = "*") -> list[Path]:
    """Remove the leftover temporaries of ``name`` (a glob) in ``directory``; return them."""
    directory = Path(directory)
    if not directory.is_dir():
        return []
    removed = []
    for suffix in (".tmp", ".partial", ".old"):
        for path in directory.glob(f".{name}.*{suffix}"):
            if not is_leftover(path):
                continue
            if path.is_dir() and not path.is_symlink():
                shutil.rmtree(path, ignore_errors=True)
            else:
                path.unlink(missing_ok=True)
            removed.append(path)
    if removed:
        log.info("removed %d file(s) an interrupted run left in %s: %s", len(removed), directory,
                 ", ".join(p.name for p in removed))
    return removed


NO_SPACE = frozenset({errno.ENOSPC, errno.EDQUOT})


def is_no_space(error: BaseException) -> bool:
    return isinstance(error, OSError) and error.errno in NO_SPACE


def no_space_error(path: str | Path, consequence: str = "") -> DiskFullError:
    """The one-line error for a write to ``path`` that found its file system full."""
    path = Path(path)
    folder = next((p for p in [path, *path.parents] if p.exists()), None)
    free = ""
    if folder is not None:
        with contextlib.suppress(OSError):
            free = f", {shutil.disk_usage(folder).free // 1024} KiB free"
    return DiskFullError(f"no space left on the device holding {path}{free}; "
                         f"{consequence + '; ' if consequence else ''}free some space there or "
                         "write elsewhere")


@contextlib.contextmanager
def reporting_full_disk(path: str | Path, consequence: str = "") -> Iterator[None]:
    """Turn a full disk (an OSError whose message names no file, or a library's own
    error) while writing ``path`` into :class:`DiskFullError` naming it."""
    try:
        yield
    except OSError as error:
        if error.errno in NO_SPACE:
            raise no_space_error(path, consequence) from None
        raise
