"""The paper's claims 1–6 on the study sweeps' results (and claim 1's exactness check), and the suites they run on.

Each claim is decided from paired per-seed differences by the rules of :mod:`fedmerge.report.verdicts`; every
sentence that states a direction is generated from a decision.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np

from fedmerge.errors import FedmergeError
from fedmerge.report import figures, records
from fedmerge.report.claim import (
    CHECK,
    CI,
    Claim,
    Decision,
    axis_labels,
    bound,
    bound_text,
    by_seed,
    describe_sets,
    evaluation_set,
    family_note,
    family_table,
    fmt,
    mean_over,
    rename,
    task_values,
)
from fedmerge.report.document import Table, _md_table
from fedmerge.report.load import Collection
from fedmerge.report.stats import differences, format_paired, mean_ci, paired, seed_differences
from fedmerge.report.verdicts import BETTER, WORSE, Part, classify, somewhere

METRICS = {
    "mean_normalized_accuracy": "normalized accuracy (the merged model's accuracy on task t ÷ client t's own "
    "fine-tune's, averaged over the tasks)",
    "mean_accuracy": "accuracy (raw, averaged over the clients)",
}
REMEDIES = ("fednova", "fedgma", "median", "cclip")


def computed_on(
    entry: dict, metric: str, seeds: int, selection: str = "λ (and ρ) chosen on the validation split"
) -> str:
    """Which split, how many examples and which metric a claim's numbers are, from the recorded evaluation sets."""
    return (
        f"*Computed on:* the test split, {describe_sets(entry)}; metric: {METRICS[metric]}; {selection} "
        f"({describe_sets(entry, 'val')}); {seeds} seeds, compared paired by seed."
    )


# -- claim 1 ----------------------------------------------------------------------------------------------
EXACTNESS_RULE = (
    "exact if max |TA − FedAvg(β = λT)| ≤ 1e-5 · (1 + max |θ|) in float32 and ≤ 1e-12 · (1 + max |θ|) in "
    "float64, for every T and λ tried, through both the merging core and the Flower strategy"
)


def claim_task_arithmetic_is_fedavg(exactness: dict) -> Claim:
    claim = Claim(
        1,
        "Task Arithmetic with λ is one round of FedAvg with β = λT",
        "θ0 + λ Σ_t τ_t equals θ0 + β · (1/T) Σ_t τ_t with β = λ·T, exactly up to floating-point rounding.",
        role=CHECK,
        rule=EXACTNESS_RULE,
    )
    cases = exactness["cases"]
    ok = bool(cases) and all(max(c["core_error"], c["strategy_error"]) <= c["tolerance"] for c in cases)
    claim.verdict = "exact" if ok else "not exact"
    worst = {
        d: max(max(c["core_error"], c["strategy_error"]) for c in cases if c["dtype"] == d)
        for d in dict.fromkeys(c["dtype"] for c in cases)
    }
    claim.summary = (
        "largest difference " + ", ".join(f"{v:.1e} ({d})" for d, v in worst.items()) + f" over {len(cases)} cases"
    )
    shown = [c for c in cases if c["scaling"] in (0.3, 2.0)]
    claim.body.append(
        _md_table(
            Table(
                ["dtype", "T", "λ", "β = λT", "max |Δ| merging core", "max |Δ| Flower strategy", "tolerance"],
                [
                    [
                        c["dtype"],
                        str(c["clients"]),
                        f"{c['scaling']:g}",
                        f"{c['server_lr']:g}",
                        f"{c['core_error']:.1e}",
                        f"{c['strategy_error']:.1e}",
                        f"{c['tolerance']:.0e}",
                    ]
                    for c in shown
                ],
            )
        )
    )
    scalings = ", ".join(f"{s:g}" for s in sorted({c["scaling"] for c in cases}))
    claim.body.append(
        f"(Shown: λ = 0.3 and 2; all {len(cases)} cases with λ ∈ {{{scalings}}} are within tolerance: "
        f"{'yes' if ok else 'no'}.) Model: {exactness.get('model', '')}. This is arithmetic, not statistics: "
        "no seeds are needed, and it is a check of the code, not a finding."
    )
    return claim


