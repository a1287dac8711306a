"""The results store: one directory per run, JSON for machines and CSV for tables, written atomically.

``results.json`` holds everything (spec, seed, versions, timings, clients, diagnostics, every run's
per-round history); ``summary.csv`` one row per (strategy, rounds); ``tasks.csv`` one row per task of each;
``rounds.csv`` one row per round; ``spec.toml`` the resolved spec, to run again; ``models/`` each run's
final global model (``<strategy>-r<rounds>.safetensors``).
"""

import csv
import datetime as dt
import io
import itertools
import json
import math
import platform
from importlib import metadata
from pathlib import Path

import numpy as np
import tomli_w

from fedmerge.errors import FedmergeError
from fedmerge.files import DiskFull, TargetAppeared, staged, write_file, write_safetensors
from fedmerge.simulations.spec import Spec
from fedmerge.tasks import find_suite

SUMMARY_COLUMNS = (
    "strategy",
    "rounds",
    "scaling_lambda",
    "lambda_scale",
    "server_lr_beta",
    "tuned",
    "tuned_value",
    "tuned_searched",
    "mean_accuracy",
    "mean_normalized_accuracy",
    "mean_loss",
    "distance_to_optimum",
    "diverged",
)
METRIC_COLUMNS = SUMMARY_COLUMNS[8:12]


def versions() -> dict[str, str]:
    found = {"python": platform.python_version()}
    for package in ("fedmerge", "flwr", "ray", "torch", "numpy"):
        try:
            found[package] = metadata.version(package)
        except metadata.PackageNotFoundError:
            pass
    return found


def summary_rows(results: dict) -> list[dict]:
    rows = []
    for run in results["runs"]:
        final, selected = run["final"], run["selected"]
        tuned = selected.get("tuned")
        rows.append(
            {
                "strategy": run["strategy"],
                "rounds": run["rounds"],
                "scaling_lambda": selected.get("scaling"),
                "lambda_scale": selected.get("scale"),
                "server_lr_beta": selected.get("server_lr"),
                "tuned": tuned,
                "tuned_value": selected.get(tuned) if tuned else None,
                "tuned_searched": tuned in run.get("searched", {}) if tuned else None,
                **{k: final.get(k) for k in METRIC_COLUMNS},
                "diverged": bool(final.get("diverged")),
            }
        )
    return rows


def task_rows(results: dict) -> list[dict]:
    return [
        {"strategy": run["strategy"], "rounds": run["rounds"], **task}
        for run in results["runs"]
        for task in run["final"]["tasks"]
    ]


def round_rows(results: dict) -> list[dict]:
    rows = []
    for run in results["runs"]:
        for entry in run["history"]:
            aggregation = entry.get("aggregation", {})
            rows.append(
                {
                    "strategy": run["strategy"],
                    "rounds": run["rounds"],
                    "round": entry["round"],
                    **{k: entry.get(k) for k in METRIC_COLUMNS},
                    "chi_square": aggregation.get("chi_square"),
                }
            )
    return rows


