"""``medseg runs rerun``: start a recorded run again with exactly its config.

The stored config (seed included) is written to a JSON file and handed to the experiment's
script as ``with CONFIG.json``, in the working directory the run was started from, with a
``-c`` comment naming the original run (omniboard shows it as the run's notes). The file is
kept (:func:`config_file_for`), so the printed command can be pasted into a shell later.
"""

from __future__ import annotations

import json
import os
import re
import shlex
import sys
from dataclasses import dataclass
from pathlib import Path

from medseg.errors import DataError
from medseg.tracking.compare import RunSummary


@dataclass
class RerunPlan:
    argv: list[str]
    cwd: Path
    config: dict

    def describe(self) -> str:
        """The command as a shell line, ready to paste."""
        return f"cd {shlex.quote(str(self.cwd))} && {shlex.join(self.argv)}"


def config_file_for(summary: RunSummary, folder: Path, db_name: str | None = None) -> Path:
    """Where the config of a re-run of ``summary`` is kept: one file per recorded run."""
    source = f"{db_name}-{summary.label}" if db_name else str(Path(summary.label).resolve())
    return folder / f"{re.sub(r'[^A-Za-z0-9]+', '_', source).strip('_')}.json"


def plan_rerun(summary: RunSummary, config_file: Path) -> RerunPlan:
    experiment = summary.experiment_info
    script = Path(experiment.get("base_dir", "")) / experiment.get("mainfile", "")
    if not experiment.get("mainfile") or not script.is_file():
        raise DataError(f"{summary.label} was started from {script}, which does not exist on "
                        "this machine; run its experiment script by hand with "
                        f"`with {config_file}`")
    working_dir = Path(summary.meta.get("working_dir") or os.getcwd())
    if not working_dir.is_dir():
        working_dir = Path.cwd()
    config_file.parent.mkdir(parents=True, exist_ok=True)
    config_file.write_text(json.dumps(summary.config, indent=2))
    argv = [sys.executable, str(script), summary.command, "with", str(config_file),
            "-c", f"rerun of {summary.label}"]
    return RerunPlan(argv, working_dir, summary.config)
