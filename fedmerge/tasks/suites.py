"""Finding a suite: a built-in name, an installed plugin's name, or any ``module:function`` import path.

All three are the same thing: a function ``build(num_clients, options, seed)`` that returns a
:class:`~fedmerge.tasks.federation.Federation`. Its module may declare ``OPTIONS`` (a mapping of option name
→ :class:`~fedmerge.options.Option`: defaults and checks, applied before ``build`` is called) and a
one-line ``DESCRIPTION``; without ``OPTIONS`` the options are passed to ``build`` as given, for it to check.

A ``module:function`` may also name the module by its file, ``/path/to/my_tasks.py:build`` (what a run's saved
``spec.toml`` records, so that it runs again from any folder). Installed packages register suites under the
entry-point group ``fedmerge.suites``::

    [project.entry-points."fedmerge.suites"]
    my-tasks = "my_package.tasks:build"
"""

import importlib
import importlib.util
import json
import sys
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from functools import lru_cache
from importlib.metadata import entry_points
from pathlib import Path
from typing import Any

from fedmerge.errors import FedmergeError
from fedmerge.options import Option

GROUP = "fedmerge.suites"
BUILTIN = {
    "quadratic": "fedmerge.tasks.quadratic:build",
    "mnist1d": "fedmerge.tasks.mnist1d:build",
    "digits": "fedmerge.tasks.digits:build",
    "vision": "fedmerge.tasks.vision:build",
    "clip": "fedmerge.tasks.clip:build",
    "causal-lm": "fedmerge.tasks.causal_lm:build",
}
"""The suites that ship with fedmerge, found like any other."""


@dataclass(frozen=True)
class Suite:
    """A suite found by :func:`find_suite`: its ``name`` and import ``path``, its ``build`` function, a
    one-line ``description`` and its declared ``options`` (None when ``build`` checks its own)."""

    name: str
    path: str
    build: Callable[..., Any]
    description: str
    options: Mapping[str, Option] | None
    file: str | None = None
    """The module's source file, for a ``module:function`` suite (None for built-in and installed ones)."""

    @property
    def rerunnable(self) -> str:
        """How a saved spec names this suite so that it is found from any folder: by its file, if it has one."""
        return self.name if self.file is None else f"{self.file}:{self.path.rpartition(':')[2]}"


def installed() -> dict[str, str]:
    """Suite name → import path: the built-in suites, then the installed plugins (read once per Python path)."""
    return dict(_installed(tuple(sys.path)))


@lru_cache(maxsize=4)
def _installed(path: tuple[str, ...]) -> tuple[tuple[str, str], ...]:
    found = dict(BUILTIN)
    for entry in entry_points(group=GROUP):
        found.setdefault(entry.name, entry.value)
    return tuple(found.items())


def find_suite(name: str) -> Suite:
    """The suite called ``name`` (built-in or plugin) or at import path ``name`` (``module:function``).

    The module is imported from ``sys.path`` (an experiment file's folder is put there when the file is
    read). Raises :class:`FedmergeError` naming the import path and what is wrong.
    """
    path = installed().get(name, name)
    module_name, sep, function = path.rpartition(":")
    if not sep or not module_name or not function:
        known = ", ".join(installed())
        raise FedmergeError(
            f"unknown suite {name!r}; choose one of {known}, or give your own as 'module:function' "
            "(a function returning a fedmerge.tasks.Federation; see docs/suites.md)."
        )
    try:
        module = (
            _import_file(Path(module_name)) if module_name.endswith(".py") else importlib.import_module(module_name)
        )
    except FedmergeError:
        raise
    except ModuleNotFoundError as error:
        if error.name is not None and module_name.startswith(error.name):
            raise FedmergeError(
                f"suite {path!r}: no module {module_name!r} on the Python path; put {module_name}.py "
                "beside the experiment file, or install the package that has it."
            ) from None
        raise FedmergeError(f"suite {path!r}: importing {module_name} failed: {error}") from None
    except Exception as error:  # the user's module itself is broken
        raise FedmergeError(
            f"suite {path!r}: importing {module_name} failed: {type(error).__name__}: {error}"
        ) from None
    build = getattr(module, function, None)
    if not callable(build):
        raise FedmergeError(f"suite {path!r}: module {module_name} has no function {function!r}.")
    options = getattr(module, "OPTIONS", None)
    if options is not None and not (
        isinstance(options, Mapping) and all(isinstance(o, Option) for o in options.values())
    ):
        raise FedmergeError(f"suite {path!r}: {module_name}.OPTIONS must map option names to fedmerge.tasks.Option.")
    description = getattr(module, "DESCRIPTION", None) or (module.__doc__ or "").strip().split("\n")[0]
    file = getattr(module, "__file__", None) if name not in installed() else None
    return Suite(name, path, build, description, options, None if file is None else str(Path(file).resolve()))


def _import_file(file: Path):
    """The module in ``file`` (its folder joins the Python path, for its own imports and for the Ray workers)."""
    file = file.expanduser().resolve()
    if not file.is_file():
        raise FedmergeError(f"suite file {file} does not exist; give the path of the .py file that defines the suite.")
    search_beside(file)
    loaded = sys.modules.get(file.stem)
    if loaded is not None and Path(getattr(loaded, "__file__", "") or "").resolve() == file:
        return loaded
    spec = importlib.util.spec_from_file_location(file.stem, file)
    module = importlib.util.module_from_spec(spec)
    sys.modules[file.stem] = module
    spec.loader.exec_module(module)
    return module


def search_beside(file: str | Path) -> None:
    """Let ``module:function`` suites be found beside an experiment or sweep file (appended to ``sys.path``,
    which Flower passes on to its Ray workers).

    The folder holding the fedmerge package goes first: otherwise a folder named ``fedmerge`` beside the
    file (a clone of the repository) would be imported as a namespace package by the workers of an
    editable install, which has no regular package on ``sys.path``.
    """
    home = str(Path(__file__).resolve().parents[2])
    if home not in sys.path:
        sys.path.insert(0, home)
    folder = str(Path(file).resolve().parent)
    if folder not in sys.path:
        sys.path.append(folder)


def options_key(options: Mapping[str, Any]) -> str:
    """A hashable, order-free key for resolved options (plugins may take lists and tables)."""
    return json.dumps(options, sort_keys=True, default=str)
