"""One flat row per (run, strategy, round count), with the heterogeneity factors read from the results file.

Factors: Dirichlet α (label-skew partitions), the spread of learning rates and of local step counts over the
clients (max / min), the number f of clients sending corrupted updates, χ²(p‖w) of the first aggregation,
ζ² and the mean pairwise cosine similarity of the task vectors.
"""

from __future__ import annotations

import json
import math
from collections import defaultdict
from collections.abc import Iterable, Sequence

from fedmerge.report.load import Collection, RunResult
from fedmerge.report.stats import mean_ci

METRICS = {
    "mean_normalized_accuracy": "normalized accuracy",
    "mean_accuracy": "accuracy",
    "mean_loss": "loss",
    "distance_to_optimum": "distance to the optimum ‖θ − θ*‖",
}
FACTORS = {
    "alpha": ("Dirichlet α (smaller: stronger label skew)", True),
    "lr_spread": ("learning-rate spread over clients (max / min)", True),
    "steps_spread": ("local-step spread over clients (max / min)", True),
    "corrupted": ("corrupted clients f", False),
}
"""factor → (axis label, log scale)."""
FACTOR_KEYS = {
    "alpha": ("suite_options.alpha",),
    "lr_spread": ("training.lr",),
    "steps_spread": ("training.steps", "training.epochs"),
    "corrupted": ("training.corruption", "training.corruption_scale"),
}


def primary_metric(run: RunResult) -> str:
    return "mean_normalized_accuracy" if run.data["suite"].get("metric") == "accuracy" else "distance_to_optimum"


def group_label(run: RunResult, collection: Collection) -> str:
    """What seeds are averaged within: the sweep's non-seed levels, else the spec without its seed."""
    if collection.manifest is not None:
        levels = [f"{k}={v}" for k, v in run.levels.items() if k != "seed"]
        return ", ".join(levels) or "all"
    return run.name


def factors(run: RunResult) -> dict:
    data = run.data
    clients = data.get("clients", [])
    settings = [c.get("settings", {}) for c in clients]
    out: dict = {}
    options = data["suite"].get("options", {})
    out["alpha"] = float(options["alpha"]) if options.get("partition") == "dirichlet" and "alpha" in options else None
    lrs = [s.get("lr") for s in settings if s.get("lr")]
    out["lr_spread"] = max(lrs) / min(lrs) if lrs else None
    steps = [c.get("reply", {}).get("num-steps") or c.get("settings", {}).get("steps") for c in clients]
    steps = [s for s in steps if s]
    out["steps_spread"] = max(steps) / min(steps) if steps else None
    out["corrupted"] = corrupted_clients(data)
    return out


def corrupted_clients(data: dict) -> int:
    corruption = data["spec"].get("training", {}).get("corruption", "none")
    clients = len(data.get("clients", [])) or int(data["spec"].get("clients", 1))
    if isinstance(corruption, str):
        return 0 if corruption == "none" else clients
    if isinstance(corruption, list):
        return sum(1 for c in corruption if c != "none")
    return 0


def first_aggregation(run_entry: dict) -> dict:
    for entry in run_entry.get("history", []):
        if entry.get("aggregation"):
            return entry["aggregation"]
    return {}


def mean_cosine(data: dict) -> float | None:
    matrix = data.get("diagnostics", {}).get("cosine_similarity")
    if not matrix or len(matrix) < 2:
        return None
    n = len(matrix)
    return sum(matrix[i][j] for i in range(n) for j in range(n) if i != j) / (n * (n - 1))


def rows(collection: Collection) -> list[dict]:
    out = []
    for run in collection.runs:
        data = run.data
        base = {
            "group": group_label(run, collection),
            "seed": run.seed,
            "source": str(run.path),
            "suite": data["suite"].get("name"),
            "metric": data["suite"].get("metric"),
            "clients": len(data.get("clients", [])),
            "zeta2": data.get("diagnostics", {}).get("zeta2"),
            "mean_cosine": mean_cosine(data),
            "pretrained_accuracy": data.get("pretrained", {}).get("mean_accuracy"),
            "own_accuracy": _mean([c.get("own", {}).get("test", {}).get("accuracy") for c in data.get("clients", [])]),
            **{f"level:{k}": v for k, v in run.levels.items()},
            **factors(run),
        }
        for entry in data["runs"]:
            final, selected = entry["final"], entry.get("selected", {})
            aggregation = first_aggregation(entry)
            out.append({
                **base,
                "strategy": entry["strategy"],
                "rounds": int(entry["rounds"]),
                **{k: final.get(k) for k in METRICS},
                "scaling": selected.get("scaling"),
                "server_lr": selected.get("server_lr"),
                "rho": selected.get("threshold", selected.get("radius")),
                "chi_square": aggregation.get("chi_square"),
            })
    return out


def aggregate(table: Sequence[dict], by: Sequence[str], values: Iterable[str]) -> list[dict]:
    """Group rows by the ``by`` keys (first-seen order); each value → mean, CI half-width and n over the group."""
    groups: dict = defaultdict(list)
    for row in table:
        groups[tuple(_hashable(row.get(k)) for k in by)].append(row)
    result = []
    values = list(values)
    for key, members in groups.items():
        entry = dict(zip(by, key))
        entry["n"] = len(members)
        for value in values:
            mean, half, n = mean_ci([m.get(value) for m in members if m.get(value) is not None])
            entry[value], entry[f"{value}_ci"], entry[f"{value}_n"] = mean, half, n
        result.append(entry)
    return result


def varying(table: Sequence[dict], key: str) -> list:
    seen = []
    for row in table:
        value = row.get(key)
        if value is not None and value not in seen:
            seen.append(value)
    return seen


def select(table: Sequence[dict], **conditions) -> list[dict]:
    return [r for r in table if all(r.get(k) == v for k, v in conditions.items())]


def _mean(values):
    values = [v for v in values if v is not None]
    return sum(values) / len(values) if values else None


def _hashable(value):
    if isinstance(value, (list, dict)):
        return json.dumps(value, sort_keys=True)
    if isinstance(value, float) and math.isnan(value):
        return None
    return value
