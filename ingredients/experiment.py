"""The Sacred ``Experiment`` every medseg pipeline uses.

On top of Sacred it (1) validates the merged config before a run starts, so a wrong type,
value, path or an unknown entry (a misspelt key in a config file) stops with one message and
leaves no run in the database; (2) picks the
observer from the ``tracking`` config for each run; (3) keeps only the final state of
progress bars in the captured output and bounds its size; (4) adds a top-level ``tags``
entry (omniboard shows and filters runs by ``config.tags``; notes come from ``-c``);
(5) prints bad input as one line and exits with 2.
"""

from __future__ import annotations

import ast
import copy
import difflib
import functools
import inspect
import io
import logging
import os
import re
import shlex
import signal
import sys
import types
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import sacred.dependencies
import sacred.experiment as sacred_experiment
from sacred import Experiment
from sacred.config import ConfigScope, load_config_file
from sacred.utils import (
    ConfigAddedError,
    NamedConfigNotFoundError,
    apply_backspaces_and_linefeeds,
    convert_to_nested_dict,
)

from ingredients import distributed
from ingredients.checkpoint import check_resume_config
from ingredients.fields import Field, FieldIngredient, SyntheticIngredient
from ingredients.tracking import TRACKING_FIELDS, choose_observer, raise_recording_failure
from medseg import config as c
from medseg.errors import ConfigError, DiskFullError, Interrupted, MedsegError, describe
from medseg.files import is_no_space, no_space_error

Validator = Callable[[Mapping[str, Any], str], None]

#: Captured output beyond this many characters keeps its head and tail only, so a long run
#: stays far below MongoDB's 16 MB document limit (``tracking.max_output_mb`` overrides it).
CAPTURED_OUTPUT_LIMIT = int(TRACKING_FIELDS["max_output_mb"].default * 1_000_000)
_LEFT_OUT = re.compile(r"\n\[\.\.\. (\d+) characters left out \.\.\.\]\n")
_TAGS = c.sequence(c.text())
#: Runs of data commands are recorded as experiment ``<name>_data`` (``data_command``).
DATA_SUFFIX = "_data"

log = logging.getLogger("medseg")


def collapse_terminal_updates(text: str) -> str:
    """Interpret carriage returns and backspaces as a terminal would (a tqdm bar keeps its
    final state only). Only lines that contain them are rewritten, which keeps this fast on
    megabytes of output."""
    lines = text.split("\n")
    for index, line in enumerate(lines[:-1]):
        if "\r" in line or "\b" in line:
            lines[index] = apply_backspaces_and_linefeeds(line + "\n")[:-1]
    # The last line may be a bar still moving; a trailing \r is kept for the next chunk.
    lines[-1] = apply_backspaces_and_linefeeds(lines[-1])
    return "\n".join(lines)


def filter_captured_output(text: str, limit: int = CAPTURED_OUTPUT_LIMIT) -> str:
    """Collapse carriage-return updates (tqdm) and keep at most ``limit`` characters: the
    first tenth and the end, with a line saying how much was left out in between."""
    text = collapse_terminal_updates(text)
    if len(text) <= limit:
        return text
    head_size = limit // 10
    earlier = _LEFT_OUT.search(text, 0, head_size + 200)
    if earlier is not None:  # cut before: keep the same head, add up what is left out
        head, left_out, rest = text[:earlier.start()], int(earlier.group(1)), text[earlier.end():]
    else:
        head, left_out, rest = text[:head_size], 0, text[head_size:]
    keep = max(limit - len(head), 0)
    left_out += len(rest) - keep
    return f"{head}\n[... {left_out} characters left out ...]\n{rest[len(rest) - keep:]}"


def _read_captured_output(run) -> None:
    """Sacred's ``Run._get_captured_output``, except that the output written after the last
    heartbeat is kept when the run fails or is interrupted: Sacred closes the capture before
    the final heartbeat and then skips reading what the closed capture still holds, so a
    failed run lost its last lines (often the ones that explain the failure)."""
    capture = run._output_file
    if capture.closed and capture.final is None:
        return
    text = capture.get()
    if isinstance(text, bytes):
        text = text.decode("utf-8", "replace")
    text = run.captured_out + text
    if run.captured_out_filter is not None:
        text = run.captured_out_filter(text)
    run.captured_out = text


