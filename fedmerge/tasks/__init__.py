"""Task suites: data sets, client partitions, models and pretrained bases θ0. No Flower.

``load_suite(name, num_clients, options, seed)`` builds a :class:`Federation` (one :class:`Task` per
client) from a built-in suite, an installed plugin or a ``module:function`` of your own
(:mod:`fedmerge.tasks.suites`). Building is deterministic and cached in the process; θ0 is cached on disk
when the suite gives a ``cache_key`` (:mod:`fedmerge.tasks.cache`).
"""

import json
from collections.abc import Mapping
from functools import lru_cache
from typing import Any

from torch.utils.data import Dataset

from fedmerge.errors import FedmergeError
from fedmerge.tasks.federation import Federation, Task, TaskList, forward
from fedmerge.options import Option, resolve
from fedmerge.tasks.suites import Suite, find_suite, installed, options_key
from fedmerge.tasks.weights import load_weights


def load_suite(name: str, num_clients: int, options: Mapping[str, Any] | None = None, seed: int = 0) -> Federation:
    """The federation of suite ``name`` over ``num_clients`` clients.

    Parameters
    ----------
    name : a built-in suite, an installed plugin (``fedmerge list``) or ``module:function``.
    num_clients : T ≥ 1; client t gets ``tasks[t]``.
    options : suite options; missing ones take their defaults where the suite declares ``OPTIONS``.
    seed : every random choice (splits, partitions, θ0's initialisation and pretraining) flows from it.

    The same arguments return the same (shared, not to be modified) object within a process, and the
    same data, partitions and θ0 across processes. Raises :class:`FedmergeError` on an unknown or broken
    suite, a bad option, or a federation that does not fit the request.
    """
    if isinstance(num_clients, bool) or not isinstance(num_clients, int) or num_clients < 1:
        raise FedmergeError(f"num_clients must be a positive integer, got {num_clients!r}.")
    if isinstance(seed, bool) or not isinstance(seed, int) or seed < 0:
        raise FedmergeError(f"seed must be an integer ≥ 0, got {seed!r}.")
    suite = find_suite(name)
    resolved = dict(options or {}) if suite.options is None else resolve(name, suite.options, dict(options or {}))
    return _build(name, num_clients, options_key(resolved), seed)


@lru_cache(maxsize=16)
def _build(name: str, num_clients: int, options: str, seed: int) -> Federation:
    suite, resolved = find_suite(name), json.loads(options)
    path = suite.path
    try:
        fed = suite.build(num_clients, resolved, seed)
    except FedmergeError as error:
        raise FedmergeError(f"suite {path!r}: {error}") from None
    except Exception as error:  # a user's suite failing: name it, without a traceback
        raise FedmergeError(f"suite {path!r} failed to build its federation: {type(error).__name__}: {error}") from None
    check_federation(fed, path, num_clients)
    fed.suite, fed.options, fed.seed = name, resolved, seed
    return fed


def check_federation(fed: Any, path: str, num_clients: int) -> None:
    """What every suite must return: a Federation with one task per client, each split a non-empty Dataset (a
    :class:`TaskList`'s tasks are checked as each is made)."""
    if not isinstance(fed, Federation):
        raise FedmergeError(f"suite {path!r} returned a {type(fed).__name__}; return a fedmerge.tasks.Federation.")
    if len(fed.tasks) != num_clients:
        raise FedmergeError(
            f"suite {path!r} returned {len(fed.tasks)} tasks for {num_clients} clients; return one Task per client."
        )
    if fed.metric not in ("accuracy", "loss"):
        raise FedmergeError(f"suite {path!r}: metric must be 'accuracy' or 'loss', got {fed.metric!r}.")
    if isinstance(fed.tasks, TaskList):
        fed.tasks.check = lambda t, task: check_task(path, t, task)
        return
    for t, task in enumerate(fed.tasks):
        check_task(path, t, task)
    if any(task.private for task in fed.tasks):
        try:
            fed.private_names  # every private name a trainable tensor of the model, owned by one client
        except FedmergeError as error:
            raise FedmergeError(f"suite {path!r}: {error}") from None


def check_task(path: str, t: int, task: Any) -> None:
    """A task must be a :class:`Task` whose splits are non-empty map-style Datasets."""
    if not isinstance(task, Task):
        raise FedmergeError(f"suite {path!r}: task {t} is a {type(task).__name__}; give fedmerge.tasks.Task objects.")
    for split in ("train", "val", "test"):
        data = getattr(task, split, None)
        if not isinstance(data, Dataset) or not hasattr(data, "__len__") or len(data) == 0:
            raise FedmergeError(
                f"suite {path!r}: task {t} ({getattr(task, 'name', '?')}) {split} must be a "
                f"non-empty map-style torch Dataset, got {type(data).__name__}."
            )


load_suite.cache_clear = _build.cache_clear  # forget the in-process federations (tests, long sessions)


__all__ = [
    "Federation",
    "Option",
    "Suite",
    "Task",
    "TaskList",
    "find_suite",
    "forward",
    "installed",
    "load_suite",
    "load_weights",
]