# -- the suites --------------------------------------------------------------------------------------------
def suite_section(collections: dict[str, Collection], evaluation: dict, fednova: dict[str, list[dict]]) -> list[str]:
    """The table of θ0 and the own fine-tunes on every setting, with what each is evaluated on."""
    rows = []
    for study, axis, name in (
        ("training-heterogeneity", "spread", "digits, spread {}"),
        ("data-heterogeneity", "suite_options.alpha", "mnist1d, Dirichlet α = {}"),
        ("robustness", "attack", "mnist1d iid, attack {}"),
    ):
        table = records.select(records.rows(collections[study]), strategy="fedavg", rounds=1)
        for level in axis_labels(collections[study], axis):
            here = records.select(table, **{f"level:{axis}": level})
            entry = evaluation_set(evaluation[study], **{axis: level})
            gains = _own_gains(collections[study], axis, level)
            rows.append(
                [
                    name.format(level),
                    describe_sets(entry),
                    fmt(mean_ci([r["pretrained_accuracy"] for r in here])),
                    fmt(mean_ci([r["own_accuracy"] for r in here])),
                    fmt(mean_ci([r["own_accuracy"] - r["pretrained_accuracy"] for r in here])),
                    f"{min(gains.values()):+.3f}" if gains else "–",
                    str(len(here)),
                ]
            )
    for study, cells in fednova.items():
        for recipe, group in _by_recipe(cells).items():
            sizes = group[0]["evaluation"]["test"]
            tasks = range(len(group[0]["own_accuracy"]))
            rows.append(
                [
                    f"{group[0]['suite']}, {study} recipe {recipe}",
                    f"{sizes[0]} test examples per task",
                    fmt(mean_ci([float(np.mean(c["theta0_accuracy"])) for c in group])),
                    fmt(mean_ci([float(np.mean(c["own_accuracy"])) for c in group])),
                    fmt(mean_ci([float(np.mean(c["own_accuracy"]) - np.mean(c["theta0_accuracy"])) for c in group])),
                    f"{min(np.mean([c['own_accuracy'][t] - c['theta0_accuracy'][t] for c in group]) for t in tasks):+.3f}",
                    str(len(group)),
                ]
            )
    return [
        "## The suites, and what every number is computed on",
        "",
        "Normalized accuracy divides a merged model's accuracy on task t by client t's own fine-tune's, so it is only "
        "meaningful where every fine-tune clearly beats θ0 on its own task: the last columns show by how much they do. "
        "The task suites (digits, mnist1d transform tasks) give each client its own task and its own private head, which "
        "no rule merges. The label-skew suites (mnist1d Dirichlet and iid) give every client the same task and one shared "
        "head; each client is scored on the suite's whole test split, so there normalized accuracy would divide by a "
        "client's own model's accuracy on labels it barely saw, and those claims read raw accuracy. Test accuracy, mean "
        f"over clients, ± a {CI} over seeds:",
        "",
        _md_table(
            Table(
                [
                    "setting",
                    "evaluated on",
                    "θ0 accuracy",
                    "own fine-tune accuracy",
                    "own − θ0",
                    "least-improved task: own − θ0",
                    "seeds",
                ],
                rows,
            )
        ),
        "",
    ]


def _own_gains(collection: Collection, axis: str, level: str) -> dict[str, float]:
    """task → its client's own test accuracy minus θ0's on it, mean over seeds."""
    values: dict = {}
    for run in collection.runs:
        if run.levels.get(axis) != level:
            continue
        theta0 = {t["task"]: t.get("accuracy") for t in run.data.get("pretrained", {}).get("tasks", [])}
        for client in run.data.get("clients", []):
            if theta0.get(client["task"]) is not None:
                values.setdefault(client["task"], []).append(client["own"]["test"]["accuracy"] - theta0[client["task"]])
    return {task: float(np.mean(v)) for task, v in values.items()}


def _by_recipe(cells: Sequence[dict]) -> dict[str, list[dict]]:
    out: dict = {}
    for cell in sorted(cells, key=lambda c: c["seed"]):
        out.setdefault(cell["recipe"], []).append(cell)
    return out