def _labels():
    tags = []  # labels for this run: omniboard shows them and filters by them


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


class _CallerFrame:
    """Stands in for the ``inspect`` module inside Sacred's ``Experiment.__init__``, which takes
    only its caller's globals from ``inspect.stack()``; the real call reads the source lines of
    every frame on the stack (about a second of start-up with torch and MONAI imported)."""

    def __init__(self, frame) -> None:
        self._frame = frame

    def stack(self, context: int = 1):
        return [None, (self._frame,)]

    def __getattr__(self, name: str):
        return getattr(inspect, name)


class MedsegExperiment(Experiment):
    """Use exactly like :class:`sacred.Experiment`; add checks with :meth:`config_validator`."""

    def __init__(self, *args, **kwargs) -> None:
        # The experiment's file is the caller's, as with Experiment() called directly.
        sacred_experiment.inspect = _CallerFrame(sys._getframe(1))
        try:
            super().__init__(*args, **kwargs)
        finally:
            sacred_experiment.inspect = inspect
            # Its ingredients and itself have their sources' git state: the next experiment
            # built in this process asks git again.
            sacred.dependencies.get_commit_if_possible.forget()

    def add_fields(self, fields: Mapping[str, Field]) -> None:
        """Top-level config entries declared like an ingredient's: default, check, doc."""
        self.__dict__.setdefault("top_level_fields", {}).update(fields)
        self.add_config({name: copy.deepcopy(field.default) for name, field in fields.items()})

    def data_command(self, function):
        """A command that makes data (generate, convert, prepare). Its runs are recorded, as
        provenance, under the experiment name ``<name>_data``, so that the runs of the
        experiment itself (what omniboard lists under its name, what the notebooks compare)
        are the training and evaluation runs."""
        self.__dict__.setdefault("_data_commands", set()).add(function.__name__)
        return self.command(function)

    def config_validator(self, function: Validator) -> Validator:
        """Register ``function(config, command_name)``; it raises ConfigError or DataError."""
        self.__dict__.setdefault("_validators", []).append(function)
        return function

    def validate_config(self, config: Mapping[str, Any], command_name: str) -> None:
        _TAGS("tags", config["tags"])
        # The traversal is finished before any check can raise: Sacred's traversal generator
        # resets its "traversing" flag only when exhausted, so leaving it early would make
        # every later run in this process fail with a CircularDependencyError.
        ingredients = [ingredient for ingredient, _ in self.traverse_ingredients()]
        for ingredient in ingredients:
            if isinstance(ingredient, FieldIngredient):
                ingredient.validate(config)
        c.validate(config, {name: field.check
                            for name, field in self.__dict__.get("top_level_fields", {}).items()})
        for validator in self.__dict__.get("_validators", []):
            validator(config, command_name)

    def _create_run(self, command_name=None, config_updates=None, named_configs=(), info=None,
                    meta_info=None, options=None):
        self._add_labels()
        _check_config_files(named_configs)
        seed_given = "seed" in (config_updates or {})
        try:
            run = super()._create_run(command_name, config_updates, named_configs, info,
                                      meta_info, options)
            # torchrun: every process takes rank 0's seed (Sacred draws one per process).
            agreed = None if seed_given else distributed.agreed_seed(run.config["seed"])
            if agreed is not None:
                config_updates = {**(config_updates or {}), "seed": agreed}
                run = super()._create_run(command_name, config_updates, named_configs, info,
                                          meta_info, options)
        except ConfigAddedError as error:
            raise ConfigError(self._unknown_entries(error.__conflicting_configs__,
                                                    named_configs)) from None
        # Sacred only warns about a new entry whose name some captured function takes, and
        # takes any new top-level entry (the tags scope, first, lets every name in).
        top_level = {key.split(".")[0] for key in self.known_entries()}
        # An ingredient's ``open_entries`` (a sweep's search space) take new keys; their
        # ingredient checks them.
        open_prefixes = tuple(f"{ingredient.path}.{name}." for ingredient, _ in
                              self.traverse_ingredients()
                              for name in getattr(ingredient, "open_entries", ()))
        added = sorted(key for key in {*run.config_modifications.added,
                                       *(key for key in run.config if key not in top_level)}
                       if not key.startswith(open_prefixes))
        if added:
            raise ConfigError(self._unknown_entries(added, named_configs))
        for ingredient, _ in self.traverse_ingredients():
            if isinstance(ingredient, SyntheticIngredient):
                for line in ingredient.ineffective_updates(
                        convert_to_nested_dict(config_updates or {}), run.meta_info["command"]):
                    log.warning(line)
        self.validate_config(run.config, run.meta_info["command"])
        resume = (run.config.get("checkpoint") or {}).get("resume")
        if run.meta_info["command"] == "main" and resume:
            check_resume_config(run.config, self.resume_policy(),
                                seed_given=seed_given)
        self._add_docs(run.config_modifications.docs)
        # Where relative paths in the config were meant from (``medseg runs rerun``).
        run.meta_info["working_dir"] = os.getcwd()
        if run.meta_info["command"] in self.__dict__.get("_data_commands", ()):
            run.experiment_info["name"] = f"{self.path}{DATA_SUFFIX}"
        self._bound_captured_output(run)
        distributed.drop_observers(run)
        self._attach_observer(run)
        run.main_function = distributed.recording_failures(run.main_function)
        return run

    def _add_docs(self, docs: dict[str, str]) -> None:
        """Each declared entry's doc, which ``print_config`` prints beside it as it does a
        config scope's comments (fields are added as plain dicts, which carry none)."""
        for key, _, doc in self.describe_entries():
            if doc and not docs.get(key):
                docs[key] = doc

    def _add_labels(self) -> None:
        # First, so that an experiment's own config can give default tags. (Added here, not
        # in __init__: Sacred finds the experiment's file from the caller of __init__.)
        if _labels not in [getattr(scope, "_func", None) for scope in self.configurations]:
            self.configurations.insert(0, ConfigScope(_labels))

    def _bound_captured_output(self, run) -> None:
        run._get_captured_output = types.MethodType(_read_captured_output, run)
        if self.captured_out_filter is not None:  # the experiment chose its own
            return
        tracking = run.config.get("tracking")
        limit = int(tracking["max_output_mb"] * 1_000_000) if tracking else CAPTURED_OUTPUT_LIMIT
        run.captured_out_filter = functools.partial(filter_captured_output, limit=limit)

    @staticmethod
    def _attach_observer(run) -> None:
        tracking = run.config.get("tracking")
        if run.observers or run.unobserved or tracking is None:
            return
        resume = (run.config.get("checkpoint") or {}).get("resume")
        observer, line, level = choose_observer(tracking, resume=resume)
        if observer is not None:
            run.observers.append(observer)
        logging.getLogger("medseg").log(level, line)

    def run(self, command_name=None, config_updates=None, named_configs=(), info=None,
            meta_info=None, options=None):
        try:
            try:
                run = super().run(command_name, config_updates, named_configs, info, meta_info,
                                  options)
                raise_recording_failure(run)  # met after the last metric (final heartbeat)
                return run
            except OSError as error:  # a full disk our own writes did not name
                if not is_no_space(error):
                    raise
                if error.filename2 or error.filename:  # a copy names its target second
                    raise no_space_error(error.filename2 or error.filename) from None
                raise DiskFullError(f"no space left on device ({describe(error)}) in a folder "
                                    "this command writes to; free some space there or write "
                                    "elsewhere") from None
            except ConfigAddedError as error:
                raise ConfigError(self._unknown_entries(error.__conflicting_configs__,
                                                        named_configs)) from None
            except NamedConfigNotFoundError:
                raise ConfigError(self._unknown_named_configs(named_configs)) from None
        except MedsegError as error:
            if not self.__dict__.get("_from_command_line"):
                raise
            print(f"error: {error}", file=sys.stderr)
            sys.exit(2)

    def resume_policy(self) -> dict[str, bool]:
        """Dotted key -> whether a resumed run may change it (``Field.resume_may_change``)."""
        policy = {name: field.resume_may_change
                  for name, field in self.__dict__.get("top_level_fields", {}).items()}
        ingredients = [ingredient for ingredient, _ in self.traverse_ingredients()]
        for ingredient in ingredients:
            if isinstance(ingredient, FieldIngredient):
                policy.update({f"{ingredient.path}.{name}": field.resume_may_change
                               for name, field in ingredient.fields.items()})
        return policy

    def known_entries(self) -> list[str]:
        """Every config key a user can set, dotted (``training.batch_size``)."""
        return sorted(key for key, _, _ in self.describe_entries())

    def describe_entries(self) -> list[tuple[str, Any, str]]:
        """``(key, default, doc)`` of every config entry, the experiment's own first."""
        self._add_labels()
        rows = {"seed": (None, "Sacred's random seed (random unless given): weights, data "
                               "order, augmentation")}
        for scope in self.configurations:
            values = scope()
            docs = getattr(values, "docs", {})
            fields = self.__dict__.get("top_level_fields", {})
            for key, value in values.items():
                doc = fields[key].doc if key in fields else docs.get(key, "")
                rows.setdefault(key, (value, doc))
        described = [(key, default, doc) for key, (default, doc) in rows.items()]
        ingredients = [ingredient for ingredient, _ in self.traverse_ingredients()]
        for ingredient in ingredients:
            if isinstance(ingredient, FieldIngredient):
                described += ingredient.describe()
        return described

    def _unknown_entries(self, entries, named_configs=()) -> str:
        """One line naming the unknown entries, the config file that set each, near names."""
        known = self.known_entries()
        parts = []
        for entry in entries:
            origin = _config_file_setting(entry, named_configs)
            where = f" (set in {origin})" if origin else ""
            inside = sorted(key for key in known if key.startswith(f"{entry}."))
            if inside:  # a group given no entries of its own ('training={}')
                parts.append(f"{entry}{where} (a group: set its entries, e.g. {inside[0]}=...)")
                continue
            close = _closest_entry(entry, known)
            hint = f" (did you mean {close}?)" if close else ""
            parts.append(f"{entry}{where}{hint}")
        return (f"unknown config entr{'y' if len(parts) == 1 else 'ies'} {', '.join(parts)}; "
                f"`print_config` lists them all")

    def _unknown_named_configs(self, requested) -> str:
        available = [name for name, _ in self.gather_named_configs()]
        missing = [n for n in requested if n not in available and not n.endswith(
            (".json", ".yaml", ".yml", ".pickle"))]
        return (f"unknown named config {', '.join(map(repr, missing))}; "
                f"this experiment has {', '.join(available)}")

    def run_commandline(self, argv=None):
        """Sacred's command line; SIGTERM (what ``kill`` and schedulers send) is handled like
        Ctrl-C, and either ends with one line: what was interrupted, the last checkpoint and
        the command that resumes from it (exit status 128 + the signal's number)."""
        self._from_command_line = True
        # Each line of stdout reaches the terminal and the captured output in one write, as a
        # whole, when it ends. Unbuffered (python -u, PYTHONUNBUFFERED), print writes the text
        # and its newline separately, and Sacred's next log line (stderr, copied by another
        # `tee`) could land between them: "wrote data/sadaan_demoINFO - sadaan - Completed".
        if isinstance(sys.stdout, io.TextIOWrapper):  # not, e.g., a notebook's stream
            sys.stdout.reconfigure(line_buffering=True, write_through=False)
        argv = list(sys.argv if argv is None else argv)
        previous = signal.signal(signal.SIGTERM, _raise_interrupted)
        try:
            return super().run_commandline(argv)
        except KeyboardInterrupt as error:
            name = getattr(error, "signal_name", "SIGINT")
            print(f"error: {interruption_message(error, argv)}", file=sys.stderr)
            sys.exit(128 + int(getattr(signal, name)))
        finally:
            signal.signal(signal.SIGTERM, previous)

    def automain(self, function):
        """Sacred's ``automain``, refused when commands are defined below it: it runs the
        command line where it stands, so those commands do not exist yet and the shell says
        ``Command "predict" not found`` (in-process tests, which import the whole module, do
        not notice)."""
        later = _commands_defined_after(function)
        if later:
            source = inspect.getsourcefile(function)
            raise TypeError(f"@ex.automain {function.__name__} in {source} "
                            f"is followed by the commands {', '.join(later)}, which the command "
                            "line would not find; put the automain function last")
        return super().automain(function)