def _finite(value):
    """``value`` with NaN and infinities (a left-out client's norms, say) as None: results.json stays strict JSON."""
    if isinstance(value, (float, np.floating)):
        return float(value) if math.isfinite(value) else None
    if isinstance(value, dict):
        return {k: _finite(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_finite(v) for v in value]
    return value


def _csv(rows: list[dict]) -> str:
    """The rows as CSV, with every key any row has as a column (in first-seen order; missing cells empty)."""
    buffer = io.StringIO()
    if rows:
        columns = list(dict.fromkeys(key for row in rows for key in row))
        writer = csv.DictWriter(buffer, fieldnames=columns, lineterminator="\n")
        writer.writeheader()
        writer.writerows(_finite(rows))  # NaN (a diverged model's means) as an empty cell
    return buffer.getvalue()


class ResultsDirectory:
    """A run's results directory, written as the run goes, so that a later failure never takes finished results along.

    The directory appears (atomically, with every file) at the first :meth:`update`; each later update replaces its
    files one by one atomically, and saves the final models of the runs finished since (each once, then dropped from
    memory). Until :meth:`update` is called with ``complete=True``, results.json says ``"complete": false`` and
    lists what is still to come; :meth:`fail` records why a run stopped. ``run_dir`` names the directory and must
    not exist yet; by default it is ``out/<name>-<start time>``, with ``-2``, ``-3``... if a run of the same name
    started in the same second.
    """

    def __init__(self, spec: Spec, out: Path, started: dt.datetime | None = None, run_dir: Path | None = None) -> None:
        self.spec, self.out, self.run_dir = spec, Path(out), None if run_dir is None else Path(run_dir)
        self.started = started or dt.datetime.now()
        if self.run_dir is not None and self.run_dir.exists():
            raise FedmergeError(f"results directory {run_dir} exists already; choose another --out or remove it.")
        self.path: Path | None = None
        self.document: dict = {}

    def update(self, results: dict, complete: bool = False, pending: list[str] | None = None) -> Path:
        """Write what ``results`` holds so far; its ``models`` are saved and removed from it (memory is freed)."""
        models, results["models"] = results.get("models", {}), {}
        self.document = {
            "spec": self.spec.to_dict(),
            "seed": self.spec.seed,
            "started": self.started.isoformat(timespec="seconds"),
            "versions": versions(),
            "complete": complete,
            **({} if complete else {"pending": pending or []}),
            **{key: value for key, value in results.items() if key != "models"},
        }
        files = self._files()
        if self.path is None:
            self.path = self._create(files, models)
        else:  # results.json last: on a full disk it keeps saying what the files beside it hold
            for name, state in models.items():
                write_safetensors(self.path / "models" / f"{name}.safetensors", state)
            for name, text in reversed(files.items()):
                write_file(self.path / name, text)
        return self.path

    def amend(self, **fields) -> Path | None:
        """Add top-level fields to results.json (once the directory exists; else nothing)."""
        if self.path is None:
            return None
        self.document.update(fields)
        write_file(self.path / "results.json", _json(self.document))
        return self.path

    def fail(self, reason: str) -> Path | None:
        """Record why the run stopped; the directory, if there is one yet, keeps what finished (on a full disk its
        results.json keeps saying ``"complete": false`` without the reason)."""
        if self.document.get("complete") is True:
            return self.path
        try:
            return self.amend(complete=False, error=reason)
        except DiskFull:
            return self.path

    def _files(self) -> dict[str, str]:
        return {
            "results.json": _json(self.document),
            "summary.csv": _csv(summary_rows(self.document)),
            "tasks.csv": _csv(task_rows(self.document)),
            "rounds.csv": _csv(round_rows(self.document)),
            "spec.toml": tomli_w.dumps({**self.spec.to_dict(), "suite": find_suite(self.spec.suite).rerunnable}),
        }

    def _create(self, files: dict[str, str], models: dict) -> Path:
        stem = f"{self.spec.name}-{self.started:%Y%m%d-%H%M%S}"
        candidates = (
            [self.run_dir]
            if self.run_dir is not None
            else (self.out / (stem + (f"-{k}" if k > 1 else "")) for k in itertools.count(1))
        )
        for candidate in candidates:
            if candidate.exists():
                continue
            size = sum(len(text.encode()) for text in files.values()) + sum(
                tensor.numel() * tensor.element_size() for state in models.values() for tensor in state.values()
            )
            try:
                with staged(candidate, directory=True, size=size) as staging:
                    for name, text in files.items():
                        (staging / name).write_text(text)
                    (staging / "models").mkdir()
                    for name, state in models.items():
                        write_safetensors(staging / "models" / f"{name}.safetensors", state)
                return candidate
            except TargetAppeared:  # a run of the same name finished in the same second: take the next name
                if self.run_dir is not None:
                    raise


def _json(document: dict) -> str:
    return json.dumps(_finite(document), indent=1, default=float, allow_nan=False)


def write_results(
    spec: Spec, results: dict, out: Path, started: dt.datetime | None = None, run_dir: Path | None = None
) -> Path:
    """Write a finished run's directory atomically; return its path (see :class:`ResultsDirectory`)."""
    return ResultsDirectory(spec, out, started, run_dir).update(dict(results), complete=True)
