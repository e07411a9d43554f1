"""A small full file system for tests: a tmpfs of a few hundred KiB when the tests run as
root, else a folder whose writes fail with ENOSPC past a byte budget (``sitecustomize`` in
the subprocess wraps ``open``, ``os.fdopen`` and ``shutil``'s copies for paths below it).

Either way the experiment runs in a subprocess started as a user starts it."""

from __future__ import annotations

import os
import subprocess
import textwrap
from dataclasses import dataclass, field
from pathlib import Path

SITECUSTOMIZE = textwrap.dedent('''
    import builtins, errno, io, os, shutil
    _ROOT = os.environ["MEDSEG_TEST_FULL_DIR"]
    _BUDGET = [int(os.environ["MEDSEG_TEST_FULL_BYTES"])]
    _open, _fdopen = builtins.open, os.fdopen
    shutil._USE_CP_SENDFILE = False  # copies go through write()

    class _Limited:
        def __init__(self, handle):
            self._handle = handle
            _BUDGET[0] = max(_BUDGET[0] - 4096, 0)  # a file takes a block, as on a tmpfs
        def write(self, data):
            if len(data) > _BUDGET[0]:
                _BUDGET[0] = 0
                raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
            _BUDGET[0] -= len(data)
            return self._handle.write(data)
        def __getattr__(self, name):
            return getattr(self._handle, name)
        def __iter__(self):
            return iter(self._handle)
        def __enter__(self):
            return self
        def __exit__(self, *exc):
            self._handle.close()

    def _below(path):
        try:
            return os.path.abspath(os.fspath(path)).startswith(_ROOT)
        except TypeError:
            return False

    def _writing(mode):
        return any(c in mode for c in "wax+")

    def open(file, mode="r", *args, **kwargs):
        handle = _open(file, mode, *args, **kwargs)
        return _Limited(handle) if _writing(mode) and _below(file) else handle

    def fdopen(fd, mode="r", *args, **kwargs):
        handle = _fdopen(fd, mode, *args, **kwargs)
        target = os.readlink(f"/proc/self/fd/{fd}")
        return _Limited(handle) if _writing(mode) and _below(target) else handle

    _link = os.link

    def link(source, target, *args, **kwargs):  # another file system: no hard links into it
        if _below(target):
            raise OSError(errno.EXDEV, os.strerror(errno.EXDEV))
        return _link(source, target, *args, **kwargs)

    builtins.open = io.open = open
    os.fdopen = fdopen
    os.link = link
''')


@dataclass
class FullDisk:
    path: Path
    env: dict[str, str] = field(default_factory=dict)
    mounted: bool = False

    def environment(self, base: dict[str, str]) -> dict[str, str]:
        env = dict(base)
        if self.env:
            env.update({k: v for k, v in self.env.items() if k != "PYTHONPATH_PREPEND"})
            env["PYTHONPATH"] = os.pathsep.join(filter(None, [self.env["PYTHONPATH_PREPEND"],
                                                              env.get("PYTHONPATH")]))
        return env

    def close(self) -> None:
        if self.mounted:
            subprocess.run(["umount", str(self.path)], check=False)


def full_disk(tmp_path: Path, size_kib: int) -> FullDisk:
    path = tmp_path / "small_disk"
    path.mkdir()
    if os.geteuid() == 0 and not os.environ.get("MEDSEG_TEST_SIMULATE_FULL_DISK"):
        mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size_kib}k", "tmpfs",
                                  str(path)], capture_output=True)
        if mounted.returncode == 0:
            return FullDisk(path, mounted=True)
    site = tmp_path / "full_disk_site"
    site.mkdir()
    (site / "sitecustomize.py").write_text(SITECUSTOMIZE)
    return FullDisk(path, env={"MEDSEG_TEST_FULL_DIR": str(path.resolve()),
                               "MEDSEG_TEST_FULL_BYTES": str(size_kib * 1024),
                               "PYTHONPATH_PREPEND": str(site)})
