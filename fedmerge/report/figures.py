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
from fedmerge.report.load import Collection, covered  # noqa: E402
from fedmerge.report.stats import mean_ci  # noqa: E402

plt.rcParams.update(
    {
        "figure.dpi": 110,
        "savefig.dpi": 110,
        "font.size": 11,
        "axes.titlesize": 12,
        "axes.labelsize": 11,
        "legend.fontsize": 9,
        "axes.grid": True,
        "grid.alpha": 0.3,
    }
)
STRATEGY_COLORS = {
    "fedavg": "#1f77b4",
    "fednova": "#ff7f0e",
    "fedgma": "#2ca02c",
    "median": "#d62728",
    "cclip": "#9467bd",
}
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
    fig, axes = plt.subplots(
        rows, columns, figsize=(max(width * columns, 7.0), height * rows + 0.6), squeeze=False, layout="constrained"
    )
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
        fig.legend(
            entries.values(),
            entries.keys(),
            loc="outside lower center",
            ncol=max(1, min(len(entries), int(fig.get_figwidth() // 2.2))),
        )


def _groups(collection: Collection) -> dict[str, list]:
    return {group.label: group.runs for group in collection.groups}


def seeds_note(counts: Sequence[int]) -> str:
    """What a figure's points and intervals are, from the number of seeds of each setting it shows."""
    counts = sorted(set(counts))
    if not counts or counts[-1] < 2:
        return "one seed per setting: no intervals"
    many = f"{counts[0]}–{counts[-1]}" if len(counts) > 1 else str(counts[0])
    return f"means over {many} seeds; intervals: 95% CI over seeds" + (", none with one seed" if counts[0] < 2 else "")


def seed_counts(table: Sequence[dict]) -> list[int]:
    """The number of seeds of each setting in ``table``."""
    return [
        len(records.varying(records.select(table, group=group), "seed")) for group in records.varying(table, "group")
    ]


def _shown(total: int) -> str:
    return f"; first {MAX_PANELS} of {total} settings" if total > MAX_PANELS else ""


def references(table: Sequence[dict], metric: str) -> dict[str, float]:
    """θ0's and the clients' own models' ``metric`` (means over the seeds of ``table``'s runs), where it applies."""
    stats = records.aggregate(records.one_per_run(table), (), [f"{prefix}_{metric}" for prefix in records.BASELINES])
    return {
        name: stats[0][f"{prefix}_{metric}"]
        for prefix, name in records.BASELINES.items()
        if stats and not math.isnan(stats[0][f"{prefix}_{metric}"])
    }


REFERENCE_STYLE = {
    records.BASELINES["theta0"]: dict(color="#555555", ls=":"),
    records.BASELINES["own"]: dict(color="black", ls="-."),
}


def draw_references(ax, table: Sequence[dict], metric: str) -> None:
    """θ0 and the clients' own models as horizontal reference lines."""
    for name, value in references(table, metric).items():
        ax.axhline(value, lw=1.2, label=name, **REFERENCE_STYLE[name])


# -- per round --------------------------------------------------------------------------------------
def per_round(collection: Collection, metric: str | None = None) -> Figure | None:
    """The metric per round of every multi-round run, one line per strategy; one-shot results dashed; θ0 and the
    clients' own models as reference lines. A round's point needs every seed's value (none for a diverged seed)."""
    metric = metric or records.primary_metric(collection.runs[0])
    table = records.rows(collection)
    with_rounds = {
        group: runs
        for group, runs in _groups(collection).items()
        if any(entry["rounds"] > 1 for run in runs for entry in run.data["runs"])
    }
    if not with_rounds:
        return None
    fig, axes = _panels(len(with_rounds))
    for ax, (group, runs) in zip(axes, with_rounds.items()):
        curves: dict = defaultdict(lambda: defaultdict(list))
        for run in runs:
            for entry in run.data["runs"]:
                for point in entry["history"] if entry["rounds"] > 1 else []:
                    curves[(entry["strategy"], entry["rounds"])][point["round"]].append(point.get(metric))
        for index, ((strategy, rounds), points) in enumerate(sorted(curves.items())):
            xs = [x for x in sorted(points) if len(points[x]) == len(runs) and None not in points[x]]
            stats = [mean_ci(points[x]) for x in xs]
            means = np.array([s[0] for s in stats])
            halves = np.nan_to_num(np.array([s[1] for s in stats]))
            ax.plot(xs, means, marker="o", ms=3, color=color(strategy, index), label=f"{strategy}, {rounds} rounds")
            if halves.any():
                ax.fill_between(xs, means - halves, means + halves, color=color(strategy, index), alpha=0.15)
        one_shot = records.aggregate(records.select(table, group=group, rounds=1), ("strategy",), [metric])
        for index, stat in enumerate(one_shot):
            if not math.isnan(stat[metric]):
                ax.axhline(
                    stat[metric],
                    ls="--",
                    lw=1.2,
                    color=color(stat["strategy"], index),
                    label=f"{stat['strategy']}, one-shot",
                )
        draw_references(ax, records.select(table, group=group), metric)
        ax.set_title(group, fontsize=11)
        ax.set_xlabel("round (0 = pretrained θ0)")
        ax.xaxis.set_major_locator(matplotlib.ticker.MaxNLocator(integer=True))
        ax.set_ylabel(metric_label(metric))
        if metric == "distance_to_optimum":
            ax.set_yscale("log")
    legend(fig, axes)
    note = seeds_note([len(runs) for runs in with_rounds.values()])
    fig.suptitle(f"{records.METRICS.get(metric, metric).capitalize()} per round\n({note}{_shown(len(with_rounds))})")
    return Figure(
        "per-round.png",
        f"{metric_label(metric).capitalize()} after each round of federated learning; dashed "
        "lines: one-shot merging of the same clients; dotted: θ0; dash-dotted: the clients' own models; "
        f"{note}.",
        fig,
    )


# -- one-shot vs multi-round ------------------------------------------------------------------------
def one_shot_vs_multi_round(table: Sequence[dict], metric: str) -> Figure | None:
    """Final metric of each strategy, one bar per round count (same local compute when same_compute); θ0 and the
    clients' own models as reference lines. A strategy with a diverged seed has no bar."""
    if len(records.varying(table, "rounds")) < 2:
        return None
    groups = records.varying(table, "group")
    fig, axes = _panels(len(groups), width=5.6)
    rounds = sorted(records.varying(table, "rounds"))
    for ax, group in zip(axes, groups):
        here = records.select(table, group=group)
        stats = records.aggregate(here, ("strategy", "rounds"), [metric])
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
            ax.bar(
                xs,
                ys,
                width=width * 0.95,
                yerr=errs if any(errs) else None,
                capsize=3,
                label=label,
                color=plt.cm.Blues(0.35 + 0.6 * k / max(1, len(rounds) - 1)),
            )
        draw_references(ax, here, metric)
        ax.set_xticks(range(len(strategies)), strategies)
        ax.set_ylabel(metric_label(metric))
        ax.set_title(group, fontsize=11)
        ax.set_ylim(bottom=0)
    legend(fig, axes)
    note = seeds_note(seed_counts(table))
    fig.suptitle(f"One-shot merging vs multi-round FL at the same local compute\n({note}{_shown(len(groups))})")
    return Figure(
        "one-shot-vs-multi-round.png",
        "Final test metric of each strategy: one round (merging) against R rounds "
        "with each client's local steps split over the rounds; dotted: θ0; dash-dotted: the clients' own models; "
        f"{note}.",
        fig,
    )


# -- against a factor -------------------------------------------------------------------------------
def context(row: dict, exclude: Sequence[str] = (), axis: str | None = None) -> str:
    """What else sets a row's setting apart, besides the spec keys ``exclude`` (a factor's) or the sweep ``axis``:
    the other sweep levels when ``axis`` is given, else the other differing spec keys."""
    if axis is not None:
        return ", ".join(f"{a}={label}" for a, label in row.get("group_levels", {}).items() if a != axis)
    return ", ".join(f"{k}={v}" for k, v in row.get("differs", {}).items() if not covered(k, exclude))


def _panels_by_context(table: Sequence[dict], key: str, exclude: Sequence[str] = (), axis: str | None = None) -> dict:
    """Rows split into panels by :func:`context`; only panels where ``key`` tells each setting apart (one setting
    per value: two settings at one x would be drawn as one) and takes at least two values."""
    panels: dict = defaultdict(list)
    for row in table:
        if row.get(key) is not None:
            panels[context(row, exclude, axis)].append(row)
    drawn = {}
    for name, rows in panels.items():
        settings = {(row["group"], row[key]) for row in rows}
        values = {value for _, value in settings}
        if len(values) >= 2 and len(values) == len({group for group, _ in settings}):
            drawn[name] = rows
    return drawn


def _series(ax, rows: Sequence[dict], key: str, metric: str, position=lambda v: v) -> None:
    """One line per (strategy, rounds) of ``metric`` against ``key`` (means over seeds), and θ0's and the clients'
    own models' lines; error bars only where a setting has two seeds or more."""
    stats = records.aggregate(rows, ("group", "strategy", "rounds", key), [metric])
    series = sorted({(s["strategy"], s["rounds"]) for s in stats}, key=lambda k: (k[1], k[0]))
    many_rounds = len({r for _, r in series}) > 1
    for index, (strategy, rounds) in enumerate(series):
        points = sorted(
            (position(s[key]), s[metric], s[f"{metric}_ci"])
            for s in stats
            if s["strategy"] == strategy and s["rounds"] == rounds and not math.isnan(s[metric])
        )
        if not points:
            continue
        xs, ys, errs = zip(*points)
        tag = f"{strategy}, one-shot" if rounds == 1 else f"{strategy}, {rounds} rounds"
        ax.errorbar(
            xs,
            ys,
            yerr=np.nan_to_num(errs),
            marker="o" if rounds == 1 else "s",
            ms=5,
            capsize=3,
            ls="--" if many_rounds and rounds > 1 else "-",
            color=color(strategy, index),
            label=tag,
        )
    by_x = defaultdict(list)
    for row in rows:
        by_x[position(row[key])].append(row)
    for name in records.BASELINES.values():
        points = {x: references(here, metric).get(name) for x, here in by_x.items()}
        if None not in points.values():
            ax.plot(*zip(*sorted(points.items())), lw=1.2, label=name, **REFERENCE_STYLE[name])


def _context_figure(table, key, metric, exclude=(), axis=None):
    """Panels of :func:`_series` per context; (figure, axes, panels, seed counts) or None when none is drawn."""
    panels = _panels_by_context(table, key, exclude, axis)
    if not panels:
        return None
    fig, axes = _panels(len(panels), width=6.0, height=4.6)
    return fig, axes, panels, seed_counts(table)


def against(
    table: Sequence[dict],
    factor: str,
    metric: str,
    label: str | None = None,
    log: bool | None = None,
    name: str | None = None,
) -> Figure | None:
    """The metric against a numeric factor (α, spreads, f, or a sweep axis), one line per (strategy, rounds), one panel
    per combination of the other settings (nothing is averaged across them); None when no panel has two values."""
    table = [row for row in table if isinstance(row.get(factor), (int, float))]
    made = _context_figure(table, factor, metric, exclude=records.FACTOR_KEYS.get(factor, (factor,)))
    if made is None:
        return None
    fig, axes, panels, counts = made
    default_label, default_log = records.FACTORS.get(factor, (factor, False))
    label, log = label or default_label, default_log if log is None else log
    for ax, (where, rows) in zip(axes, panels.items()):
        _series(ax, rows, factor, metric)
        if log:
            ax.set_xscale("log")
        ax.set_xlabel(label)
        ax.set_ylabel(metric_label(metric))
        ax.set_title(where, fontsize=10)
    legend(fig, axes)
    note = seeds_note(counts)
    title = f"{records.METRICS.get(metric, metric).capitalize()} against {label.split(' (')[0]}"
    fig.suptitle(f"{title}\n({note}{_shown(len(panels))})")
    return Figure(
        name or f"{metric.replace('mean_', '').replace('_', '-')}-vs-{factor.replace('_', '-')}.png",
        f"{metric_label(metric).capitalize()} against {label}; dotted: θ0; dash-dotted: the clients' own models; "
        f"{note}.",
        fig,
    )


def against_levels(table: Sequence[dict], axis: str, labels: Sequence[str], metric: str) -> Figure | None:
    """The metric against a categorical sweep axis (its labels in the sweep's order), one panel per combination of
    the other axes' levels."""
    key = f"level:{axis}"
    table = [row for row in table if row.get(key) in labels]
    made = _context_figure(table, key, metric, axis=axis)
    if made is None:
        return None
    fig, axes, panels, counts = made
    for ax, (where, rows) in zip(axes, panels.items()):
        present = [label for label in labels if label in records.varying(rows, key)]
        _series(ax, rows, key, metric, position=present.index)
        ax.set_xticks(range(len(present)), present)
        ax.set_xlabel(axis)
        ax.set_ylabel(metric_label(metric))
        ax.set_title(where, fontsize=10)
    legend(fig, axes)
    note = seeds_note(counts)
    fig.suptitle(f"{records.METRICS.get(metric, metric).capitalize()} against {axis}\n({note}{_shown(len(panels))})")
    safe = "".join(c if c.isalnum() else "-" for c in axis)
    return Figure(
        f"{metric.replace('mean_', '').replace('_', '-')}-vs-{safe}.png",
        f"{metric_label(metric).capitalize()} for each level of the sweep axis '{axis}'; dotted: θ0; "
        f"dash-dotted: the clients' own models; {note}.",
        fig,
    )


# -- diagnostics ------------------------------------------------------------------------------------
def _cosines(runs) -> tuple[np.ndarray, list[int], int] | None:
    """The mean over seeds of the runs' cosine matrices that cover the same clients (the first run's diagnostics
    sample, or every client), those clients' ids, and the number of seeds averaged."""
    entries = [
        (np.array(d["cosine_similarity"]), d.get("sample"))
        for d in (r.data.get("diagnostics", {}) for r in runs)
        if len(d.get("cosine_similarity") or []) > 1
    ]
    if not entries:
        return None
    first, ids = entries[0]
    same = [m for m, sample in entries if m.shape == first.shape and sample == ids]
    return np.mean(same, axis=0), ids or list(range(len(first))), len(same)


def cosine_heatmap(collection: Collection) -> Figure | None:
    """Pairwise cosine similarity of the clients' task vectors (mean over the seeds that sampled the same clients),
    one panel per setting; each client labelled up to :data:`~fedmerge.report.records.DETAIL_LIMIT` of them."""
    groups = {g: (runs[0], cosines) for g, runs in _groups(collection).items() if (cosines := _cosines(runs))}
    if not groups:
        return None
    fig, axes = _panels(len(groups), width=4.6, height=4.2)
    image = None
    for ax, (group, (run, (matrix, ids, _))) in zip(axes, groups.items()):
        image = ax.imshow(matrix, vmin=-1, vmax=1, cmap="RdBu_r")
        n = len(matrix)
        names = [str(t).split(":")[-1] for t in run.data["suite"].get("tasks", [])]
        if n <= records.DETAIL_LIMIT:
            ax.set_xticks(range(n), [str(i) for i in ids])
            ax.set_yticks(range(n), [f"{i}: {names[i]}" if i < len(names) else str(i) for i in ids], fontsize=8)
        else:
            ticks = np.unique(np.linspace(0, n - 1, 6).round().astype(int))
            ax.set_xticks(ticks, [str(ids[i]) for i in ticks])
            ax.set_yticks(ticks, [str(ids[i]) for i in ticks])
        ax.set_xlabel("client" + (f" ({n} sampled)" if ids != list(range(n)) else ""))
        ax.grid(False)
        if n <= 10:
            for i in range(n):
                for j in range(n):
                    ax.text(
                        j,
                        i,
                        f"{matrix[i, j]:.2f}",
                        ha="center",
                        va="center",
                        fontsize=8,
                        color="white" if abs(matrix[i, j]) > 0.6 else "black",
                    )
        ax.set_title(group, fontsize=11)
    fig.colorbar(image, ax=axes, shrink=0.8, label="cosine similarity cos(τ_s, τ_t)")
    counts = sorted({seeds for _, (_, _, seeds) in groups.values()})
    seeds = f"mean over {counts[0]}{f'–{counts[-1]}' if len(counts) > 1 else ''} seed(s)"
    fig.suptitle(f"Task-vector cosine similarities\n({seeds}{_shown(len(groups))})")
    return Figure(
        "cosine-similarity.png",
        "Cosine similarity between the clients' task vectors τ_t = θ_t − θ0 of the "
        "one-shot round, on the merged tensors (1 on the diagonal; near 0: nearly orthogonal updates); "
        f"{seeds} that covered the same clients (a run of many clients samples them: `diagnostics_clients`).",
        fig,
    )


def effective_weights(collection: Collection) -> Figure | None:
    """p_t (the weights averaging uses) against w_t = p_t a_t / Σ p_s a_s (what plain averaging optimises), in the
    round :func:`~fedmerge.report.records.first_round` defines (the diagnostics table's χ²), for each setting's
    first seed."""
    groups = {}
    for group in collection.groups:
        run = min(group.runs, key=lambda r: r.seed)
        aggregation = records.first_round(run.data)[1]
        if aggregation:
            groups[group.label] = (run, aggregation)
    if not groups:
        return None
    fig, axes = _panels(len(groups), width=4.8, height=3.8)
    for ax, (group, (run, aggregation)) in zip(axes, groups.items()):
        p, w = aggregation["weights"], aggregation["effective_weights"]
        ids = aggregation.get("client_ids") or list(range(len(p)))
        if len(p) <= records.DETAIL_LIMIT:
            xs = np.arange(len(p))
            ax.bar(xs - 0.2, p, width=0.4, label="p_t (averaging weight)", color="#9ecae1")
            ax.bar(xs + 0.2, w, width=0.4, label="w_t (effective weight)", color="#e6550d")
            ax.set_xticks(xs, [str(i) for i in ids])
            ax.set_xlabel("client")
            ax.set_ylabel("weight (sums to 1)")
        else:
            ax.scatter(p, w, s=6, alpha=0.5, color="#e6550d", label=f"a client ({len(p)})")
            ends = [min(min(p), min(w)), max(max(p), max(w))]
            ax.plot(ends, ends, color="#555555", ls=":", lw=1.2, label="w_t = p_t")
            ax.set_xlabel("p_t (averaging weight)")
            ax.set_ylabel("w_t (effective weight)")
        ax.set_title(
            f"{group}\nseed {run.seed}: χ²(p‖w) = {aggregation.get('chi_square'):.3g}\n"
            f"({records.first_round_source(run.data)})",
            fontsize=9,
        )
    legend(fig, axes)
    fig.suptitle(f"Effective weights of plain averaging in the first round (first seed){_shown(len(groups))}")
    return Figure(
        "effective-weights.png",
        "Averaging weights p_t against the effective weights w_t = p_t a_t / Σ p_s a_s "
        "(a_t: a client's local steps, or the sum of its learning rates) in the first round of the strategy named "
        "under each panel, for the setting's first seed (bars per client; above "
        f"{records.DETAIL_LIMIT} clients, one dot per client against the line w_t = p_t). Plain averaging minimises Σ w_t L_t, not Σ p_t L_t; "
        "χ²(p‖w) measures the mismatch (0 when all a_t are equal); the diagnostics table gives its mean over "
        "seeds.",
        fig,
    )
