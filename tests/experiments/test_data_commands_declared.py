"""Every command that makes data is declared as one (recorded as ``<experiment>_data``), in
every experiment, so the runs list of an experiment holds its training runs only."""

import pytest

from support import ROOT, load_experiment

EXPERIMENTS = sorted(p.stem for p in (ROOT / "experiments").glob("*.py"))
MAKES_DATA = {"generate_data", "generate_msd", "generate_volumes", "convert", "prepare"}


@pytest.mark.parametrize("name", EXPERIMENTS)
def test_data_making_commands_are_data_commands(name):
    ex = load_experiment(name).ex
    commands = set(ex.commands)
    declared = ex.__dict__.get("_data_commands", set())
    assert commands & MAKES_DATA, f"{name} has no command that makes data"
    assert commands & MAKES_DATA <= declared, (
        f"{name}: {sorted((commands & MAKES_DATA) - declared)} should be @ex.data_command")
