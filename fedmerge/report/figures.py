"""Figures for people: titled, with units, legends and readable sizes (matplotlib, Agg backend, PNG).

Figures use constrained layout, so panels, tick labels and colour bars never overlap; legends sit outside the
axes (:func:`legend`), where they hide no data; bar charts start at 0.

Each function takes the loaded runs (or their flat rows) and returns a :class:`Figure` (a matplotlib figure
plus a file name and caption), or ``None`` when the data have nothing to show for it.
"""

from __future__ import annotations

import math
from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import matplotlib.ticker  # noqa: E402
import numpy as np  # noqa: E402

from fedmerge.report import records  # noqa: E402
from fedmerge.report.load import Collection  # noqa: E402
from fedmerge.report.stats import mean_ci  # noqa: E402

plt.rcParams.update({
    "figure.dpi": 110, "savefig.dpi": 110, "font.size": 11, "axes.titlesize": 12, "axes.labelsize": 11,
    "legend.fontsize": 9, "axes.grid": True, "grid.alpha": 0.3,
})
STRATEGY_COLORS = {"fedavg": "#1f77b4", "fednova": "#ff7f0e", "fedgma": "#2ca02c", "median": "#d62728", "cclip": "#9467bd"}
MAX_PANELS = 6


@dataclass
class Figure:
    name: str
    caption: str
    figure: "plt.Figure"

    def save(self, path) -> None:
        self.figure.savefig(path, bbox_inches="tight")
        plt.close(self.figure)


def color(strategy: str, index: int = 0) -> str:
    return STRATEGY_COLORS.get(strategy, plt.rcParams["axes.prop_cycle"].by_key()["color"][index % 10])


def metric_label(metric: str) -> str:
    label = records.METRICS.get(metric, metric)
    if metric == "mean_normalized_accuracy":
        return "normalized accuracy (mean over tasks)"
    if metric == "mean_accuracy":
        return "test accuracy (mean over tasks)"
    return label


def _panels(count: int, width: float = 5.2, height: float = 4.0):
    count = min(count, MAX_PANELS)
    columns = min(count, 3)
    rows = math.ceil(count / columns)
    fig, axes = plt.subplots(rows, columns, figsize=(max(width * columns, 7.0), height * rows + 0.6), squeeze=False,
                             layout="constrained")
    flat = list(axes.flat)
    for ax in flat[count:]:
        ax.set_visible(False)
    return fig, flat[:count]


