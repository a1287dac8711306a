"""Options declared once with a default, a description and a check, resolved at the boundary.

Suites declare theirs here (their API names it `fedmerge.tasks.options`); the experiment spec's keys and
the merging methods' parameters use the same checks. A check takes the option's
name (as the user writes it) and the value, and returns the clean value or raises :class:`FedmergeError`
naming the option, the value and what is allowed.
"""

import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

from fedmerge.errors import FedmergeError

Check = Callable[[str, Any], Any]


@dataclass(frozen=True)
class Option:
    """One suite option: its ``default``, a one-line ``help`` and a ``check`` that returns the clean value."""

    default: Any
    help: str
    check: Check


def resolve(suite: str, declared: Mapping[str, Option], given: Mapping[str, Any]) -> dict[str, Any]:
    """The full option set: defaults overridden by ``given``, each value checked.

    Raises :class:`FedmergeError` naming an unknown option and listing the valid ones.
    """
    unknown = sorted(set(given) - set(declared))
    if unknown:
        raise FedmergeError(
            f"suite {suite!r} has no option {unknown[0]!r}; valid options: {', '.join(sorted(declared))}."
        )
    resolved = {}
    for name, option in declared.items():
        value = given.get(name, option.default)
        resolved[name] = value if value is None and option.default is None else option.check(name, value)
    return resolved


def _number(name: str, value: Any, kind: str) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise FedmergeError(f"option {name!r} must be {kind}, got {value!r}.")
    return value


def positive_int(name: str, value: Any) -> int:
    """An int ≥ 1 (an integral float such as 3.0 is accepted)."""
    number = _number(name, value, "a positive integer")
    if number != int(number) or number < 1:
        raise FedmergeError(f"option {name!r} must be a positive integer, got {value!r}.")
    return int(number)


def non_negative_int(name: str, value: Any) -> int:
    """An int ≥ 0."""
    number = _number(name, value, "an integer ≥ 0")
    if number != int(number) or number < 0:
        raise FedmergeError(f"option {name!r} must be an integer ≥ 0, got {value!r}.")
    return int(number)


def positive_float(name: str, value: Any) -> float:
    """A finite float > 0."""
    if _number(name, value, "a positive number") <= 0:
        raise FedmergeError(f"option {name!r} must be a positive number, got {value!r}.")
    return float(value)


def non_negative_float(name: str, value: Any) -> float:
    """A finite float ≥ 0."""
    if _number(name, value, "a number ≥ 0") < 0:
        raise FedmergeError(f"option {name!r} must be a number ≥ 0, got {value!r}.")
    return float(value)


def fraction(name: str, value: Any) -> float:
    """A float in the open interval (0, 1)."""
    if not 0 < _number(name, value, "a number in (0, 1)") < 1:
        raise FedmergeError(f"option {name!r} must be a number in (0, 1), got {value!r}.")
    return float(value)


def share(name: str, value: Any) -> float:
    """A float in [0, 1)."""
    if not 0 <= _number(name, value, "a number in [0, 1)") < 1:
        raise FedmergeError(f"option {name!r} must be a number in [0, 1), got {value!r}.")
    return float(value)


def proportion(name: str, value: Any) -> float:
    """A float in (0, 1]."""
    if not 0 < _number(name, value, "a number in (0, 1]") <= 1:
        raise FedmergeError(f"option {name!r} must be a number in (0, 1], got {value!r}.")
    return float(value)


def at_most(limit: float) -> Check:
    """A check accepting a finite number ≤ ``limit``."""

    def check(name: str, value: Any) -> float:
        if _number(name, value, f"a number ≤ {limit:g}") > limit:
            raise FedmergeError(f"option {name!r} must be a number ≤ {limit:g}, got {value!r}.")
        return float(value)

    return check


def boolean(name: str, value: Any) -> bool:
    """true or false."""
    if not isinstance(value, bool):
        raise FedmergeError(f"option {name!r} must be true or false, got {value!r}.")
    return value


def list_of(check: Check) -> Check:
    """A check accepting a list (or a single value, as a list of one) whose every item passes ``check``."""

    def check_list(name: str, value: Any) -> list:
        return [check(name, item) for item in (value if isinstance(value, list) else [value])]

    return check_list


def choice(*choices: str) -> Check:
    """A check accepting one of ``choices``."""

    def check(name: str, value: Any) -> str:
        if value not in choices:
            raise FedmergeError(f"option {name!r} must be one of {', '.join(choices)}; got {value!r}.")
        return value

    return check


def string(name: str, value: Any) -> str:
    """A string, possibly empty."""
    if not isinstance(value, str):
        raise FedmergeError(f"option {name!r} must be a string, got {value!r}.")
    return value


def text(name: str, value: Any) -> str:
    """A non-empty string."""
    if not isinstance(value, str) or not value:
        raise FedmergeError(f"option {name!r} must be a non-empty string, got {value!r}.")
    return value
