"""Sweeps: a grid of experiments (strategies × rounds × heterogeneity levels × seeds × any spec key), resumable.

A sweep file is TOML with two tables::

    name = "alpha-sweep"            # optional: the sweep's name (default: the file's stem)
    description = "..."            # optional

    [base]                          # a spec (as for `fedmerge run`), or preset = "name" plus overrides
    preset = "data-heterogeneity"
    clients = 4

    [grid]                          # dotted spec keys → the values to try (the cells are their product)
    "suite_options.alpha" = [0.1, 1.0, 10.0]
    seed = [0, 1, 2]

    [grid.training-spread]          # a named axis: its keys vary together (zipped), with optional labels
    "training.lr" = [0.02, {geometric = [0.005, 0.08]}]
    "training.steps" = [200, {geometric = [50, 800]}]
    labels = ["equal", "16x"]

Every cell is one ordinary run directory ``<sweep-dir>/cells/<cell-id>/`` written by the same runner as
``fedmerge run``; the id is a readable slug of the cell's values plus a short hash of the cell's fully
resolved spec, so editing the base or the grid never reuses a stale cell. ``sweep.json`` (the manifest)
lists the cells, their values and their state. Every cell's spec is validated before any cell runs.
Resuming: a cell whose directory holds a complete ``results.json`` is skipped; leftovers of an interrupted
cell (the runner's temporary ``.<cell-id>.*`` directories) are removed and the cell is run again.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import itertools
import json
import re
import shutil
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from fedmerge.clients.settings import is_spread
from fedmerge.errors import FedmergeError
from fedmerge.files import DiskFull, check_output_dir, write_file
from fedmerge.simulations.presets import load_experiment, shipped_path
from fedmerge.simulations.spec import Spec, _suggest, directory_name, load_toml
from fedmerge.tasks.suites import search_beside

SWEEP_KEYS = ("name", "description", "base", "grid")
MANIFEST = "sweep.json"
CELLS = "cells"
RESULTS = "results.json"


@dataclass(frozen=True)
class Axis:
    """One dimension of the grid: one key, or several keys that vary together (a named axis)."""

    name: str
    keys: tuple[str, ...]
    values: tuple[tuple[Any, ...], ...]  # one tuple per level, one entry per key
    labels: tuple[str, ...]


@dataclass(frozen=True)
class Cell:
    """One experiment of the grid: its overrides over the base, its validated spec, its id."""

    index: int
    overrides: dict
    levels: dict  # axis name → label of this cell's level
    spec: Spec
    id: str

    def describe(self) -> str:
        return ", ".join(f"{axis}={label}" for axis, label in self.levels.items())


@dataclass
class Sweep:
    """A parsed, fully validated sweep."""

    name: str
    description: str
    source: str
    base: dict
    axes: list[Axis]
    cells: list[Cell] = field(default_factory=list)


# -- reading -----------------------------------------------------------------------------------------
def load_sweep(path: str | Path) -> Sweep:
    """Parse and validate a sweep file (or a shipped study name): every cell's spec, before anything runs."""
    source = Path(path)
    if not source.exists() and not str(path).endswith(".toml"):
        source = shipped_path(str(path), "study")
    data = load_toml(source)
    search_beside(source)
    return sweep_from_dict(data, source=str(source), default_name=re.sub(r"[^A-Za-z0-9._-]+", "-", source.stem))


def sweep_from_dict(data: Mapping[str, Any], source: str = "<sweep>", default_name: str = "sweep") -> Sweep:
    """A validated :class:`Sweep` from the nested data of a sweep file."""
    for key in data:
        if key not in SWEEP_KEYS:
            raise FedmergeError(
                f"{source}: unknown top-level key '{key}'{_suggest(key, SWEEP_KEYS)}; a sweep file has "
                'name, description, a [base] table (a spec, or preset = "name" plus overrides) and a [grid] table.'
            )
    base = _base(data.get("base", {}), source)
    axes = _axes(data.get("grid"), source)
    try:
        name = directory_name("name", data.get("name", default_name))
    except FedmergeError as error:
        raise FedmergeError(f"{source}: {error}") from None
    sweep = Sweep(
        name=name,
        description=str(data.get("description", "")),
        source=source,
        base=base,
        axes=axes,
    )
    sweep.cells = _cells(sweep)
    return sweep