def legend(fig: "plt.Figure", axes: Sequence) -> None:
    """One legend for all panels, below them, so it hides no data (the figure needs constrained layout)."""
    entries: dict = {}
    for ax in axes:
        for handle, label in zip(*ax.get_legend_handles_labels()):
            entries.setdefault(label, handle)
    if entries:
        fig.legend(entries.values(), entries.keys(), loc="outside lower center",
                   ncol=max(1, min(len(entries), int(fig.get_figwidth() // 2.2))))


def _groups(collection: Collection) -> dict[str, list]:
    groups: dict[str, list] = defaultdict(list)
    for run in collection.runs:
        groups[records.group_label(run, collection)].append(run)
    return groups


def _suffix(collection: Collection, shown: int, total: int) -> str:
    seeds = {run.seed for run in collection.runs}
    text = f" (mean over {len(seeds)} seeds, 95% CI)" if len(seeds) > 1 else ""
    if shown < total:
        text += f"; first {shown} of {total} settings"
    return text


def _suffix_rows(table: Sequence[dict], shown: int, total: int) -> str:
    seeds = records.varying(table, "seed")
    text = f"\n(mean over {len(seeds)} seeds, 95% CI)" if len(seeds) > 1 else ""
    return text + (f"; first {shown} of {total} settings" if shown < total else "")


# -- per round --------------------------------------------------------------------------------------
def per_round(collection: Collection, metric: str | None = None) -> Figure | None:
    """The metric per round of every multi-round run, one line per strategy; one-shot results dashed."""
    groups = _groups(collection)
    metric = metric or records.primary_metric(collection.runs[0])
    with_rounds = {g: runs for g, runs in groups.items() if any(r["rounds"] > 1 for run in runs for r in run.data["runs"])}
    if not with_rounds:
        return None
    fig, axes = _panels(len(with_rounds))
    for ax, (group, runs) in zip(axes, with_rounds.items()):
        curves: dict = defaultdict(lambda: defaultdict(list))
        one_shot: dict = defaultdict(list)
        for run in runs:
            for entry in run.data["runs"]:
                if entry["rounds"] == 1:
                    one_shot[entry["strategy"]].append(entry["final"].get(metric))
                    continue
                for point in entry["history"]:
                    if point.get(metric) is not None:
                        curves[(entry["strategy"], entry["rounds"])][point["round"]].append(point[metric])
        for index, ((strategy, rounds), points) in enumerate(sorted(curves.items())):
            xs = sorted(points)
            stats = [mean_ci(points[x]) for x in xs]
            means = np.array([s[0] for s in stats])
            halves = np.nan_to_num(np.array([s[1] for s in stats]))
            ax.plot(xs, means, marker="o", ms=3, color=color(strategy, index), label=f"{strategy}, {rounds} rounds")
            ax.fill_between(xs, means - halves, means + halves, color=color(strategy, index), alpha=0.15)
        for index, (strategy, values) in enumerate(one_shot.items()):
            mean = mean_ci(values)[0]
            if not math.isnan(mean):
                ax.axhline(mean, ls="--", lw=1.2, color=color(strategy, index), label=f"{strategy}, one-shot")
        ax.set_title(group, fontsize=11)
        ax.set_xlabel("round (0 = pretrained θ0)")
        ax.xaxis.set_major_locator(matplotlib.ticker.MaxNLocator(integer=True))
        ax.set_ylabel(metric_label(metric))
        if metric == "distance_to_optimum":
            ax.set_yscale("log")
    legend(fig, axes)
    fig.suptitle(f"{records.METRICS.get(metric, metric).capitalize()} per round{_suffix(collection, len(axes), len(with_rounds))}")
    return Figure("per-round.png", f"{metric_label(metric).capitalize()} after each round of federated learning; dashed "
                  "lines: one-shot merging (λ chosen on validation) of the same clients.", fig)


# -- one-shot vs multi-round ------------------------------------------------------------------------
def one_shot_vs_multi_round(table: Sequence[dict], metric: str) -> Figure | None:
    """Final metric of each strategy, one bar per round count (same local compute when same_compute)."""
    if len(records.varying(table, "rounds")) < 2:
        return None
    groups = records.varying(table, "group")
    fig, axes = _panels(len(groups), width=5.6)
    rounds = sorted(records.varying(table, "rounds"))
    for ax, group in zip(axes, groups):
        stats = records.aggregate(records.select(table, group=group), ("strategy", "rounds"), [metric])
        strategies = records.varying(stats, "strategy")
        width = 0.8 / len(rounds)
        for k, r in enumerate(rounds):
            xs, ys, errs = [], [], []
            for i, strategy in enumerate(strategies):
                match = [s for s in stats if s["strategy"] == strategy and s["rounds"] == r]
                if match:
                    xs.append(i + (k - (len(rounds) - 1) / 2) * width)
                    ys.append(match[0][metric])
                    errs.append(np.nan_to_num(match[0][f"{metric}_ci"]))
            label = "one-shot (1 round)" if r == 1 else f"{r} rounds"
            ax.bar(xs, ys, width=width * 0.95, yerr=errs if any(errs) else None, capsize=3, label=label, color=plt.cm.Blues(0.35 + 0.6 * k / max(1, len(rounds) - 1)))
        ax.set_xticks(range(len(strategies)), strategies)
        ax.set_ylabel(metric_label(metric))
        ax.set_title(group, fontsize=11)
        ax.set_ylim(bottom=0)
    legend(fig, axes)
    fig.suptitle("One-shot merging vs multi-round FL at the same local compute" + _suffix_rows(table, len(axes), len(groups)))
    return Figure("one-shot-vs-multi-round.png", "Final test metric of each strategy: one round (merging) against R rounds "
                  "with each client's local steps split over the rounds. Error bars: 95% CI over seeds.", fig)


# -- against a factor -------------------------------------------------------------------------------
def against(table: Sequence[dict], factor: str, metric: str, label: str | None = None, log: bool | None = None,
            name: str | None = None) -> Figure | None:
    """The metric against a numeric factor (α, spreads, f, or a sweep axis), one line per (strategy, rounds)."""
    values = [v for v in records.varying(table, factor) if isinstance(v, (int, float))]
    if len(values) < 2:
        return None
    default_label, default_log = records.FACTORS.get(factor, (factor, False))
    label, log = label or default_label, default_log if log is None else log
    stats = records.aggregate(table, ("strategy", "rounds", factor), [metric])
    fig, ax = plt.subplots(figsize=(7.5, 5.2), layout="constrained")
    series = sorted({(s["strategy"], s["rounds"]) for s in stats}, key=lambda k: (k[1], k[0]))
    many_rounds = len({r for _, r in series}) > 1
    for index, (strategy, rounds) in enumerate(series):
        points = sorted((s[factor], s[metric], s[f"{metric}_ci"]) for s in stats
                        if s["strategy"] == strategy and s["rounds"] == rounds and s[factor] is not None)
        xs, ys, errs = zip(*points)
        style = "-" if rounds == 1 else "--"
        tag = f"{strategy}, one-shot" if rounds == 1 else f"{strategy}, {rounds} rounds"
        ax.errorbar(xs, ys, yerr=np.nan_to_num(errs), marker="o" if rounds == 1 else "s", ms=5, capsize=3,
                    ls=style if many_rounds else "-", color=color(strategy, index), label=tag)
    if log:
        ax.set_xscale("log")
    ax.set_xlabel(label)
    ax.set_ylabel(metric_label(metric))
    ax.set_title(f"{records.METRICS.get(metric, metric).capitalize()} against {label.split(' (')[0]}")
    legend(fig, [ax])
    return Figure(name or f"{metric.replace('mean_', '').replace('_', '-')}-vs-{factor.replace('_', '-')}.png",
                  f"{metric_label(metric).capitalize()} against {label}; error bars: 95% CI over seeds.", fig)


def against_levels(table: Sequence[dict], axis: str, labels: Sequence[str], metric: str) -> Figure | None:
    """The metric against a categorical sweep axis (its labels in the sweep's order)."""
    key = f"level:{axis}"
    present = [label for label in labels if label in records.varying(table, key)]
    if len(present) < 2:
        return None
    stats = records.aggregate(table, ("strategy", "rounds", key), [metric])
    fig, ax = plt.subplots(figsize=(7.5, 5.2), layout="constrained")
    series = sorted({(s["strategy"], s["rounds"]) for s in stats}, key=lambda k: (k[1], k[0]))
    for index, (strategy, rounds) in enumerate(series):
        pts = {s[key]: s for s in stats if s["strategy"] == strategy and s["rounds"] == rounds}
        xs = [i for i, label in enumerate(present) if label in pts]
        ys = [pts[present[i]][metric] for i in xs]
        errs = [np.nan_to_num(pts[present[i]][f"{metric}_ci"]) for i in xs]
        tag = f"{strategy}, one-shot" if rounds == 1 else f"{strategy}, {rounds} rounds"
        ax.errorbar(xs, ys, yerr=errs, marker="o" if rounds == 1 else "s", capsize=3, ls="-" if rounds == 1 else "--",
                    color=color(strategy, index), label=tag)
    ax.set_xticks(range(len(present)), present)
    ax.set_xlabel(axis)
    ax.set_ylabel(metric_label(metric))
    ax.set_title(f"{records.METRICS.get(metric, metric).capitalize()} against {axis}")
    legend(fig, [ax])
    safe = "".join(c if c.isalnum() else "-" for c in axis)
    return Figure(f"{metric.replace('mean_', '').replace('_', '-')}-vs-{safe}.png",
                  f"{metric_label(metric).capitalize()} for each level of the sweep axis '{axis}'.", fig)


# -- diagnostics ------------------------------------------------------------------------------------
def cosine_heatmap(collection: Collection) -> Figure | None:
    """Pairwise cosine similarity of the clients' task vectors (mean over seeds), one panel per setting."""
    groups = {g: runs for g, runs in _groups(collection).items()
              if any(len(r.data.get("diagnostics", {}).get("cosine_similarity") or []) > 1 for r in runs)}
    if not groups:
        return None
    fig, axes = _panels(len(groups), width=4.6, height=4.2)
    image = None
    for ax, (group, runs) in zip(axes, groups.items()):
        matrices = [np.array(r.data["diagnostics"]["cosine_similarity"]) for r in runs
                    if r.data.get("diagnostics", {}).get("cosine_similarity")]
        matrix = np.mean([m for m in matrices if m.shape == matrices[0].shape], axis=0)
        image = ax.imshow(matrix, vmin=-1, vmax=1, cmap="RdBu_r")
        n = len(matrix)
        names = [str(t).split(":")[-1] for t in runs[0].data["suite"].get("tasks", [])][:n] or [str(i) for i in range(n)]
        ax.set_xticks(range(n), [f"{i}" for i in range(n)])
        ax.set_yticks(range(n), [f"{i}: {names[i]}" if i < len(names) else str(i) for i in range(n)], fontsize=8)
        ax.set_xlabel("client")
        ax.grid(False)
        if n <= 10:
            for i in range(n):
                for j in range(n):
                    ax.text(j, i, f"{matrix[i, j]:.2f}", ha="center", va="center", fontsize=8,
                            color="white" if abs(matrix[i, j]) > 0.6 else "black")
        ax.set_title(group, fontsize=11)
    fig.colorbar(image, ax=axes, shrink=0.8, label="cosine similarity cos(τ_s, τ_t)")
    fig.suptitle(f"Task-vector cosine similarities{_suffix(collection, len(axes), len(groups))}")
    return Figure("cosine-similarity.png", "Cosine similarity between the clients' task vectors τ_t = θ_t − θ0 of the "
                  "one-shot round (1 on the diagonal; near 0: nearly orthogonal updates).", fig)


def effective_weights(collection: Collection) -> Figure | None:
    """p_t (the weights averaging uses) against w_t = p_t a_t / Σ p_s a_s (what plain averaging optimises)."""
    groups = {}
    for group, runs in _groups(collection).items():
        for run in runs:
            for entry in run.data["runs"]:
                aggregation = records.first_aggregation(entry)
                if aggregation.get("effective_weights"):
                    groups[group] = (aggregation, entry["strategy"])
                    break
            if group in groups:
                break
    if not groups:
        return None
    fig, axes = _panels(len(groups), width=4.8, height=3.8)
    for ax, (group, (aggregation, strategy)) in zip(axes, groups.items()):
        p, w = aggregation["weights"], aggregation["effective_weights"]
        ids = aggregation.get("client_ids") or list(range(len(p)))
        xs = np.arange(len(p))
        ax.bar(xs - 0.2, p, width=0.4, label="p_t (averaging weight)", color="#9ecae1")
        ax.bar(xs + 0.2, w, width=0.4, label="w_t (effective weight)", color="#e6550d")
        ax.set_xticks(xs, [str(i) for i in ids])
        ax.set_xlabel("client")
        ax.set_ylabel("weight (sums to 1)")
        chi = aggregation.get("chi_square")
        ax.set_title(f"{group}\nχ²(p‖w) = {chi:.3g}, a_t = {aggregation.get('effective_steps_key')}" if chi is not None else group, fontsize=10)
    legend(fig, axes)
    fig.suptitle("Effective weights of plain averaging (first round, first seed)")
    return Figure("effective-weights.png", "Averaging weights p_t against the effective weights w_t = p_t a_t / Σ p_s a_s "
                  "(a_t: a client's local steps, or the sum of its learning rates). Plain averaging minimises Σ w_t L_t, "
                  "not Σ p_t L_t; χ²(p‖w) measures the mismatch (0 when all a_t are equal).", fig)
