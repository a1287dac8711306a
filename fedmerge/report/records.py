"""One flat row per (run, strategy, round count), with the heterogeneity factors read from the results file.

Factors: Dirichlet α (label-skew partitions), the spread of learning rates and of local step counts over the
clients (max / min), the number f of clients sending corrupted updates, χ²(p‖w) of the first round
(:func:`first_round`), ζ² and the mean pairwise cosine similarity of the task vectors. Every row also carries
its run's baselines (θ0 and the clients' own models, :func:`baselines`) and its setting (``group``: runs that
differ only by their seed, :class:`~fedmerge.report.load.Group`), so means and intervals are taken over seeds.
"""

from __future__ import annotations

import json
import math
from collections import defaultdict
from collections.abc import Iterable, Sequence

from fedmerge.report.load import Collection, Group, RunResult
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


DETAIL_LIMIT = 32
"""Up to this many clients a report shows each one (a table row, a pair of bars, a labelled heatmap row); above it,
their distribution (quantiles, a scatter, an unlabelled heatmap of the diagnostics' sample)."""

BASELINES = {"theta0": "θ0 (pretrained)", "own": "clients' own models"}
"""The reference models every report shows: prefix of their row keys (``theta0_mean_accuracy``) → name."""


def primary_metric(run: RunResult) -> str:
    return "mean_normalized_accuracy" if run.data["suite"].get("metric") == "accuracy" else "distance_to_optimum"


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
    """The aggregation record of a strategy run's first round that has one ({} if none)."""
    for entry in run_entry.get("history", []):
        if entry.get("aggregation"):
            return entry["aggregation"]
    return {}


def first_round(data: dict) -> tuple[dict, dict]:
    """(strategy run, aggregation) that defines a run's "χ²(p‖w) of the first round": the first round of the first
    strategy run (one-shot runs first, then in the results' order) that recorded effective weights; ({}, {}) if none.
    The diagnostics table and the effective-weights figure both read it."""
    for entry in sorted(data["runs"], key=lambda e: int(e["rounds"]) != 1):
        aggregation = first_aggregation(entry)
        if aggregation.get("effective_weights"):
            return entry, aggregation
    return {}, {}


def first_round_source(data: dict) -> str | None:
    """Which strategy run and which a_t the first-round χ² comes from, e.g. ``fedavg, 1 round, a_t = lr-sum``."""
    entry, aggregation = first_round(data)
    if not entry:
        return None
    rounds = int(entry["rounds"])
    return f"{entry['strategy']}, {rounds} round{'s' if rounds > 1 else ''}, a_t = {aggregation.get('effective_steps_key')}"


def mean_cosine(data: dict) -> float | None:
    matrix = data.get("diagnostics", {}).get("cosine_similarity")
    if not matrix or len(matrix) < 2:
        return None
    n = len(matrix)
    return sum(matrix[i][j] for i in range(n) for j in range(n) if i != j) / (n * (n - 1))


def baselines(data: dict) -> dict:
    """θ0's and the clients' own models' test metrics as row keys (``theta0_mean_accuracy``, ``own_mean_loss``).
    The clients' own normalized accuracy is 1 by definition; their distance to the optimum is not one number."""
    pretrained = data.get("pretrained", {})
    own = {
        "mean_accuracy": _mean([own_test(c, "accuracy") for c in data.get("clients", [])]),
        "mean_loss": _mean([own_test(c, "loss") for c in data.get("clients", [])]),
    }
    if data["suite"].get("metric") == "accuracy" and own["mean_accuracy"] is not None:
        own["mean_normalized_accuracy"] = 1.0
    return {
        **{f"theta0_{m}": None if pretrained.get("diverged") else pretrained.get(m) for m in METRICS},
        **{f"own_{m}": own.get(m) for m in METRICS},
    }


def weak_clients(data: dict) -> list[dict]:
    """Clients whose own fine-tuned model is no better than θ0 on its own task (``own_above_theta0`` false)."""
    return [c for c in data.get("clients", []) if c.get("own_above_theta0") is False]