def _base(raw: Any, source: str) -> dict:
    if not isinstance(raw, Mapping):
        raise FedmergeError(f'{source}: [base] must be a table (a spec, or preset = "name" plus overrides).')
    raw = dict(raw)
    preset = raw.pop("preset", None)
    if preset is None:
        return raw
    nested = load_experiment(str(preset))
    return _merge(nested, raw)


def _merge(base: dict, overrides: Mapping) -> dict:
    merged = dict(base)
    for key, value in overrides.items():
        if isinstance(value, Mapping) and isinstance(merged.get(key), Mapping) and not is_spread(value):
            merged[key] = _merge(dict(merged[key]), value)
        else:
            merged[key] = value
    return merged


def _axes(grid: Any, source: str) -> list[Axis]:
    if grid is None:
        raise FedmergeError(f"{source}: no [grid] table; add one, e.g. [grid] seed = [0, 1, 2].")
    if not isinstance(grid, Mapping):
        raise FedmergeError(f"{source}: [grid] must be a table of dotted spec keys → lists of values.")
    if not grid:
        raise FedmergeError(
            f"{source}: the [grid] table is empty; give at least one key and its values, e.g. seed = [0, 1]."
        )
    axes = []
    for name, value in grid.items():
        if isinstance(value, Mapping) and not is_spread(value):
            axes.append(_named_axis(name, value, source))
        else:
            values = value if isinstance(value, list) else [value]
            if not values:
                raise FedmergeError(f"{source}: grid key '{name}' has no values (an empty grid); give at least one.")
            axes.append(Axis(name, (name,), tuple((v,) for v in values), tuple(_label(v) for v in values)))
    return axes


def _named_axis(name: str, table: Mapping, source: str) -> Axis:
    table = dict(table)
    labels = table.pop("labels", None)
    if not table:
        raise FedmergeError(f"{source}: grid axis '{name}' has no keys; give dotted spec keys → lists of values.")
    lengths = {}
    for key, values in table.items():
        if not isinstance(values, list):
            raise FedmergeError(f"{source}: grid axis '{name}': '{key}' must be a list of values, got {values!r}.")
        lengths[key] = len(values)
    if len(set(lengths.values())) != 1:
        raise FedmergeError(
            f"{source}: grid axis '{name}': its keys vary together, so their lists need the same length; got "
            + ", ".join(f"{k}: {n}" for k, n in lengths.items())
            + "."
        )
    count = next(iter(lengths.values()))
    if count == 0:
        raise FedmergeError(f"{source}: grid axis '{name}' has no values (an empty grid); give at least one.")
    levels = tuple(tuple(table[key][i] for key in table) for i in range(count))
    if labels is None:
        labels = ["+".join(_label(v) for v in level) for level in levels]
    if not isinstance(labels, list) or len(labels) != count:
        raise FedmergeError(f"{source}: grid axis '{name}': 'labels' must be a list of {count} names.")
    return Axis(name, tuple(table), levels, tuple(str(label) for label in labels))


def _label(value: Any) -> str:
    if isinstance(value, Mapping):
        return ",".join(f"{k}{_label(v)}" for k, v in value.items())
    if isinstance(value, list):
        return "[" + ",".join(_label(v) for v in value) + "]"
    if isinstance(value, float):
        return f"{value:g}"
    return str(value)


