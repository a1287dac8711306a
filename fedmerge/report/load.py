"""Find and validate results: one run directory, a sweep directory, or a folder of run directories.

Runs are grouped into settings (:class:`Group`): runs whose specs are equal except for the seed (and, in a sweep,
whose levels on every axis but the seed are equal). Only a setting's runs are averaged. Two runs of one setting
with the same seed are one sample (the same seed gives the same numbers): the newest is kept and the others
are listed in :attr:`Collection.repeats`.
"""

from __future__ import annotations

import json
from collections import defaultdict
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path
from typing import Any

from fedmerge.errors import FedmergeError

RESULTS = "results.json"
MANIFEST = "sweep.json"
REQUIRED = ("spec", "suite", "clients", "runs")
RUN_REQUIRED = ("strategy", "rounds", "history", "final")
LABEL_LIMIT = 60
"""A setting's label longer than this is replaced by "setting N" (the table of differing keys spells it out)."""


@dataclass
class RunResult:
    """One run's ``results.json``, with where it came from and its sweep levels (axis → label), if any."""

    path: Path
    data: dict
    levels: dict = field(default_factory=dict)
    cell: str | None = None

    @property
    def seed(self) -> int:
        return int(self.data.get("seed", self.data["spec"].get("seed", 0)))

    @property
    def name(self) -> str:
        return str(self.data["spec"].get("name", self.path.name))

    @property
    def settings(self) -> dict:
        """The spec without its seed: what every seed of one setting shares."""
        return {key: value for key, value in self.data["spec"].items() if key != "seed"}


@dataclass
class Group:
    """One setting: runs that differ only by their seed. ``label`` names it by what sets it apart from the other
    settings: ``levels`` (a sweep's axes but the seed, axis → label) and ``differs`` (dotted spec key → value, for
    the keys whose values differ between the settings)."""

    label: str
    runs: list[RunResult]
    levels: dict
    differs: dict

    @property
    def seeds(self) -> list[int]:
        return sorted(run.seed for run in self.runs)


@dataclass
class Collection:
    """What a report covers: the runs, and the sweep manifest when the directory is a sweep."""

    root: Path
    runs: list[RunResult]
    manifest: dict | None = None
    missing: list[str] = field(default_factory=list)  # sweep cells without results yet
    repeats: list[tuple[RunResult, RunResult]] = field(default_factory=list)  # (left out, kept): same setting and seed

    @property
    def title(self) -> str:
        if self.manifest:
            return f"sweep {self.manifest.get('name', self.root.name)}"
        if len(self.runs) == 1:
            return f"run {self.runs[0].name} ({self.runs[0].path.name})"
        return f"{len(self.runs)} runs in {self.root}"

    @property
    def axes(self) -> list[str]:
        """The sweep's axes that vary (seed excluded)."""
        return [a["name"] for a in self._axes() if len(a.get("labels", [])) > 1]

    @cached_property
    def groups(self) -> list[Group]:
        """The settings, in the order their first runs were found."""
        axis_keys = [key for axis in self._axes() for key in axis.get("keys", [])]
        return group_runs(self.runs, seed_axes(self.manifest), axis_keys)

    def _axes(self) -> list[dict]:
        """The sweep's axes but the seed's."""
        seeds = seed_axes(self.manifest)
        return [axis for axis in (self.manifest or {}).get("axes", []) if axis["name"] not in seeds]


# -- settings -----------------------------------------------------------------------------------------
def seed_axes(manifest: dict | None) -> set[str]:
    """A sweep's axes that set the seed alone."""
    return {a["name"] for a in (manifest or {}).get("axes", []) if a["name"] == "seed" or a.get("keys") == ["seed"]}


def setting_key(run: RunResult, seed_axes: set[str]) -> str:
    """What a run's seeds share: its spec but the seed, and its sweep levels but the seed axes."""
    levels = {axis: label for axis, label in run.levels.items() if axis not in seed_axes}
    return json.dumps({"levels": levels, "spec": run.settings}, sort_keys=True, default=str)


