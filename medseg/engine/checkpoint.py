"""Checkpoints: atomic writes, best/last/periodic files with retention, safe loading.

A checkpoint is a plain dict of tensors and Python primitives so that it loads with
``torch.load(weights_only=True)``: no pickled classes, nothing that executes on load.
"""

from __future__ import annotations

import io
import json
import os
import re
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import torch
from torch import nn

from medseg.errors import DataError, describe
from medseg.files import make_temporary_file, remove_leftovers, reporting_full_disk

FORMAT_VERSION = 1
#: Key names a pipeline may store instead of the engine's (SMALabeller's documented
#: ``model_state``, ``optimizer_state`` ...); loading maps them back.
KEY_ALIASES = {"model_state": "model", "optimizer_state": "optimizer",
               "scheduler_state": "scheduler", "scaler_state": "scaler"}


def plain(value: Any) -> Any:
    """A deep copy of ``value`` made of dicts, lists and JSON scalars (Sacred's read-only
    containers and tuples included), so it pickles with the safe loader's allow-list."""
    return json.loads(json.dumps(value, default=str))


def atomic_save(obj: Any, path: str | Path) -> Path:
    """Write ``obj`` with ``torch.save`` to a temporary file beside ``path``, then rename.

    A crash or a full disk leaves either the previous file or the new one, never half a file;
    a full disk is a :class:`~medseg.errors.DiskFullError` naming ``path``.
    """
    path = Path(path)
    # Serialised in memory first: torch's zip writer reports a failed write as
    # "unexpected pos", without the OSError (ENOSPC) that says the disk is full.
    buffer = io.BytesIO()
    torch.save(obj, buffer)
    with reporting_full_disk(path, "the previous checkpoint there, if any, is unchanged"):
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp_name = make_temporary_file(path)
        try:
            with os.fdopen(fd, "wb") as handle:
                handle.write(buffer.getbuffer())
                handle.flush()
                os.fsync(handle.fileno())
            os.replace(tmp_name, path)
        except BaseException:
            Path(tmp_name).unlink(missing_ok=True)
            raise
    return path


def load_checkpoint(path: str | Path, map_location: str | torch.device = "cpu") -> dict[str, Any]:
    """Load a checkpoint written by :class:`CheckpointManager` with the safe unpickler."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"checkpoint {path} does not exist")
    try:
        state = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as error:  # torch raises several types for truncated or foreign files
        reason = describe(error)
        if "weights_only" in str(error):  # torch's advice to load unsafely: never repeated
            reason = (f"{type(error).__name__}: it is not a file of tensors and plain values; "
                      "random or damaged bytes, or pickled Python objects, which are not loaded")
        raise DataError(f"checkpoint {path} could not be read as a medseg checkpoint "
                        f"({reason})") from None
    if isinstance(state, Mapping):
        state = {KEY_ALIASES.get(key, key): value for key, value in state.items()}
    if not isinstance(state, Mapping) or "model" not in state:
        raise DataError(f"checkpoint {path} has no 'model' entry; expected a file written "
                        "by medseg (keys: model, optimizer, epoch, ...)")
    return dict(state)


def model_weights(path: str | Path, map_location: str | torch.device = "cpu") -> dict[str, Any]:
    """Only the model's state dict from a checkpoint (for evaluation and prediction)."""
    return load_checkpoint(path, map_location)["model"]


def rebuilt_model(path: str | Path, build: Callable[[dict[str, Any] | None], nn.Module], *,
                  map_location: str | torch.device = "cpu") -> tuple[nn.Module, dict[str, Any]]:
    """The network a checkpoint was trained with, and the checkpoint: ``build(model_config)``
    gets the ``model`` part of the config stored in it (``None`` when it stored none) and the
    checkpoint's weights are loaded into what it returns."""
    state = load_checkpoint(path, map_location)
    model = build((state.get("config") or {}).get("model"))
    try:
        model.load_state_dict(state["model"])
    except RuntimeError as error:
        raise DataError(f"checkpoint {path} does not fit its own model config "
                        f"({describe(error)})") from None
    return model, state


class CheckpointManager:
    """Decides which files an epoch writes and removes the ones retention lets go.

    - ``best``: written whenever the monitored metric improves;
    - ``last``: the state after the newest epoch (skipped with ``keep_best_only``);
    - periodic: every ``save_frequency`` epochs, the newest ``keep_periodic`` kept
      (``None`` keeps all; skipped with ``keep_best_only``).
    File names are templates so each pipeline keeps the names its users know.
    """

    def __init__(
        self,
        directory: str | Path,
        *,
        save_frequency: int = 0,
        keep_best_only: bool = False,
        keep_periodic: int | None = None,
        best_name: str = "best_model.pth",
        last_name: str = "last_model.pth",
        periodic_name: str = "checkpoint_epoch_{epoch}.pth",
        stored_keys: Mapping[str, str] | None = None,
    ) -> None:
        self.directory = Path(directory)
        self.save_frequency = save_frequency
        self.keep_best_only = keep_best_only
        self.keep_periodic = keep_periodic
        self.best_name = best_name
        self.last_name = last_name
        self.periodic_name = periodic_name
        #: engine key -> the name written (e.g. ``{"model": "model_state"}``)
        self.stored_keys = dict(stored_keys or {})
        self._periodic = self._existing_periodic()
        #: The newest file written that training can resume from, and its epoch.
        self.latest: Path | None = None
        self.latest_epoch: int | None = None
        for name in {best_name, last_name, periodic_name}:
            remove_leftovers((self.directory / name).parent)

    @property
    def best_path(self) -> Path:
        return self.directory / self.best_name

    @property
    def last_path(self) -> Path:
        return self.directory / self.last_name

    def save(self, state: Mapping[str, Any], *, epoch: int, is_best: bool) -> list[Path]:
        """Write the files due after ``epoch`` (1-based); return the paths written."""
        payload = {"format_version": FORMAT_VERSION,
                   **{self.stored_keys.get(key, key): value for key, value in state.items()}}
        written = []
        if is_best:
            written.append(atomic_save(payload, self.best_path))
        if not self.keep_best_only:
            written.append(atomic_save(payload, self.last_path))
            if self.save_frequency and epoch % self.save_frequency == 0:
                periodic = atomic_save(payload,
                                       self.directory / self.periodic_name.format(epoch=epoch))
                written.append(periodic)
                self._periodic.append(periodic)
                self._prune_periodic()
        if written:  # with keep_best_only the best file is the newest state, else last
            self.latest = self.best_path if self.keep_best_only else self.last_path
            self.latest_epoch = epoch
        return written

    def _existing_periodic(self) -> list[Path]:
        """Periodic files already in the folder (a resumed run), oldest first, so that
        retention counts them too."""
        prefix, _, rest = self.periodic_name.partition("{epoch")
        suffix = rest.partition("}")[2]
        pattern = re.compile(re.escape(prefix) + r"(\d+)" + re.escape(suffix) + "$")
        found = []
        for path in self.directory.glob(f"{prefix}*{suffix}"):
            match = pattern.match(path.name)
            if match:
                found.append((int(match.group(1)), path))
        return [path for _, path in sorted(found)]

    def _prune_periodic(self) -> None:
        if self.keep_periodic is None:
            return
        while len(self._periodic) > self.keep_periodic:
            self._periodic.pop(0).unlink(missing_ok=True)
