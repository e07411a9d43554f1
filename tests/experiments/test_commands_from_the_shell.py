"""Every command the README or an experiment's docstring documents exists when the
experiment is started from the shell, as a user types it.

In-process tests import the whole module before running anything, so they did not notice
that ``predict`` and ``cross_validate`` of aneurysm_cubes.py, defined after ``@ex.automain``,
were "not found" from the shell.
"""

from __future__ import annotations

import re
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor

import pytest

from tests.support import ROOT

_COMMAND = re.compile(r"python experiments/(\w+)\.py(?: +(-\S+|\w+))?")


def documented_commands() -> dict[str, set[str]]:
    """experiment -> commands named in README.md and in the experiment's docstring
    (``python experiments/x.py with ...`` and a bare ``python experiments/x.py`` are ``main``)."""
    texts = [(ROOT / "README.md").read_text()]
    texts += [path.read_text() for path in sorted((ROOT / "experiments").glob("*.py"))]
    commands: dict[str, set[str]] = {}
    for text in texts:
        for experiment, word in _COMMAND.findall(text):
            if not (ROOT / "experiments" / f"{experiment}.py").is_file():
                continue
            name = "main" if word in ("", "with") or word.startswith("-") else word
            commands.setdefault(experiment, set()).add(name)
    return commands


def shell(*arguments: str, cwd) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, *arguments], cwd=cwd, capture_output=True,
                          text=True, timeout=300)


COMMANDS = documented_commands()


def test_the_documentation_names_commands_of_every_experiment():
    experiments = {path.stem for path in (ROOT / "experiments").glob("*.py")
                   if path.stem != "__init__"}
    assert experiments <= set(COMMANDS), experiments - set(COMMANDS)
    aneurysm = COMMANDS["aneurysm_cubes"]
    assert {"predict", "cross_validate", "prepare", "generate_volumes"} <= aneurysm


@pytest.mark.slow
@pytest.mark.parametrize("experiment", sorted(COMMANDS))
def test_every_documented_command_starts_from_the_shell(experiment, tmp_path):
    script = str(ROOT / "experiments" / f"{experiment}.py")
    listed = shell(script, "--help", cwd=tmp_path)
    assert listed.returncode == 0, listed.stderr
    section = listed.stdout.split("Commands:")[1]
    names = set(re.findall(r"^\s+(\w+)", section, flags=re.MULTILINE))
    missing = COMMANDS[experiment] - names - {"main"}
    assert not missing, f"--help of {experiment} does not list {missing}:\n{listed.stdout}"

    # Each command is started: Sacred finds it and builds its config, which stops at an
    # unknown entry with the one-line error (a missing command ends "not found", exit 1).
    def start(name):
        words = [] if name == "main" else [name]
        return name, shell(script, *words, "with", "no_such_entry=1", cwd=tmp_path)

    with ThreadPoolExecutor(max_workers=2) as pool:
        for name, done in pool.map(start, sorted(COMMANDS[experiment])):
            assert "not found" not in done.stdout + done.stderr, (name, done.stdout)
            assert done.returncode == 2, (name, done.stdout, done.stderr)
            assert done.stderr.strip().splitlines()[-1].startswith(
                "error: unknown config entry no_such_entry"), (name, done.stderr)


def test_an_experiment_with_commands_after_automain_is_refused(tmp_path):
    script = tmp_path / "misordered.py"
    script.write_text(
        "from ingredients.experiment import MedsegExperiment\n"
        "ex = MedsegExperiment('misordered')\n\n"
        "@ex.automain\ndef main():\n    pass\n\n"
        "@ex.command\ndef predict():\n    pass\n")
    done = subprocess.run([sys.executable, str(script), "predict"], cwd=tmp_path,
                          capture_output=True, text=True, timeout=120,
                          env={"PYTHONPATH": str(ROOT), "PATH": "/usr/bin:/bin"})
    assert done.returncode == 1
    assert "Command \"predict\" not found" not in done.stdout
    assert done.stderr.strip().splitlines()[-1].endswith(
        "is followed by the commands predict, which the command line would not find; put the "
        "automain function last")
