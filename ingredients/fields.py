"""Ingredients declared as fields: each config entry with its default, its check and a line
of documentation.

Ingredients are built per experiment (``OptimizerIngredient(learning_rate=...)``) rather
than shared as module-level singletons: each pipeline has its own defaults and only the
entries it uses, and a singleton would have to carry every pipeline's entries, most of which
would change nothing in a given experiment.
"""

from __future__ import annotations

import copy
import functools
import sys
import types
from collections.abc import Callable, Mapping
import dataclasses
from dataclasses import dataclass
from typing import Any

from sacred import Ingredient

from medseg.config import Check, validate


@dataclass(frozen=True)
class Field:
    default: Any
    check: Check
    doc: str
    #: Whether a run resumed from a checkpoint (``checkpoint.resume``) may give this entry
    #: another value than the checkpoint's run had. Entries that shape what was trained
    #: (data, model, loss, optimizer, seed) may not: the resume would silently mix two setups.
    resume_may_change: bool = False


def may_change_on_resume(field: Field) -> Field:
    """``field``, marked as an entry a resumed run may change."""
    return dataclasses.replace(field, resume_may_change=True)


class FieldIngredient(Ingredient):
    """A Sacred ingredient whose config is a set of :class:`Field`."""

    def __init__(self, path: str, fields: Mapping[str, Field], defaults: Mapping[str, Any],
                 ingredients=(), *, resume_may_change: bool = False) -> None:
        unknown = sorted(set(defaults) - set(fields))
        if unknown:
            raise TypeError(f"{path} has no entries {unknown}; it has {sorted(fields)}")
        module_globals = sys.modules[type(self).__module__].__dict__
        super().__init__(path, ingredients=ingredients, _caller_globals=module_globals)
        self.fields = {name: may_change_on_resume(field) if resume_may_change else field
                       for name, field in fields.items()}
        self.defaults = {name: copy.deepcopy(defaults.get(name, field.default))
                         for name, field in self.fields.items()}
        self.add_config(copy.deepcopy(self.defaults))

    def captured(self, function: Callable) -> Callable:
        """``function`` (a module-level function, where grep and go-to-definition find it)
        with its parameters named like this ingredient's entries filled from the run's config,
        as Sacred's ``capture`` does. Sacred keeps the config on the function object itself,
        so each ingredient captures a copy: two experiments built in one process (a notebook,
        the tests) would otherwise fill one function from the other's config."""
        copy_ = types.FunctionType(function.__code__, function.__globals__, function.__name__,
                                   function.__defaults__, function.__closure__)
        copy_.__kwdefaults__ = copy.copy(function.__kwdefaults__)
        functools.update_wrapper(copy_, function)
        del copy_.__wrapped__  # Sacred reads the parameters of the copy, not through it
        return self.capture(copy_)

    def validate(self, config: Mapping[str, Any]) -> None:
        """Check this ingredient's part of a merged config (raises ConfigError)."""
        validate(config[self.path], {n: f.check for n, f in self.fields.items()},
                 prefix=f"{self.path}.")

    def describe(self) -> list[tuple[str, Any, str]]:
        """``(key, default, doc)`` rows, for documentation tables."""
        return [(f"{self.path}.{name}", self.defaults[name], field.doc)
                for name, field in self.fields.items()]


class SyntheticIngredient(FieldIngredient):
    """The ``synthetic`` group: the settings of a pipeline's data generator, and nothing else.

    Every pipeline keeps them apart from the entries that train, so that
    ``with synthetic.noise_std=...`` cannot be mistaken for a training setting: any other
    command given one of them says it has no effect there (:meth:`ineffective_updates`). They
    may change on a resume, since training never reads them.
    """

    def __init__(self, fields: Mapping[str, Field], defaults: Mapping[str, Any], *,
                 generator: str) -> None:
        super().__init__("synthetic", fields, defaults, resume_may_change=True)
        #: The command that reads these settings (``generate_data``, ``generate_msd``...).
        self.generator = generator

    def ineffective_updates(self, updates: Mapping[str, Any], command_name: str) -> list[str]:
        """One warning line for each of this group's entries in ``updates`` (the nested config
        updates of a run) when ``command_name`` does not read them."""
        if command_name == self.generator:
            return []
        what = "training" if command_name == "main" else command_name
        return [f"{self.path}.{name} has no effect on {what}; it is a {self.generator} setting"
                for name in sorted(updates.get(self.path) or {})]
