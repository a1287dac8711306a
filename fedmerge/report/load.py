"""Find and validate results: one run directory, a sweep directory, or a folder of run directories."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from fedmerge.errors import FedmergeError

RESULTS = "results.json"
MANIFEST = "sweep.json"
REQUIRED = ("spec", "suite", "clients", "runs")
RUN_REQUIRED = ("strategy", "rounds", "history", "final")


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


@dataclass
class Collection:
    """What a report covers: the runs, and the sweep manifest when the directory is a sweep."""

    root: Path
    runs: list[RunResult]
    manifest: dict | None = None
    missing: list[str] = field(default_factory=list)  # sweep cells without results yet

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
        if not self.manifest:
            return []
        return [a["name"] for a in self.manifest.get("axes", []) if a["name"] != "seed" and len(a.get("labels", [])) > 1]


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
        raise FedmergeError(f"{root} is not a directory; give a run directory (with results.json) or a sweep directory.")
    if (root / MANIFEST).exists():
        return _sweep(root)
    if (root / RESULTS).exists():
        return Collection(root, [load_run(root)])
    runs = [load_run(p.parent) for p in sorted(root.glob(f"*/{RESULTS}")) if not p.parent.name.startswith(".")]
    if not runs:
        raise FedmergeError(
            f"no results in {root}: no {RESULTS} (a run), no {MANIFEST} (a sweep), and no run directories inside. "
            "Run `fedmerge run` or `fedmerge sweep` first, or give the directory they wrote."
        )
    return Collection(root, runs)


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
    return Collection(root, runs, manifest, missing)
