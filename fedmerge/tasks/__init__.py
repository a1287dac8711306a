"""Task suites: offline data sets, client partitions, models and pretrained bases θ0. No Flower.

``load_suite(name, num_clients, options, seed)`` builds a :class:`Federation` (one :class:`Task` per
client); :data:`SUITES` lists the suites with their options. Building is deterministic and cached in the
process; θ0 is cached on disk (:mod:`fedmerge.tasks.cache`).
"""

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from functools import lru_cache
from typing import Any

from fedmerge.errors import FedmergeError
from fedmerge.tasks import digits, mnist1d, quadratic, vision
from fedmerge.tasks.federation import Federation, Task
from fedmerge.tasks.options import Option, resolve


@dataclass(frozen=True)
class Suite:
    """A registered suite: its ``name``, a one-line ``description``, its ``options`` and its builder."""

    name: str
    description: str
    options: Mapping[str, Option]
    build: Callable[[int, dict, int], Federation]


SUITES: dict[str, Suite] = {
    module.__name__.rsplit(".", 1)[1]: Suite(
        module.__name__.rsplit(".", 1)[1], module.DESCRIPTION, module.OPTIONS, module.build
    )
    for module in (quadratic, mnist1d, digits, vision)
}


def load_suite(name: str, num_clients: int, options: Mapping[str, Any] | None = None, seed: int = 0) -> Federation:
    """The federation of suite ``name`` over ``num_clients`` clients.

    Parameters
    ----------
    name : a key of :data:`SUITES`.
    num_clients : T ≥ 1; client t gets ``tasks[t]``.
    options : suite options (see ``SUITES[name].options``); missing ones take their defaults.
    seed : every random choice (splits, partitions, θ0's initialisation and pretraining) flows from it.

    The same arguments return the same (shared, not to be modified) object within a process, and the
    same data, partitions and θ0 across processes. Raises :class:`FedmergeError` on an unknown suite or a
    bad option.
    """
    if name not in SUITES:
        raise FedmergeError(f"unknown suite {name!r}; choose one of {', '.join(SUITES)}.")
    if isinstance(num_clients, bool) or not isinstance(num_clients, int) or num_clients < 1:
        raise FedmergeError(f"num_clients must be a positive integer, got {num_clients!r}.")
    if isinstance(seed, bool) or not isinstance(seed, int) or seed < 0:
        raise FedmergeError(f"seed must be an integer ≥ 0, got {seed!r}.")
    resolved = resolve(name, SUITES[name].options, dict(options or {}))
    return _build(name, num_clients, tuple(sorted(resolved.items())), seed)


@lru_cache(maxsize=16)
def _build(name: str, num_clients: int, options: tuple[tuple[str, Any], ...], seed: int) -> Federation:
    return SUITES[name].build(num_clients, dict(options), seed)


load_suite.cache_clear = _build.cache_clear  # forget the in-process federations (tests, long sessions)


__all__ = ["SUITES", "Federation", "Suite", "Task", "load_suite"]
