"""The README documents every config entry and named config of every experiment."""

import pytest

from support import ROOT, load_experiment

EXPERIMENTS = sorted(p.stem for p in (ROOT / "experiments").glob("*.py"))
README = (ROOT / "README.md").read_text()


@pytest.mark.parametrize("name", EXPERIMENTS)
def test_every_entry_and_named_config_is_documented(name):
    ex = load_experiment(name).ex
    missing = [key for key in ex.known_entries() if f"`{key}`" not in README]
    assert not missing, f"README lacks {name} entries: {missing}"
    named = [n for n, _ in ex.gather_named_configs() if f"`{n}`" not in README]
    assert not named, f"README lacks {name} named configs: {named}"


def test_readme_has_exactly_the_two_setup_commands():
    setup = README.split("## Set up", 1)[1].split("##", 1)[0]
    commands = [line.split("#")[0].strip() for line in setup.split("```")[1].strip().splitlines()]
    assert commands == ["make demo", "make test"]
