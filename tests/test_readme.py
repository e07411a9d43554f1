"""The documentation covers every experiment: the README's set-up commands, a link to each
generated config reference, and references that match the code."""

import pytest

from ingredients import reference
from support import ROOT, load_experiment

EXPERIMENTS = sorted(p.stem for p in (ROOT / "experiments").glob("*.py"))
README = (ROOT / "README.md").read_text()


@pytest.mark.parametrize("path, text", sorted(reference.pages().items()))
def test_config_reference_is_up_to_date(path, text):
    assert path.is_file(), f"{path.name} missing: run python -m ingredients.reference"
    assert path.read_text() == text, f"{path.name} is stale: run python -m ingredients.reference"


@pytest.mark.parametrize("name", EXPERIMENTS)
def test_every_entry_is_explained_and_the_reference_is_linked(name):
    undocumented = [key for key, _, doc in load_experiment(name).ex.describe_entries()
                    if not doc.strip()]
    assert not undocumented, f"{name}: entries without a doc line: {undocumented}"
    assert f"docs/config/{name}.md" in README
    assert f"experiments/{name}.py" in README


def test_readme_has_exactly_the_two_setup_commands():
    setup = README.split("## Set up", 1)[1].split("##", 1)[0]
    commands = [line.split("#")[0].strip() for line in setup.split("```")[1].strip().splitlines()]
    assert commands == ["make demo", "make test"]


def readme_python_block(heading: str) -> str:
    section = README.split(heading, 1)[1]
    return section.split("```python", 1)[1].split("```", 1)[0]


@pytest.mark.slow
def test_the_training_without_sacred_example_runs_as_printed(tmp_path):
    """The README's library example, pasted into Python as it stands: it trains, and its
    monitored Dice is a real number reached at a real epoch."""
    import subprocess
    import sys

    code = readme_python_block("### Training without Sacred")
    assert "import sacred" not in code and "ingredients" not in code
    check = "\nimport sys\nprint(int('sacred' in sys.modules))"
    done = subprocess.run([sys.executable, "-c", code + check], cwd=tmp_path,
                          capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-2000:]
    summary, sacred_imported = done.stdout.strip().splitlines()[-2:]
    first, last, best = (float(word.rstrip(",")) for word in summary.split()
                         if word[0].isdigit() and "." in word)
    assert last < 0.9 * first, summary  # the example learns: its validation loss falls
    assert 0.0 <= best <= 1.0 and " at epoch " in summary
    assert sacred_imported == "0", "the library example imported Sacred"