# -- claim 2 ----------------------------------------------------------------------------------------------
def fednova_normaliser(collection: Collection) -> str:
    """FedNova's a_t in these runs, as their aggregation records name it."""
    keys = {
        entry["history"][0].get("aggregation", {}).get("effective_steps_key")
        for run in collection.runs
        for entry in run.data["runs"]
        if entry["strategy"] == "fednova" and entry["history"]
    }
    return ", ".join(sorted(k for k in keys if k)) or "unknown"


def claim_training_heterogeneity(collection: Collection, evaluation: Sequence[dict]) -> Claim:
    claim = Claim(
        2,
        "Training heterogeneity lowers Task Arithmetic; FedNova recovers it",
        "Different learning rates and step counts lower the normalized accuracy of Task Arithmetic; FedNova recovers "
        "some or all of it.",
    )
    table = records.select(records.rows(collection), rounds=1)
    levels = _levels(collection, "spread")
    low, high = levels[0], levels[-1]
    strategies = records.varying(table, "strategy")
    a_t = fednova_normaliser(collection)
    ta = {level: by_seed(table, **{"level:spread": level, "strategy": "fedavg"}) for level in levels}
    nova = by_seed(table, **{"level:spread": high, "strategy": "fednova"})
    claim.decide(
        [
            Part(
                "Task Arithmetic is lower with the spread",
                f"TA({low}) − TA({high})",
                tuple(differences(ta[low], ta[high])),
                "greater",
            ),
            Part(
                f"FedNova (a_t = {a_t}) recovers some of it",
                f"FedNova({high}) − TA({high})",
                tuple(differences(nova, ta[high])),
                "greater",
            ),
        ]
    )
    claim.computed_on = computed_on(evaluation_set(evaluation, spread=high), "mean_normalized_accuracy", len(ta[high]))
    rows = [
        [
            level,
            fmt(
                mean_ci(
                    [r["chi_square"] for r in records.select(table, **{"level:spread": level, "strategy": "fednova"})]
                )
            ),
            *(
                fmt(mean_ci(list(by_seed(table, **{"level:spread": level, "strategy": s}).values())))
                for s in strategies
            ),
        ]
        for level in levels
    ]
    claim.body.append(
        f"Normalized accuracy of one-shot merging, mean ± {CI} over seeds; χ²(p‖w) of FedNova's weights "
        f"(a_t = {a_t}). Every remedy's paired difference to Task Arithmetic is in claim 4.\n\n"
        + _md_table(Table(["spread (lr and steps, max/min each)", "χ²(p‖w)", *strategies], rows))
    )
    tasks_ta = task_values(collection, "fedavg", spread=high)
    tasks_nova = task_values(collection, "fednova", spread=high)
    claim.body.append(
        f"Descriptive, per task at {high} (client 0 has the smallest learning rate and fewest steps, the last client the "
        f"largest): normalized accuracy, and FedNova − TA paired by seed (▲/▼: that task's 95% interval excludes zero, "
        "uncorrected; no verdict rests on it):\n\n"
        + _md_table(
            Table(
                ["task", "TA", f"FedNova ({a_t})", "FedNova − TA"],
                [
                    [
                        task,
                        fmt(mean_ci(list(tasks_ta[task].values()))),
                        fmt(mean_ci(list(tasks_nova.get(task, {}).values()))),
                        format_paired(paired(tasks_nova.get(task, {}), tasks_ta[task])),
                    ]
                    for task in tasks_ta
                ],
            )
        )
    )
    for row in table:
        row["spread_index"] = levels.index(row["level:spread"]) if row.get("level:spread") in levels else None
    claim.figures.append(
        rename(
            figures.against_levels(table, "spread", levels, "mean_normalized_accuracy"),
            "claim2-training-heterogeneity.png",
            "digits: one-shot merging with equal and spread training",
        )
    )
    return claim


def _levels(collection: Collection, axis: str) -> list[str]:
    levels = axis_labels(collection, axis)
    if len(levels) < 2:
        raise FedmergeError(
            f"the sweep in {collection.root} has no two levels of '{axis}' to compare; run it again "
            "with `fedmerge findings` (its study file names them)."
        )
    return levels


