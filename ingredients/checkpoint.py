"""The ``checkpoint`` ingredient: where checkpoints go, how often, what is kept, and resume."""

from __future__ import annotations

import functools
import time
from pathlib import Path
from typing import Any

from ingredients.fields import Field, FieldIngredient
from medseg import config as c
from medseg.engine.checkpoint import CheckpointManager, load_checkpoint, plain
from medseg.errors import ConfigError
from medseg.tracking.compare import flatten_config

FIELDS = {
    "save_dir": Field("checkpoints/{experiment}/{run_id}", c.text(),
                      "Checkpoint folder; {experiment} and {run_id} are filled in"),
    "save_frequency": Field(10, c.integer(minimum=0), "Epochs between periodic checkpoints (0: none)"),
    "keep_best_only": Field(False, c.boolean(), "Write only the best checkpoint"),
    "keep_periodic": Field(None, c.optional(c.integer(minimum=1)),
                           "Newest periodic checkpoints to keep (null: all)"),
    "resume": Field(None, c.optional(c.text()), "Checkpoint to continue training from"),
}


def run_directory(template: str, experiment: str, run_id: Any) -> Path:
    """Fill the ``save_dir`` template; an unobserved run (no id) gets a timestamp."""
    run_id = run_id if run_id is not None else time.strftime("%Y%m%d-%H%M%S")
    return Path(template.format(experiment=experiment, run_id=run_id))


def make_checkpoint_manager(_run, save_dir: str, save_frequency: int, keep_best_only: bool,
                            keep_periodic, file_names: dict[str, str]) -> CheckpointManager:
    """The run's :class:`CheckpointManager` in ``checkpoint.save_dir`` (its placeholders filled
    from the run), keeping files as ``checkpoint.*`` says, under the pipeline's
    ``file_names``."""
    directory = run_directory(save_dir, _run.experiment_info["name"], _run._id)
    return CheckpointManager(directory, save_frequency=save_frequency,
                             keep_best_only=keep_best_only, keep_periodic=keep_periodic,
                             **file_names)


class CheckpointIngredient(FieldIngredient):
    """``best_name``, ``last_name`` and ``periodic_name`` are the file names the pipeline's
    users know (``best_model.pth``, ``best.pth``, ``weights/best.pt`` ...)."""

    def __init__(self, *, best_name: str = "best_model.pth", last_name: str = "last_model.pth",
                 periodic_name: str = "checkpoint_epoch_{epoch}.pth", **defaults: Any) -> None:
        super().__init__("checkpoint", FIELDS, defaults, resume_may_change=True)
        #: ``make_manager()``: :func:`make_checkpoint_manager` with this pipeline's file names.
        self.make_manager = functools.partial(
            self.captured(make_checkpoint_manager),
            file_names={"best_name": best_name, "last_name": last_name,
                        "periodic_name": periodic_name})

    def validate(self, config) -> None:
        super().validate(config)
        checkpoint = config[self.path]
        try:
            run_directory(checkpoint["save_dir"], "experiment", 1)
        except (KeyError, IndexError, ValueError):
            raise ConfigError(f"checkpoint.save_dir {checkpoint['save_dir']!r} may only use the "
                              "placeholders {experiment} and {run_id}") from None
        resume = checkpoint["resume"]
        if resume is not None and not Path(resume).is_file():
            raise ConfigError(f"checkpoint.resume: no checkpoint file at {resume}")


def check_resume_config(config: dict, may_change: dict[str, bool], *,
                        seed_given: bool) -> None:
    """A resumed run continues the training of ``checkpoint.resume``: entries that shaped it
    (``may_change[key]`` false: data, model, loss, optimizer, seed) must keep the values the
    checkpoint's run had; refuse in one line listing every difference. An entry the
    checkpoint's config does not have (it predates the entry) is not compared. ``seed`` not
    given on the command line is set to the checkpoint's (Sacred drew a new one)."""
    path = config["checkpoint"]["resume"]
    saved = load_checkpoint(path).get("config") or {}
    if not seed_given and "seed" in saved:
        config["seed"] = saved["seed"]
    old, new = flatten_config(saved), flatten_config(plain(config))
    changes = {key: (old[key], new.get(key)) for key in sorted(old)
               if old[key] != new.get(key) and not may_change.get(key, key == "tags")}
    if not changes:
        return
    shown = ", ".join(f"{key} {before!r} -> {after!r}" for key, (before, after) in changes.items())
    allowed = _allowed_summary(may_change)
    raise ConfigError(f"checkpoint.resume={path} continues a training run whose config differs in "
                      f"entries a resume may not change: {shown}; give them the checkpoint's "
                      f"values, or train a new run without checkpoint.resume (a resume may "
                      f"change {allowed})")


def _allowed_summary(may_change: dict[str, bool]) -> str:
    sections: dict[str, list[bool]] = {}
    for key, allowed in may_change.items():
        if "." in key:
            sections.setdefault(key.split(".")[0], []).append(allowed)
    whole = sorted(name for name, flags in sections.items() if all(flags))
    single = sorted(key for key, allowed in may_change.items()
                    if allowed and key.split(".")[0] not in whole)
    return ", ".join([*single, *(f"{name}.*" for name in whole), "tags"])
