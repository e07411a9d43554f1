"""`print_config` explains every entry: its doc is printed beside its value, as Sacred prints
a config scope's comments."""

import re
import subprocess
import sys
from pathlib import Path

import pytest

from ingredients.tracking import TRACKING_FIELDS

ROOT = Path(__file__).resolve().parents[2]
_ENTRY = re.compile(r"^\s+(\w+) = (.*)$")
_COLOURS = re.compile(r"\x1b\[[0-9;]*m")


@pytest.mark.parametrize("experiment", ["sadaan", "aneurysm_cubes", "lung_tumor"])
def test_print_config_shows_each_entry_with_its_doc(experiment, tmp_path):
    completed = subprocess.run(
        [sys.executable, str(ROOT / "experiments" / f"{experiment}.py"), "print_config", "with",
         "tracking.observer=none", "tracking.max_info_kb=32"],
        capture_output=True, text=True, cwd=tmp_path, timeout=120)
    assert completed.returncode == 0, completed.stderr
    lines = [_COLOURS.sub("", line) for line in completed.stdout.splitlines()]
    entries = [line for line in lines if _ENTRY.match(line)]
    assert len(entries) > 40
    undocumented = [line for line in entries if not re.search(r"  # \S", line)]
    assert undocumented == []
    # The doc declared with the field, beside the value the user gave.
    max_info = next(line for line in entries if line.strip().startswith("max_info_kb = "))
    assert max_info.split("#", 1)[1].strip() == TRACKING_FIELDS["max_info_kb"].doc
    assert "max_info_kb = 32" in max_info
