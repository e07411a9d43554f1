"""Declarative checks for plain config values.

Sacred checks neither types nor ranges, so every config entry carries a :class:`Check`
and the merged config is validated before a run starts. A failed check raises
:class:`~medseg.errors.ConfigError` whose message names the key, what was expected and
what was given, e.g. ``training.batch_size must be an integer >= 1, got 'eight' (str)``.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Callable

from medseg.errors import ConfigError


@dataclass(frozen=True)
class Check:
    """A predicate over one config value and the words that describe what it accepts."""

    expected: str
    accepts: Callable[[Any], bool]

    def __call__(self, key: str, value: Any) -> None:
        if not self.accepts(value):
            raise ConfigError(f"{key} must be {self.expected}, got {_show(value)}")


def _show(value: Any) -> str:
    return f"{value!r} ({type(value).__name__})"


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value: Any) -> bool:
    return (_is_int(value) or isinstance(value, float)) and math.isfinite(value)


def _bounds_text(minimum: float | None, maximum: float | None, above: float | None) -> str:
    parts = []
    if minimum is not None:
        parts.append(f">= {minimum}")
    if above is not None:
        parts.append(f"> {above}")
    if maximum is not None:
        parts.append(f"<= {maximum}")
    return " and ".join(parts)


def _within(value: float, minimum, maximum, above) -> bool:
    return ((minimum is None or value >= minimum)
            and (maximum is None or value <= maximum)
            and (above is None or value > above))


def integer(minimum: int | None = None, maximum: int | None = None) -> Check:
    bounds = _bounds_text(minimum, maximum, None)
    return Check(f"an integer {bounds}".strip(),
                 lambda v: _is_int(v) and _within(v, minimum, maximum, None))


def number(minimum: float | None = None, maximum: float | None = None,
           above: float | None = None) -> Check:
    bounds = _bounds_text(minimum, maximum, above)
    return Check(f"a number {bounds}".strip(),
                 lambda v: _is_number(v) and _within(v, minimum, maximum, above))


def boolean() -> Check:
    return Check("true or false", lambda v: isinstance(v, bool))


def text() -> Check:
    return Check("a string", lambda v: isinstance(v, str) and v != "")


def choice(*options: Any) -> Check:
    listed = ", ".join(repr(o) for o in options)
    return Check(f"one of {listed}", lambda v: any(v == o and type(v) is type(o) for o in options))


def optional(check: Check) -> Check:
    return Check(f"null or {check.expected}", lambda v: v is None or check.accepts(v))


def sequence(item: Check, length: int | None = None, min_length: int = 0) -> Check:
    size = f"{length} " if length is not None else ""
    def accepts(value: Any) -> bool:
        if isinstance(value, (str, bytes)) or not isinstance(value, Sequence):
            return False
        if length is not None and len(value) != length:
            return False
        return len(value) >= min_length and all(item.accepts(v) for v in value)
    return Check(f"a list of {size}values, each {item.expected}", accepts)


def number_range(minimum: float | None = None) -> Check:
    """A ``[low, high]`` pair with ``low <= high``."""
    pair = sequence(number(minimum=minimum), length=2)
    return Check(f"{pair.expected}, low <= high",
                 lambda v: pair.accepts(v) and v[0] <= v[1])


def mapping_of(item: Check) -> Check:
    """A mapping whose every value passes ``item``."""
    return Check(f"a mapping whose values are each {item.expected}",
                 lambda v: isinstance(v, Mapping) and all(item.accepts(x) for x in v.values()))


def validate(config: Mapping[str, Any], checks: Mapping[str, Check], prefix: str = "") -> None:
    """Apply ``checks`` (keyed by entry name) to ``config``; raise on the first failure."""
    for name, check in checks.items():
        key = f"{prefix}{name}"
        if name not in config:
            raise ConfigError(f"{key} is missing from the config")
        check(key, config[name])