def _closest_entry(entry: str, known: list[str]) -> str | None:
    """The known name ``entry`` most likely meant: a misspelt section is matched against the
    sections (``trainng`` -> ``training``, not the nearest of its entries), the rest against
    that section's entries; a bare name is also found as an entry of a section
    (``overwrite`` -> ``dataset.overwrite``)."""
    tops = sorted({key.split(".")[0] for key in known})
    section, _, rest = entry.partition(".")
    if not rest:
        close = difflib.get_close_matches(entry, tops, n=1, cutoff=0.75)
        if close:
            return close[0]
        same_name = [key for key in known if key.rsplit(".", 1)[-1] == entry]
        if same_name:
            return " or ".join(same_name)
        close = difflib.get_close_matches(entry, [k.rsplit(".", 1)[-1] for k in known], n=1)
        return next((k for k in known if close and k.rsplit(".", 1)[-1] == close[0]), None)
    if section not in tops:
        close = difflib.get_close_matches(section, tops, n=1)
        if not close:
            return None
        section = close[0]
    entries = [key.partition(".")[2] for key in known if key.startswith(f"{section}.")]
    close = difflib.get_close_matches(rest, entries, n=1)
    return f"{section}.{close[0]}" if close else section


def _raise_interrupted(signum, frame):
    raise Interrupted(signal.Signals(signum).name)


