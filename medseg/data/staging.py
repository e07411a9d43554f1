"""Writing a whole output folder or nothing: files go to a hidden sibling folder that is
renamed into place once complete, so an interrupted or failed run leaves no half-written
dataset behind."""

from __future__ import annotations

import contextlib
import os
import shutil
from collections.abc import Iterator
from pathlib import Path

from medseg.errors import DataError
from medseg.files import make_temporary_dir, remove_leftovers


def refuse_to_overwrite(output_dir: str | Path, overwrite: bool, what: str,
                        overwrite_key: str = "overwrite") -> None:
    """Stop unless ``output_dir`` is missing, an empty folder, or ``overwrite`` is set (the
    config entry ``overwrite_key``, which the message names)."""
    output_dir = Path(output_dir)
    if output_dir.exists() and not output_dir.is_dir():
        raise DataError(f"{output_dir} exists and is not a folder; expected a folder (or "
                        f"nothing) to write the {what} into")
    if output_dir.is_dir() and any(output_dir.iterdir()) and not overwrite:
        raise DataError(f"{output_dir} already contains files; expected an empty or missing "
                        f"folder for the {what} (set {overwrite_key}=True to replace it)")


@contextlib.contextmanager
def staged_directory(output_dir: str | Path) -> Iterator[Path]:
    """Yield an empty staging folder beside ``output_dir``; on success it replaces
    ``output_dir`` (an old one is removed only afterwards), on failure it is deleted."""
    output_dir = Path(output_dir)
    output_dir.parent.mkdir(parents=True, exist_ok=True)
    remove_leftovers(output_dir.parent, output_dir.name)  # of a killed earlier run
    staging = make_temporary_dir(output_dir, ".partial")
    try:
        yield staging
        _move_into_place(staging, output_dir)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise


@contextlib.contextmanager
def staged_folder(output_dir: str | Path, *, overwrite: bool, what: str,
                  overwrite_key: str = "overwrite") -> Iterator[Path]:
    """:func:`refuse_to_overwrite`, then :func:`staged_directory`."""
    refuse_to_overwrite(output_dir, overwrite, what, overwrite_key)
    with staged_directory(output_dir) as staging:
        yield staging


def _move_into_place(staging: Path, output_dir: Path) -> None:
    if not output_dir.exists():
        os.replace(staging, output_dir)
        return
    retired = make_temporary_dir(output_dir, ".old")
    os.replace(output_dir, retired / output_dir.name)
    os.replace(staging, output_dir)
    shutil.rmtree(retired, ignore_errors=True)