# -- claim 3 ----------------------------------------------------------------------------------------------
def claim_data_heterogeneity(collection: Collection, evaluation: Sequence[dict]) -> Claim:
    claim = Claim(
        3,
        "Data heterogeneity hurts one-shot merging more than multi-round FL",
        "Growing data heterogeneity (smaller Dirichlet α) hurts one-shot merging more than multi-round federated "
        "learning at the same local compute.",
    )
    table = records.select(records.rows(collection), strategy="fedavg")
    alphas = sorted(records.varying(table, "alpha"))
    rounds = sorted(records.varying(table, "rounds"))
    mild, strong, many = max(alphas), min(alphas), max(rounds)
    accuracy = {(a, r): by_seed(table, "mean_accuracy", alpha=a, rounds=r) for a in alphas for r in rounds}
    drops = {r: seed_differences(accuracy[(mild, r)], accuracy[(strong, r)]) for r in rounds}
    claim.decide(
        [
            Part(
                "Label skew lowers one-shot merging",
                f"acc(α = {mild:g}) − acc(α = {strong:g}), one round",
                tuple(differences(accuracy[(mild, 1)], accuracy[(strong, 1)])),
                "greater",
            ),
            Part(
                f"… by more than it lowers {many} rounds",
                f"drop(1 round) − drop({many} rounds)",
                tuple(differences(drops[1], drops[many])),
                "greater",
            ),
        ]
    )
    entry = evaluation_set(evaluation, **{"suite_options.alpha": _label(collection, strong)})
    claim.computed_on = computed_on(entry, "mean_accuracy", len(drops[1]), "λ (and ρ) chosen on the validation split")
    rows = [
        [
            f"{a:g}",
            fmt(mean_ci([r["zeta2"] for r in records.select(table, alpha=a, rounds=1)])),
            *(fmt(mean_ci(list(accuracy[(a, r)].values()))) for r in rounds),
        ]
        for a in alphas
    ]
    rows.append(
        [f"drop {mild:g} → {strong:g} (paired by seed)", "", *(fmt(mean_ci(list(drops[r].values()))) for r in rounds)]
    )
    claim.body.append(
        f"FedAvg's test accuracy, mean ± {CI} over seeds:\n\n"
        + _md_table(
            Table(["Dirichlet α", "ζ² at θ0", *(f"FedAvg, {r} round{'s' if r > 1 else ''}" for r in rounds)], rows)
        )
    )
    claim.figures.append(
        rename(
            figures.against(table, "alpha", "mean_accuracy"),
            "claim3-data-heterogeneity.png",
            f"mnist1d, FedAvg: one-shot merging vs {many} rounds at the same local compute",
        )
    )
    return claim


def _label(collection: Collection, alpha: float) -> str | None:
    """The sweep level label of Dirichlet α = ``alpha``."""
    return next(
        (
            run.levels.get("suite_options.alpha")
            for run in collection.runs
            if run.data["suite"].get("options", {}).get("alpha") == alpha
        ),
        None,
    )