def interruption_message(error: BaseException, argv: list[str]) -> str:
    """The line printed when Ctrl-C or SIGTERM stops a command started with ``argv``."""
    name = getattr(error, "signal_name", "SIGINT")
    checkpoint = getattr(error, "checkpoint", None)
    if checkpoint is None:
        what = ("before the first checkpoint was written" if getattr(error, "training", False)
                else "before it finished")
        return (f"interrupted ({name}) {what}; nothing to resume from. Run it again with: "
                f"{_shell_command(argv)}")
    epoch = f" (epoch {error.epoch})" if getattr(error, "epoch", None) is not None else ""
    updates = [word for word in argv[1:] if not word.startswith("checkpoint.resume=")]
    if "with" not in updates:
        updates.append("with")
    return (f"interrupted ({name}); the last checkpoint is {checkpoint}{epoch}; resume with: "
            f"{_shell_command([argv[0], *updates, f'checkpoint.resume={checkpoint}'])}")


def _shell_command(argv: list[str]) -> str:
    return " ".join(["python", *map(shlex.quote, argv)])


def _commands_defined_after(function) -> list[str]:
    """Names of the top-level functions decorated ``@<something>.command`` that come after
    ``function`` in its source file."""
    try:
        tree = ast.parse(Path(inspect.getsourcefile(function)).read_text())
    except (OSError, TypeError, SyntaxError):
        return []
    functions = [node for node in tree.body if isinstance(node, ast.FunctionDef)]
    names = [node.name for node in functions]
    if function.__name__ not in names:
        return []
    later = functions[names.index(function.__name__) + 1:]

    def is_command(decorator) -> bool:
        target = decorator.func if isinstance(decorator, ast.Call) else decorator
        return isinstance(target, ast.Attribute) and target.attr == "command"

    return [node.name for node in later if any(is_command(d) for d in node.decorator_list)]