def _cells(sweep: Sweep) -> list[Cell]:
    cells, seen = [], {}
    for index, combination in enumerate(itertools.product(*(range(len(axis.values)) for axis in sweep.axes))):
        overrides, levels = {}, {}
        for axis, level in zip(sweep.axes, combination):
            overrides.update(dict(zip(axis.keys, axis.values[level])))
            levels[axis.name] = axis.labels[level]
        try:
            spec = Spec.from_flat(overrides, sweep.base)
        except FedmergeError as error:
            where = ", ".join(f"{axis}={label}" for axis, label in levels.items())
            raise FedmergeError(f"{sweep.source}: cell {index + 1} ({where}): {error}") from None
        digest = spec_hash(spec)
        if digest in seen:
            raise FedmergeError(
                f"{sweep.source}: cells {seen[digest] + 1} and {index + 1} are the same experiment "
                f"({', '.join(f'{a}={level}' for a, level in levels.items())}); remove the duplicate grid value."
            )
        seen[digest] = index
        cells.append(Cell(index, overrides, levels, spec, f"{_slug(levels)}-{digest[:8]}"))
    return cells


def spec_hash(spec: Spec) -> str:
    return hashlib.sha256(json.dumps(spec.to_dict(), sort_keys=True, default=str).encode()).hexdigest()


def _slug(levels: Mapping[str, str], limit: int = 60) -> str:
    """``axis-level`` per axis (the last part of a dotted key), joined by ``_``: ``seed-0_spread-16x``."""
    parts = [
        re.sub(r"[^A-Za-z0-9.]+", "-", f"{axis.split('.')[-1]}-{label}").strip("-") for axis, label in levels.items()
    ]
    return "_".join(parts)[:limit].rstrip("-_") or "cell"


# -- shipped studies ---------------------------------------------------------------------------------


# -- running -----------------------------------------------------------------------------------------
def cell_dir(sweep_dir: Path, cell: Cell) -> Path:
    return Path(sweep_dir) / CELLS / cell.id


def is_complete(run_dir: Path) -> bool:
    """A run directory is complete when its results.json parses and does not say ``"complete": false`` (a run that
    stopped keeps its finished runs there, and is run again whole)."""
    try:
        return json.loads((Path(run_dir) / RESULTS).read_text()).get("complete", True) is not False
    except (OSError, ValueError, AttributeError):
        return False


def manifest(sweep: Sweep, sweep_dir: Path, timings: Mapping[str, float] | None = None) -> dict:
    timings = timings or {}
    return {
        "name": sweep.name,
        "description": sweep.description,
        "source": sweep.source,
        "updated": dt.datetime.now().isoformat(timespec="seconds"),
        "base": sweep.base,
        "axes": [
            {"name": a.name, "keys": list(a.keys), "labels": list(a.labels), "values": [list(v) for v in a.values]}
            for a in sweep.axes
        ],
        "cells": [
            {
                "id": cell.id,
                "dir": f"{CELLS}/{cell.id}",
                "levels": cell.levels,
                "overrides": cell.overrides,
                "complete": is_complete(cell_dir(sweep_dir, cell)),
                **({"seconds": round(timings[cell.id], 1)} if cell.id in timings else {}),
            }
            for cell in sweep.cells
        ],
    }


def write_manifest(sweep_dir: Path, data: Mapping) -> None:
    write_file(Path(sweep_dir) / MANIFEST, json.dumps(data, indent=1, default=str))


def clean_partial(sweep_dir: Path, cell: Cell) -> list[Path]:
    """Remove what an interrupted cell left behind (the runner's temporary directories, an incomplete dir)."""
    removed = []
    cells = Path(sweep_dir) / CELLS
    if not cells.is_dir():
        return removed
    for leftover in cells.glob(f".{cell.id}.*"):
        shutil.rmtree(leftover, ignore_errors=True)
        removed.append(leftover)
    target = cell_dir(sweep_dir, cell)
    if target.exists() and not is_complete(target):
        shutil.rmtree(target, ignore_errors=True)
        removed.append(target)
    return removed


Runner = Callable[[Spec, Path], Path]


