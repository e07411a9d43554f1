"""The ``checkpoint`` ingredient: where checkpoints go, how often, what is kept, and resume."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

from ingredients.fields import Field, FieldIngredient
from medseg import config as c
from medseg.engine.checkpoint import CheckpointManager
from medseg.errors import ConfigError

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


class CheckpointIngredient(FieldIngredient):
    """``best_name``, ``last_name`` and ``periodic_name`` are the file names the pipeline's
    users know (``best_model.pth``, ``best.pth``, ``weights/best.pt`` ...)."""

    def __init__(self, *, best_name: str = "best_model.pth", last_name: str = "last_model.pth",
                 periodic_name: str = "checkpoint_epoch_{epoch}.pth", **defaults: Any) -> None:
        super().__init__("checkpoint", FIELDS, defaults)

        @self.capture
        def make_manager(_run, save_dir: str, save_frequency: int, keep_best_only: bool,
                         keep_periodic) -> CheckpointManager:
            directory = run_directory(save_dir, _run.experiment_info["name"], _run._id)
            return CheckpointManager(directory, save_frequency=save_frequency,
                                     keep_best_only=keep_best_only, keep_periodic=keep_periodic,
                                     best_name=best_name, last_name=last_name,
                                     periodic_name=periodic_name)

        self.make_manager = make_manager

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