# -- claim 4 ----------------------------------------------------------------------------------------------
def claim_remedies(training: Collection, data: Collection, evaluation: dict) -> Claim:
    claim = Claim(
        4,
        "Where FedNova, FedGMA, Median and CCLIP help or hurt against Task Arithmetic",
        "The federated remedies, used as merging methods (one-shot, λ and ρ chosen on validation), help in some "
        "settings and hurt in others.",
    )
    family, bounds, notes, identical, others = {}, {}, [], [], []
    for name, table, metric, entry in _settings(training, data, evaluation):
        ta = by_seed(table, metric, strategy="fedavg")
        own = mean_over({r["seed"]: r["own_accuracy"] for r in records.select(table, strategy="fedavg")})
        accuracy = mean_over(by_seed(table, "mean_accuracy", strategy="fedavg"))
        normalized = metric == "mean_normalized_accuracy"
        notes.append(f"{name}: {bound_text(accuracy, entry, own if normalized else None)}")
        for remedy in REMEDIES:
            other = by_seed(table, metric, strategy=remedy)
            if not other:
                continue
            diffs = differences(other, ta)
            if all(d == 0 for d in diffs):
                identical.append(f"{remedy} in {name}")
                continue
            family[(name, remedy)] = diffs
            bounds[(name, remedy)] = bound(accuracy, entry, own if normalized else None)
        others += [
            [name, f"{s} − TA", format_paired(paired(by_seed(table, metric, strategy=s), ta))]
            for s in records.varying(table, "strategy")
            if s not in ("fedavg", *REMEDIES)
        ]
    comparisons = classify(family, bounds)
    outcomes = [c.outcome for c in comparisons.values()]
    listed = lambda wanted: (
        ", ".join(f"{r} in {s}" for (s, r), c in comparisons.items() if c.outcome == wanted) or "none"
    )
    claim.decide(
        [
            Decision(
                "Some remedy helps in some setting",
                f"better: {listed(BETTER)}",
                "reproduces if some comparison is "
                "better; contradicted if every one is on par or worse; else inconclusive",
                somewhere(outcomes, BETTER),
            ),
            Decision(
                "Some remedy hurts in some setting",
                f"worse: {listed(WORSE)}",
                "reproduces if some comparison is "
                "worse; contradicted if every one is on par or better; else inconclusive",
                somewhere(outcomes, WORSE),
            ),
        ]
    )
    claim.computed_on = (
        "*Computed on:* digits settings: normalized accuracy on the test split of each client's task; "
        "mnist1d settings: raw accuracy on the suite's whole test split, the same for every client (see "
        "the suites table); one-shot, λ and ρ chosen on validation; paired by seed on the same replies."
    )
    claim.body.append(
        "Each remedy − Task Arithmetic, paired by seed:\n\n"
        + family_table([(s, f"{r} − TA", c) for (s, r), c in comparisons.items()])
    )
    claim.body.append(family_note(list(comparisons.values())))
    claim.body.append(
        "*Negligible differences* (the equivalence bound of each setting): "
        + "; ".join(notes)
        + "."
        + (
            f" Left out, identical to Task Arithmetic in every seed (equal a_t: FedNova is FedAvg): "
            f"{', '.join(identical)}."
            if identical
            else ""
        )
    )
    if others:
        claim.body.append(
            "*Exploratory, outside the claim:* the studies' other merging methods on the same replies, each − "
            "Task Arithmetic paired by seed (▲/▼: the 95% interval excludes zero, uncorrected; no verdict is "
            "drawn from them):\n\n" + _md_table(Table(["setting", "comparison", "mean ± 95% interval"], others))
        )
    return claim


def _settings(training: Collection, data: Collection, evaluation: dict):
    """(name, one-shot rows, metric, evaluation sets) of every setting claim 4 compares in."""
    t = records.select(records.rows(training), rounds=1)
    for label in axis_labels(training, "spread"):
        yield (
            f"digits, spread {label}",
            records.select(t, **{"level:spread": label}),
            "mean_normalized_accuracy",
            evaluation_set(evaluation["training-heterogeneity"], spread=label),
        )
    d = records.select(records.rows(data), rounds=1)
    for alpha in sorted(records.varying(d, "alpha")):
        yield (
            f"mnist1d, α = {alpha:g}",
            records.select(d, alpha=alpha),
            "mean_accuracy",
            evaluation_set(evaluation["data-heterogeneity"], **{"suite_options.alpha": _label(data, alpha)}),
        )


# -- claim 5 ----------------------------------------------------------------------------------------------
STAR, WEIGHTED, NOVA_POINT = (
    "θ* (true optimum)",
    "θ_w (FedAvg's fixed point, w ∝ 1 − (1 − η)^K)",
    "FedNova's fixed point (w ∝ (1 − (1 − η)^K) / (ηK))",
)