def _default_runner(show_progress: bool) -> Runner:
    from fedmerge.simulations.runner import run  # Flower's simulation stack: loaded only to run

    return lambda spec, run_dir: run(spec, out=run_dir.parent, run_dir=run_dir, show_progress=show_progress)


def run_sweep(
    sweep: Sweep,
    sweep_dir: Path,
    show_progress: bool = True,
    runner: Runner | None = None,
    log: Callable[[str], None] = print,
) -> dict:
    """Run every cell not finished yet into ``sweep_dir``; return the manifest (also in ``sweep.json``)."""
    sweep_dir = Path(sweep_dir)
    check_output_dir(sweep_dir, "--out")
    existing = sweep_dir / MANIFEST
    timings: dict[str, float] = {}
    if existing.exists():
        try:
            previous = json.loads(existing.read_text())
            timings.update({c["id"]: c["seconds"] for c in previous.get("cells", []) if "seconds" in c})
        except (ValueError, TypeError, KeyError, AttributeError):
            raise FedmergeError(
                f"{existing} is not valid JSON (a damaged manifest); remove it to let the sweep rewrite it."
            ) from None
    elif sweep_dir.exists() and any(p.name != CELLS for p in sweep_dir.iterdir()):
        raise FedmergeError(f"{sweep_dir} exists and is not a sweep directory (no {MANIFEST}); choose another --out.")
    runner = runner or _default_runner(show_progress)
    (sweep_dir / CELLS).mkdir(parents=True, exist_ok=True)
    write_manifest(sweep_dir, manifest(sweep, sweep_dir, timings))
    todo = [cell for cell in sweep.cells if not is_complete(cell_dir(sweep_dir, cell))]
    done = len(sweep.cells) - len(todo)
    total = len(sweep.cells)
    log(f"sweep {sweep.name}: {total} cells, {done} finished already, {len(todo)} to run → {sweep_dir}")
    started = time.perf_counter()
    for number, cell in enumerate(todo, 1):
        clean_partial(sweep_dir, cell)
        elapsed = time.perf_counter() - started
        eta = f", about {_duration(elapsed / (number - 1) * (len(todo) - number + 1))} left" if number > 1 else ""
        log(f"[{done + number}/{total}] {cell.describe()}  ({_duration(elapsed)} elapsed{eta})")
        cell_started = time.perf_counter()
        try:
            runner(cell.spec, cell_dir(sweep_dir, cell))
        except FedmergeError as error:
            _stopped(sweep, sweep_dir, cell, timings)
            raise FedmergeError(
                f"sweep cell {cell.id} ({cell.describe()}) failed: {error} Finished cells are kept; "
                "run the sweep again to resume."
            ) from None
        except BaseException as error:  # Ctrl-C, SIGTERM: the command line says so, and where the finished cells are
            _stopped(sweep, sweep_dir, cell, timings)
            error.__notes__ = [f"the finished cells are kept in {sweep_dir}; run the sweep again to resume"]
            raise
        timings[cell.id] = time.perf_counter() - cell_started
        write_manifest(sweep_dir, manifest(sweep, sweep_dir, timings))
    result = manifest(sweep, sweep_dir, timings)
    result["seconds"] = round(time.perf_counter() - started, 1)
    write_manifest(sweep_dir, result)
    log(f"sweep {sweep.name}: {total} cells complete in {_duration(result['seconds'])} → {sweep_dir}")
    return result


def _stopped(sweep: Sweep, sweep_dir: Path, cell: Cell, timings: Mapping[str, float]) -> None:
    """After ``cell`` stopped: remove what it left and record the finished cells (on a full disk the manifest may
    stay as it was; a resumed sweep rebuilds it from the cells)."""
    clean_partial(sweep_dir, cell)
    try:
        write_manifest(sweep_dir, manifest(sweep, sweep_dir, timings))
    except DiskFull:
        pass


def _duration(seconds: float) -> str:
    seconds = int(round(seconds))
    return f"{seconds // 60}m{seconds % 60:02d}s" if seconds >= 60 else f"{seconds}s"