def flatten(spec: dict, prefix: str = "") -> dict:
    """Nested tables as dotted keys (``training.lr``, ``strategy.ties.density``) → values."""
    out = {}
    for key, value in spec.items():
        if isinstance(value, dict) and value:
            out.update(flatten(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = value
    return out


def value_text(value) -> str:
    """A spec value as the user wrote it: strings bare, the rest as JSON; an absent key is the default."""
    if value is None:
        return "default"
    return value if isinstance(value, str) else json.dumps(value)


def covered(key: str, keys) -> bool:
    """Whether dotted ``key`` is one of ``keys`` or inside one of them (``training.lr.geometric`` in ``training.lr``)."""
    return any(key == k or key.startswith(f"{k}.") for k in keys)


def group_runs(runs: list[RunResult], seed_axes: set[str] = frozenset(), axis_keys=()) -> list[Group]:
    """Runs grouped into settings, each labelled by its sweep levels and by the spec keys that differ between the
    settings (those a sweep axis already names are left to its level)."""
    members: dict[str, list[RunResult]] = defaultdict(list)
    for run in runs:
        members[setting_key(run, seed_axes)].append(run)
    flat = [flatten(group[0].settings) for group in members.values()]
    keys = sorted({key for spec in flat for key in spec})
    differing = [key for key in keys if len({json.dumps(spec.get(key), sort_keys=True) for spec in flat}) > 1]
    groups = []
    for number, (group, spec) in enumerate(zip(members.values(), flat), 1):
        levels = {axis: label for axis, label in group[0].levels.items() if axis not in seed_axes}
        differs = {key: value_text(spec.get(key)) for key in differing}
        parts = [f"{axis}={label}" for axis, label in levels.items()]
        parts += [f"{key}={text}" for key, text in differs.items() if not covered(key, axis_keys)]
        label = ", ".join(parts) or group[0].name
        groups.append(Group(label if len(label) <= LABEL_LIMIT else f"setting {number}", group, levels, differs))
    return groups


def collect(
    root: Path, runs: list[RunResult], manifest: dict | None = None, missing: list[str] | None = None
) -> Collection:
    """A :class:`Collection` with one run per (setting, seed): the newest (by start time, then path) is kept and
    the others are recorded as repeats, since the same seed gives the same numbers (one sample, not two)."""
    newest: dict[tuple, RunResult] = {}
    repeats = []
    for run in sorted(runs, key=lambda r: (str(r.data.get("started", "")), str(r.path)), reverse=True):
        key = (setting_key(run, seed_axes(manifest)), run.seed)
        if key in newest:
            repeats.append((run, newest[key]))
        else:
            newest[key] = run
    kept = {id(run) for run in newest.values()}
    return Collection(root, [run for run in runs if id(run) in kept], manifest, list(missing or []), repeats)


# -- reading ------------------------------------------------------------------------------------------
def read_json(path: Path) -> Any:
    """Parse a JSON file, naming it on failure (a truncated or damaged file is a user-facing error)."""
    try:
        text = Path(path).read_text()
    except OSError as error:
        raise FedmergeError(f"cannot read {path}: {error}") from None
    try:
        return json.loads(text)
    except ValueError as error:
        raise FedmergeError(
            f"{path} is not valid JSON ({error}); the file is truncated or damaged. Run the experiment again "
            "(a sweep skips its finished cells) or remove that directory."
        ) from None


def load_run(run_dir: Path, levels: dict | None = None, cell: str | None = None) -> RunResult:
    path = Path(run_dir) / RESULTS
    data = read_json(path)
    if not isinstance(data, dict):
        raise FedmergeError(f"{path} is not a fedmerge results file (expected a JSON object).")
    for key in REQUIRED:
        if key not in data:
            raise FedmergeError(f"{path} lacks '{key}': not a fedmerge results file, or written by an older version.")
    if not isinstance(data["spec"], dict):
        raise FedmergeError(
            f"{path}: 'spec' must be a table of the run's settings; the file is damaged or from another version."
        )
    if not isinstance(data["runs"], list):
        raise FedmergeError(f"{path}: 'runs' must be a list.")
    for number, run in enumerate(data["runs"]):
        for key in RUN_REQUIRED:
            if not isinstance(run, dict) or key not in run:
                raise FedmergeError(f"{path}: run {number} lacks '{key}'; the file is damaged or from another version.")
    return RunResult(Path(run_dir), data, dict(levels or {}), cell)


def load_runs(directory: str | Path) -> Collection:
    """The runs under ``directory``: a run directory, a sweep directory, or a folder of run directories."""
    root = Path(directory)
    if not root.exists():
        raise FedmergeError(f"no such directory: {root}; give a run directory, a sweep directory or a folder of runs.")
    if not root.is_dir():
        raise FedmergeError(
            f"{root} is not a directory; give a run directory (with results.json) or a sweep directory."
        )
    if (root / MANIFEST).exists():
        return _sweep(root)
    if (root / RESULTS).exists():
        return collect(root, [load_run(root)])
    runs = [load_run(p.parent) for p in sorted(root.glob(f"*/{RESULTS}")) if not p.parent.name.startswith(".")]
    if not runs:
        raise FedmergeError(
            f"no results in {root}: no {RESULTS} (a run), no {MANIFEST} (a sweep), and no run directories inside. "
            "Run `fedmerge run` or `fedmerge sweep` first, or give the directory they wrote."
        )
    return collect(root, runs)


def _sweep(root: Path) -> Collection:
    manifest = read_json(root / MANIFEST)
    if not isinstance(manifest, dict) or not isinstance(manifest.get("cells"), list):
        raise FedmergeError(f"{root / MANIFEST} is not a fedmerge sweep manifest (no 'cells' list).")
    runs, missing = [], []
    for cell in manifest["cells"]:
        cell_dir = root / cell.get("dir", f"cells/{cell.get('id')}")
        if (cell_dir / RESULTS).exists():
            runs.append(load_run(cell_dir, cell.get("levels", {}), cell.get("id")))
        else:
            missing.append(str(cell.get("id")))
    if not runs:
        raise FedmergeError(
            f"the sweep in {root} has no finished cells yet ({len(missing)} to run); run `fedmerge sweep` on its file first."
        )
    return collect(root, runs, manifest, missing)