def claim_objective_inconsistency(collection: Collection) -> Claim:
    claim = Claim(
        5,
        "Objective inconsistency on the quadratic suite",
        "Multi-round FedAvg with heterogeneous local steps converges to the optimum θ_w of the w-weighted objective "
        "Σ w_t L_t; FedNova to the true optimum θ* of Σ p_t L_t.",
    )
    series, checks, eta, steps = _distances(collection)
    last = max(r for values in series.values() for r in values)
    final = {key: values[last] for key, values in series.items()}
    d = lambda strategy, target: final[(strategy, target)]
    claim.decide(
        [
            Part(
                "FedAvg ends nearer θ_w than θ*",
                "‖FedAvg − θ*‖ − ‖FedAvg − θ_w‖",
                tuple(differences(d("fedavg", STAR), d("fedavg", WEIGHTED))),
                "greater",
            ),
            Part(
                "FedNova ends nearer θ* than θ_w",
                "‖FedNova − θ_w‖ − ‖FedNova − θ*‖",
                tuple(differences(d("fednova", WEIGHTED), d("fednova", STAR))),
                "greater",
            ),
            Part(
                "FedNova ends nearer θ* than FedAvg",
                "‖FedAvg − θ*‖ − ‖FedNova − θ*‖",
                tuple(differences(d("fedavg", STAR), d("fednova", STAR))),
                "greater",
            ),
        ]
    )
    claim.computed_on = (
        f"*Computed on:* the distance of the model after {last} rounds to each point, from the recorded "
        f"per-task test losses of the analytic quadratic tasks; {len(collection.runs)} seeds, paired by seed."
    )
    names = (STAR, WEIGHTED, NOVA_POINT)
    rows = [[s, *(fmt(mean_ci(list(final.get((s, n), {}).values()))) for n in names)] for s in ("fedavg", "fednova")]
    claim.body.append(
        f"After {last} rounds, distance to each point, mean ± {CI} over seeds:\n\n"
        + _md_table(Table([f"after {last} rounds: distance to", *names], rows))
    )
    claim.body.append(
        f"Distances are computed from the recorded per-task test losses (½‖θ − c_t‖² plus a noise constant read at θ0) and the "
        f"suite's task optima c_t; the same computation reproduces the recorded ‖θ − θ*‖ to {max(checks):.1e}. Starting distance "
        f"‖θ0 − θ*‖ = {mean_over(series[('fedavg', STAR)][0]):.3g} (mean over seeds). Learning rate η = {eta[0]:g}, local "
        f"steps K = {', '.join(map(str, steps))}."
    )
    claim.figures.append(_distance_figure(series, names[:2]))
    return claim


def _distances(collection: Collection):
    """(strategy, target) → round → seed → distance; the reproduction errors of ‖θ − θ*‖; η and K."""
    series: dict = {}
    checks, eta, steps = [], None, None
    for run in collection.runs:
        data = run.data
        centers = np.array(data["suite"]["optimum"]["tasks"], dtype=np.float64)  # the task optima c_t; θ* = c̄
        p = np.full(len(centers), 1 / len(centers))
        eta = np.array([c["settings"]["lr"] for c in data["clients"]])
        steps = np.array([c["settings"]["steps"] for c in data["clients"]])
        a_exact = 1 - (1 - eta) ** steps  # GD on ½‖θ − c‖²: τ_t = (1 − (1 − η)^K)(c_t − θ)
        targets = {
            STAR: p,
            WEIGHTED: p * a_exact / np.sum(p * a_exact),
            NOVA_POINT: p * a_exact / (eta * steps) / np.sum(p * a_exact / (eta * steps)),
        }
        noise = [
            t["loss"] - 0.5 * float(np.sum(c**2)) for t, c in zip(data["pretrained"]["tasks"], centers)
        ]  # at θ0 = 0
        for entry in data["runs"]:
            if entry["rounds"] == 1:
                continue
            for point in entry["history"]:
                squared = np.array([2 * (t["loss"] - s) for t, s in zip(point["tasks"], noise)])  # ‖θ − c_t‖²
                for name, w in targets.items():
                    d2 = float(w @ squared - w @ np.sum((centers - w @ centers) ** 2, 1))
                    series.setdefault((entry["strategy"], name), {}).setdefault(point["round"], {})[run.seed] = (
                        math.sqrt(max(d2, 0.0))
                    )
                checks.append(
                    abs(series[(entry["strategy"], STAR)][point["round"]][run.seed] - point["distance_to_optimum"])
                )
    return series, checks, eta, steps


