"""Writing a dataset folder so that bad input or an interruption leaves nothing half-written."""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from medseg.errors import DataError


@contextmanager
def staged_folder(target: str | Path, *, overwrite: bool, what: str,
                  overwrite_key: str) -> Iterator[Path]:
    """Yield a hidden sibling folder of ``target`` to write into; rename it to ``target`` when
    the block finishes, remove it when the block raises.

    A non-empty ``target`` is replaced only with ``overwrite`` (named by ``overwrite_key`` in
    the message), and only after the new folder is complete.
    """
    target = Path(target)
    if target.exists() and not target.is_dir():
        raise DataError(f"{target} exists and is not a folder; expected a folder (or nothing) "
                        f"to write {what} into")
    if target.is_dir() and any(target.iterdir()) and not overwrite:
        raise DataError(f"{target} already contains files; expected an empty or missing folder "
                        f"(set {overwrite_key}=True to replace it)")
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{target.name}.", suffix=".partial",
                                    dir=target.parent))
    try:
        yield staging
        _move_into_place(staging, target)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise


def _move_into_place(staging: Path, target: Path) -> None:
    if not target.exists():
        os.replace(staging, target)
        return
    retired = Path(tempfile.mkdtemp(prefix=f".{target.name}.", suffix=".old", dir=target.parent))
    os.replace(target, retired / target.name)
    os.replace(staging, target)
    shutil.rmtree(retired, ignore_errors=True)
