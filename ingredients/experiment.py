"""The Sacred ``Experiment`` every medseg pipeline uses.

On top of Sacred it (1) validates the merged config before a run starts, so a wrong type,
value or path stops with one message and leaves no run in the database; (2) picks the
observer from the ``tracking`` config for each run; (3) keeps only the final state of
progress bars in the captured output; (4) prints bad input as one line and exits with 2.
"""

from __future__ import annotations

import logging
import sys
from collections.abc import Callable, Mapping
from typing import Any

from sacred import Experiment
from sacred.utils import apply_backspaces_and_linefeeds

from ingredients.fields import FieldIngredient
from ingredients.tracking import choose_observer
from medseg.errors import MedsegError

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


class MedsegExperiment(Experiment):
    """Use exactly like :class:`sacred.Experiment`; add checks with :meth:`config_validator`."""

    def config_validator(self, function: Validator) -> Validator:
        """Register ``function(config, command_name)``; it raises ConfigError or DataError."""
        self.__dict__.setdefault("_validators", []).append(function)
        return function

    def validate_config(self, config: Mapping[str, Any], command_name: str) -> None:
        # The traversal is finished before any check can raise: Sacred's traversal generator
        # resets its "traversing" flag only when exhausted, so leaving it early would make
        # every later run in this process fail with a CircularDependencyError.
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
        run = super()._create_run(command_name, config_updates, named_configs, info, meta_info,
                                  options)
        self.validate_config(run.config, run.meta_info["command"])
        if not run.observers and not run.unobserved and "tracking" in run.config:
            observer, line = choose_observer(run.config["tracking"])
            if observer is not None:
                run.observers.append(observer)
            logging.getLogger("medseg").info(line)
        return run

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