def tuned(entry: dict, spec: dict) -> dict:
    """A strategy run's rule parameters → (value, how): ``validation`` when the one-shot search chose it, ``given``
    when the spec sets it (and it was kept)."""
    searched = [key for key in entry.get("searched", {}) if key not in ("scaling", "server_lr")]
    selected = entry.get("selected", {})
    out = {key: (selected.get(key), "validation") for key in searched}
    given = spec.get("strategy", {}).get(entry["strategy"], {})
    out.update({key: (value, "given") for key, value in given.items() if key not in out})
    return out


def rows(collection: Collection) -> list[dict]:
    """One row per (run, strategy, round count); ``group`` is the run's setting (runs differing only by seed)."""
    out = []
    for group in collection.groups:
        for run in group.runs:
            base = _run_fields(run, group)
            out.extend({**base, **_strategy_fields(entry, run.data["spec"])} for entry in run.data["runs"])
    return out


def _run_fields(run: RunResult, group: Group) -> dict:
    data = run.data
    references = baselines(data)
    return {
        "group": group.label,
        "group_levels": group.levels,
        "differs": group.differs,
        "seed": run.seed,
        "source": str(run.path),
        "suite": data["suite"].get("name"),
        "metric": data["suite"].get("metric"),
        "clients": len(data.get("clients", [])),
        "zeta2": data.get("diagnostics", {}).get("zeta2"),
        "mean_cosine": mean_cosine(data),
        "first_round_chi_square": first_round(data)[1].get("chi_square"),
        "first_round_source": first_round_source(data),
        "pretrained_accuracy": references["theta0_mean_accuracy"],
        "own_accuracy": references["own_mean_accuracy"],
        **references,
        **{f"level:{k}": v for k, v in run.levels.items()},
        **factors(run),
    }


def _strategy_fields(entry: dict, spec: dict) -> dict:
    final, selected = entry["final"], entry.get("selected", {})
    diverged = bool(final.get("diverged"))
    return {
        "strategy": entry["strategy"],
        "rounds": int(entry["rounds"]),
        "diverged": diverged,
        **{k: None if diverged else final.get(k) for k in METRICS},  # a diverged model is never a number
        "scaling": selected.get("scaling"),
        "scale": selected.get("scale"),
        "server_lr": selected.get("server_lr"),
        "scaling_how": ("validation" if entry.get("searched", {}).get("scaling", spec.get("select", True)) else "given")
        if "scaling" in selected
        else None,
        "tuned": tuned(entry, spec),
        "chi_square": first_aggregation(entry).get("chi_square"),
    }


def aggregate(table: Sequence[dict], by: Sequence[str], values: Iterable[str]) -> list[dict]:
    """Group rows by the ``by`` keys (first-seen order); each value → mean, CI half-width and n over the group.

    A value some members lack (a diverged run's metrics) has no mean: NaN, with n the members that have it.
    ``diverged`` counts the members whose model diverged."""
    groups: dict = defaultdict(list)
    for row in table:
        groups[tuple(_hashable(row.get(k)) for k in by)].append(row)
    result = []
    values = list(values)
    for key, members in groups.items():
        entry = dict(zip(by, key))
        entry["n"] = len(members)
        entry["diverged"] = sum(1 for m in members if m.get("diverged"))
        for value in values:
            present = [m.get(value) for m in members if m.get(value) is not None]
            mean, half, n = mean_ci(present) if len(present) == len(members) else (math.nan, math.nan, len(present))
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


def one_per_run(table: Sequence[dict]) -> list[dict]:
    """One row of each run (for what a run has once: its baselines and diagnostics)."""
    return list({row["source"]: row for row in table}.values())


def select(table: Sequence[dict], **conditions) -> list[dict]:
    return [r for r in table if all(r.get(k) == v for k, v in conditions.items())]


def own_test(client: dict, key: str):
    """A client's own fine-tuned model's test ``key`` (accuracy, loss) on its own task."""
    return client.get("own", {}).get("test", {}).get(key)


def _mean(values):
    values = [v for v in values if v is not None]
    return sum(values) / len(values) if values else None


def _hashable(value):
    if isinstance(value, (list, dict)):
        return json.dumps(value, sort_keys=True)
    if isinstance(value, float) and math.isnan(value):
        return None
    return value
