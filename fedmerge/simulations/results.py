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
from safetensors.torch import save_file

from fedmerge.errors import FedmergeError
from fedmerge.files import TargetAppeared, staged
from fedmerge.simulations.spec import Spec

SUMMARY_COLUMNS = (
    "strategy", "rounds", "scaling_lambda", "lambda_scale", "server_lr_beta", "tuned", "tuned_value", "tuned_searched",
    "mean_accuracy", "mean_normalized_accuracy", "mean_loss", "distance_to_optimum", "diverged",
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
        rows.append({
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
        })
    return rows


def task_rows(results: dict) -> list[dict]:
    return [
        {"strategy": run["strategy"], "rounds": run["rounds"], **task}
        for run in results["runs"] for task in run["final"]["tasks"]
    ]


def round_rows(results: dict) -> list[dict]:
    rows = []
    for run in results["runs"]:
        for entry in run["history"]:
            aggregation = entry.get("aggregation", {})
            rows.append({
                "strategy": run["strategy"], "rounds": run["rounds"], "round": entry["round"],
                **{k: entry.get(k) for k in METRIC_COLUMNS},
                "chi_square": aggregation.get("chi_square"),
            })
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


def write_results(spec: Spec, results: dict, out: Path, started: dt.datetime | None = None, run_dir: Path | None = None) -> Path:
    """Write a run's directory atomically (staged beside it, then renamed); return its path.

    ``run_dir`` names the directory and must not exist yet; by default it is ``out/<name>-<start time>``,
    with a ``-2``, ``-3``... suffix if a run of the same name started in the same second.
    """
    started = started or dt.datetime.now()
    if run_dir is not None and Path(run_dir).exists():
        raise FedmergeError(f"results directory {run_dir} exists already; choose another --out or remove it.")
    results = dict(results)
    models = results.pop("models", {})
    document = {
        "spec": spec.to_dict(),
        "seed": spec.seed,
        "started": started.isoformat(timespec="seconds"),
        "versions": versions(),
        **results,
    }
    files = {
        "results.json": json.dumps(_finite(document), indent=1, default=float, allow_nan=False),
        "summary.csv": _csv(summary_rows(results)),
        "tasks.csv": _csv(task_rows(results)),
        "rounds.csv": _csv(round_rows(results)),
        "spec.toml": tomli_w.dumps(spec.to_dict()),
    }
    stem = f"{spec.name}-{started:%Y%m%d-%H%M%S}"
    candidates = [Path(run_dir)] if run_dir is not None else (Path(out) / (stem + (f"-{k}" if k > 1 else "")) for k in itertools.count(1))
    for candidate in candidates:
        if candidate.exists():
            continue
        try:
            with staged(candidate, directory=True) as staging:
                for name, text in files.items():
                    (staging / name).write_text(text)
                (staging / "models").mkdir()
                for name, state in models.items():
                    save_file({k: v.contiguous() for k, v in state.items()}, staging / "models" / f"{name}.safetensors")
            return candidate
        except TargetAppeared:  # a run of the same name finished in the same second: take the next name
            if run_dir is not None:
                raise
