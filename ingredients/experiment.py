"""The Sacred ``Experiment`` every medseg pipeline uses.

On top of Sacred it (1) validates the merged config before a run starts, so a wrong type,
value, path or an unknown entry (a misspelt key in a config file) stops with one message and
leaves no run in the database; (2) picks the observer from the ``tracking`` config for each
run; (3) keeps only the final state of progress bars in the captured output; (4) prints bad
input as one line and exits with 2.
"""

from __future__ import annotations

import difflib
import logging
import sys
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

from sacred import Experiment
from sacred.config import load_config_file
from sacred.utils import ConfigAddedError, apply_backspaces_and_linefeeds

from ingredients.fields import FieldIngredient
from ingredients.tracking import choose_observer
from medseg.errors import ConfigError, MedsegError, describe

Validator = Callable[[Mapping[str, Any], str], None]

#: Captured output beyond this many characters keeps its head and tail only, so a long run
#: stays far below MongoDB's 16 MB document limit.
CAPTURED_OUTPUT_LIMIT = 1_000_000


def filter_captured_output(text: str) -> str:
    """Collapse carriage-return updates (tqdm) to their final state and cap the size."""
    text = apply_backspaces_and_linefeeds(text)
    if len(text) <= CAPTURED_OUTPUT_LIMIT:
        return text
    head = text[: CAPTURED_OUTPUT_LIMIT // 10]
    tail = text[-(CAPTURED_OUTPUT_LIMIT - len(head)):]
    return f"{head}\n[... {len(text) - len(head) - len(tail)} characters left out ...]\n{tail}"


CONFIG_FILE_SUFFIXES = (".yaml", ".yml", ".json")
_ABSENT = object()


def _config_files(named_configs) -> list[str]:
    return [name for name in named_configs
            if isinstance(name, str) and Path(name).suffix.lower() in CONFIG_FILE_SUFFIXES]


def _check_config_files(named_configs) -> None:
    """Config files given after ``with`` exist and parse to a mapping."""
    for name in _config_files(named_configs):
        if not Path(name).is_file():
            raise ConfigError(f"config file {name} does not exist")
        try:
            values = load_config_file(name)
        except Exception as error:  # the YAML and JSON parsers raise their own types
            raise ConfigError(f"config file {name} could not be read ({describe(error)})") from None
        if not isinstance(values, dict):
            raise ConfigError(f"config file {name} must hold a mapping of config entries, "
                              f"found {type(values).__name__}")


def _config_file_setting(key: str, named_configs) -> str | None:
    """The config file among ``named_configs`` (``with file.yaml``) that sets ``key``."""
    for name in _config_files(named_configs):
        values = load_config_file(name)
        for part in key.split("."):
            values = values.get(part, _ABSENT) if isinstance(values, dict) else _ABSENT
        if values is not _ABSENT:
            return name
    return None


class MedsegExperiment(Experiment):
    """Use exactly like :class:`sacred.Experiment`; add checks with :meth:`config_validator`."""

    def config_validator(self, function: Validator) -> Validator:
        """Register ``function(config, command_name)``; it raises ConfigError or DataError."""
        self.__dict__.setdefault("_validators", []).append(function)
        return function

    def validate_config(self, config: Mapping[str, Any], command_name: str) -> None:
        # Listed first: Sacred's traversal stays marked as running when it is left half-way
        # (a failed check), and every later traversal then reports a circular dependency.
        ingredients = [ingredient for ingredient, _ in self.traverse_ingredients()]
        for ingredient in ingredients:
            if isinstance(ingredient, FieldIngredient):
                ingredient.validate(config)
        for validator in self.__dict__.get("_validators", []):
            validator(config, command_name)

    def _create_run(self, command_name=None, config_updates=None, named_configs=(), info=None,
                    meta_info=None, options=None):
        if self.captured_out_filter is None:
            self.captured_out_filter = filter_captured_output
        _check_config_files(named_configs)
        try:
            run = super()._create_run(command_name, config_updates, named_configs, info,
                                      meta_info, options)
        except ConfigAddedError as error:
            raise ConfigError(self._unknown_entries(error.__conflicting_configs__,
                                                    named_configs)) from None
        # Sacred only warns about a new entry whose name some captured function takes.
        added = sorted(run.config_modifications.added)
        if added:
            raise ConfigError(self._unknown_entries(added, named_configs))
        self.validate_config(run.config, run.meta_info["command"])
        if not run.observers and not run.unobserved and "tracking" in run.config:
            observer, line = choose_observer(run.config["tracking"])
            if observer is not None:
                run.observers.append(observer)
            logging.getLogger("medseg").info(line)
        return run

    def known_entries(self) -> list[str]:
        """Every config key a user can set, dotted (``training.batch_size``)."""
        keys = []
        for ingredient, _ in self.traverse_ingredients():
            if isinstance(ingredient, FieldIngredient):
                keys += [f"{ingredient.path}.{name}" for name in ingredient.fields]
        for scope in self.configurations:
            keys += [k for k in scope() if k != "seed"]
        return sorted(set(keys) | {"seed"})

    def _unknown_entries(self, keys, named_configs) -> str:
        """One line naming the unknown entries, the file that set each, and near names."""
        known = self.known_entries()
        parts = []
        for key in keys:
            origin = _config_file_setting(key, named_configs)
            close = difflib.get_close_matches(key, known, n=1)
            parts.append(key + (f" (set in {origin})" if origin else "")
                         + (f"; did you mean {close[0]}?" if close else ""))
        return (f"unknown config entr{'y' if len(parts) == 1 else 'ies'}: {'; '.join(parts)} "
                "(`print_config` lists every entry)")

    def run(self, *args, **kwargs):
        try:
            return super().run(*args, **kwargs)
        except MedsegError as error:
            if not self.__dict__.get("_from_command_line"):
                raise
            print(f"error: {error}", file=sys.stderr)
            sys.exit(2)

    def run_commandline(self, argv=None):
        self._from_command_line = True
        return super().run_commandline(argv)