def _distance_figure(series: dict, names: Sequence[str]) -> figures.Figure:
    fig, ax = figures.plt.subplots(figsize=(7.5, 5.2), layout="constrained")
    for (strategy, name), values in sorted(series.items()):
        if name not in names:
            continue
        xs = sorted(values)
        ax.plot(
            xs,
            [np.mean(list(values[x].values())) for x in xs],
            marker="o",
            ms=3,
            color=figures.color(strategy),
            ls="-" if name == names[0] else "--",
            label=f"{strategy}: distance to {name.split(' (')[0]}",
        )
    ax.set_yscale("log")
    ax.set_xlabel("round (0 = θ0)")
    ax.set_ylabel("distance ‖θ − target‖ (log scale)")
    ax.set_title("Quadratic suite: distance to the true optimum θ* and to θ_w per round")
    ax.xaxis.set_major_locator(figures.matplotlib.ticker.MaxNLocator(integer=True))
    figures.legend(fig, [ax])
    return figures.Figure(
        "claim5-objective-inconsistency.png",
        "Solid: distance to the true optimum θ* of Σ p_t L_t; dashed: to θ_w, the optimum of the w-weighted "
        "objective FedAvg converges to (mean over seeds).",
        fig,
    )


# -- claim 6 ----------------------------------------------------------------------------------------------
def claim_robustness(collection: Collection, evaluation: Sequence[dict]) -> Claim:
    claim = Claim(
        6,
        "Robustness to corrupted clients",
        "With f of T clients sending corrupted updates (sign-flipped and scaled), Median and CCLIP hold where "
        "FedAvg breaks.",
    )
    table = records.rows(collection)
    labels = _levels(collection, "attack")
    strategies = records.varying(table, "strategy")
    rounds = sorted(records.varying(table, "rounds"))
    many = max(rounds)
    clean, attack = labels[0], labels[-1]
    acc = {
        (s, lv): by_seed(table, "mean_accuracy", strategy=s, rounds=many, **{"level:attack": lv})
        for s in strategies
        for lv in (clean, attack)
    }
    damage = {s: tuple(differences(acc[(s, attack)], acc[(s, clean)])) for s in strategies}
    entry = evaluation_set(evaluation, attack=clean)
    reference = mean_over(acc[("fedavg", clean)])
    negligible = bound(reference, entry)
    claim.decide(
        [
            Part("FedAvg breaks", f"FedAvg's damage ({attack} − {clean})", damage["fedavg"], "less", -negligible),
            *(
                Part(f"{s} holds", f"{s}'s damage ({attack} − {clean})", damage[s], "within", negligible)
                for s in ("median", "cclip")
                if s in damage
            ),
        ]
    )
    claim.computed_on = computed_on(
        entry,
        "mean_accuracy",
        len(damage["fedavg"]),
        "over rounds β = 1; one-shot λ (and ρ) chosen on the clean validation split",
    )
    for r in rounds:
        rows = [
            [
                label,
                *(
                    fmt(
                        mean_ci(
                            list(
                                by_seed(
                                    table, "mean_accuracy", strategy=s, rounds=r, **{"level:attack": label}
                                ).values()
                            )
                        )
                    )
                    for s in strategies
                ),
            ]
            for label in labels
        ]
        tag = "one-shot (λ, ρ chosen on clean validation data)" if r == 1 else f"{r} rounds (β = 1)"
        claim.body.append(
            f"Test accuracy, {tag}, mean ± {CI} over seeds:\n\n" + _md_table(Table(["attack", *strategies], rows))
        )
    claim.body.append(
        f"*Negligible damage:* {bound_text(reference, entry)}, FedAvg's clean accuracy over {many} rounds. Descriptive, "
        f"over {many} rounds, paired by seed: damage, and each strategy − FedAvg under {attack} (▲/▼: the 95% interval "
        "excludes zero, uncorrected):\n\n"
        + _md_table(
            Table(
                ["strategy", "damage", f"− FedAvg under {attack}"],
                [
                    [
                        s,
                        format_paired(paired(acc[(s, attack)], acc[(s, clean)])),
                        format_paired(paired(acc[(s, attack)], acc[("fedavg", attack)])) if s != "fedavg" else "–",
                    ]
                    for s in strategies
                ],
            )
        )
    )
    claim.figures.append(
        rename(
            figures.against_levels(table, "attack", labels, "mean_accuracy"),
            "claim6-robustness.png",
            "mnist1d: accuracy against corrupted clients",
        )
    )
    return claim
