"""FedNova's normalisers and the size of the local updates: the exploratory study (section 7: the recipes and seeds
mean-direction was designed on) and its confirmation on held-out recipes and seeds (section 8), where FedNova's
default a_t is chosen by a stated rule."""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from fedmerge.report import figures
from fedmerge.report.claim import EXPLORATORY, Claim, family_note, family_table, fmt
from fedmerge.report.document import Table, _md_table
from fedmerge.report.stats import differences, format_interval, mean_ci
from fedmerge.report.verdicts import (
    BETTER,
    ON_PAR,
    UNRESOLVED,
    WORSE,
    Comparison,
    Part,
    classify,
    default_normaliser,
    harmless,
    negligible,
)

NORMALISERS = ("none", "steps", "lr-sum", "mean-direction")
LABELS = {
    "none": "FedAvg (TA)",
    "steps": "FedNova, a = steps",
    "lr-sum": "FedNova, a = Σ lr",
    "mean-direction": "mean-direction",
}
MODES = {"one_shot": "one-shot", "multi_round": "over rounds"}
FEDNOVA_ORDER = ("steps", "lr-sum")
"""FedNova's own definition of a_t for plain SGD first (Wang et al. 2020: the local step count), then the alternative."""
DEFAULT_RULE = (
    "FedNova's default a_t is the first of steps (FedNova's own definition) and lr-sum whose paired difference "
    "to FedAvg has no 95% interval wholly below zero on any held-out recipe, one-shot or over rounds "
    "(uncorrected: a screen for harm, which a multiplicity correction would make easier to pass); steps if "
    "both have one"
)


def by_recipe(cells: Sequence[dict]) -> dict[str, list[dict]]:
    """recipe → its cells, by seed."""
    out: dict = {}
    for cell in sorted(cells, key=lambda c: c["seed"]):
        out.setdefault(cell["recipe"], []).append(cell)
    return out


def growth_exponent(cell: dict) -> float:
    """Slope of log ‖τ_t‖ against log Σ_k η_t over the clients: 1 where updates grow linearly with the learning-rate
    sum, towards 0 where they saturate."""
    return float(np.polyfit(np.log(cell["lr_sum"]), np.log(cell["norm"]), 1)[0])


def values(group: Sequence[dict], mode: str, normaliser: str) -> dict[int, float]:
    """seed → normalized accuracy of a normaliser's merge (one-shot) or its last round."""
    return {c["seed"]: c[mode][normaliser]["normalized_accuracy"] for c in group}


def recipe_bound(group: Sequence[dict]) -> float:
    """The negligible difference of a recipe: the test-set resolution of FedAvg's one-shot accuracy, in normalized
    units (÷ the own fine-tunes' mean accuracy)."""
    accuracy = float(np.mean([np.mean(c["one_shot"]["none"]["task_accuracy"]) for c in group]))
    own = float(np.mean([np.mean(c["own_accuracy"]) for c in group]))
    return negligible(accuracy, sum(group[0]["evaluation"]["test"]), own)


def family(by: dict[str, list[dict]], normalisers: Sequence[str]) -> dict[tuple[str, str, str], Comparison]:
    """(recipe, mode, normaliser) → its paired difference to FedAvg, Holm-corrected over the whole family."""
    diffs, bounds = {}, {}
    for recipe, group in by.items():
        for mode in MODES:
            for n in normalisers:
                diffs[(recipe, mode, n)] = differences(values(group, mode, n), values(group, mode, "none"))
                bounds[(recipe, mode, n)] = recipe_bound(group)
    return classify(diffs, bounds)


def family_rows(comparisons: dict) -> list[tuple[str, str, Comparison]]:
    return [(f"{recipe}, {MODES[mode]}", f"{LABELS[n]} − FedAvg", c) for (recipe, mode, n), c in comparisons.items()]


def recipes_table(by: dict[str, list[dict]], exponent: bool) -> str:
    rows = []
    for recipe, group in by.items():
        c0 = group[0]
        rows.append(
            [
                recipe,
                c0["suite"],
                c0["description"],
                f"{min(c0['lr']):.2g}–{max(c0['lr']):.2g}",
                f"{min(c0['steps'])}–{max(c0['steps'])}",
                f"{max(c0['lr_sum']) / min(c0['lr_sum']):.3g}",
                fmt(mean_ci([max(c["norm"]) / min(c["norm"]) for c in group])),
                *([fmt(mean_ci([growth_exponent(c) for c in group]))] if exponent else []),
                ", ".join(str(c["seed"]) for c in group),
            ]
        )
    return _md_table(
        Table(
            [
                "recipe",
                "suite",
                "what",
                "learning rates",
                "steps",
                "Σ η ratio",
                "‖τ‖ ratio (max/min)",
                *(["growth exponent"] if exponent else []),
                "seeds",
            ],
            rows,
        )
    )


def accuracy_table(by: dict[str, list[dict]], mode: str) -> str:
    return _md_table(
        Table(
            ["recipe", *(LABELS[n] for n in NORMALISERS)],
            [
                [recipe, *(fmt(mean_ci(list(values(group, mode, n).values()))) for n in NORMALISERS)]
                for recipe, group in by.items()
            ],
        )
    )


def where(comparisons: dict, normaliser: str, outcome: str) -> list[str]:
    """The settings (recipe, mode) where a normaliser's comparison has ``outcome``."""
    return [
        f"{recipe} ({MODES[mode]})"
        for (recipe, mode, n), c in comparisons.items()
        if n == normaliser and c.outcome == outcome
    ]


def outcomes_sentence(comparisons: dict, normaliser: str) -> str:
    """``better in …; worse in …; on par in …; unresolved in k settings`` for one normaliser, from the computed
    outcomes."""
    parts = [
        f"{o} in {', '.join(found)}" for o in (BETTER, WORSE, ON_PAR) if (found := where(comparisons, normaliser, o))
    ]
    unresolved, settings = where(comparisons, normaliser, UNRESOLVED), {(r, m) for r, m, _ in comparisons}
    return f"{LABELS[normaliser]} − FedAvg: " + "; ".join(
        [*parts, f"unresolved in {len(unresolved)} of {len(settings)}"]
    )


# -- section 7: exploratory ----------------------------------------------------------------------------------
def claim_update_size(cells: Sequence[dict]) -> Claim:
    claim = Claim(
        7,
        "Where FedNova helps and where it hurts: the size of the local updates",
        "FedNova divides each task vector by its client's work a_t. That undoes unequal work only while ‖τ_t‖ grows "
        "in proportion to a_t; where updates saturate it over-weights the clients that did little. Mean-direction "
        "(each τ_t at unit norm, the merge at their mean norm) was designed on these recipes and seeds.",
        role=EXPLORATORY,
        verdict="no verdict",
        rule="no verdict: these recipes and seeds were used to design mean-direction, so they can only suggest; "
        "section 8 tests what they suggest on held-out recipes and seeds",
    )
    by = by_recipe(cells)
    comparisons = family(by, NORMALISERS[1:])
    exponents = {r: mean_ci([growth_exponent(c) for c in group])[0] for r, group in by.items()}
    resolved = sum(1 for c in comparisons.values() if c.outcome != UNRESOLVED)
    claim.summary = f"{resolved} of {len(comparisons)} comparisons resolved after Holm's correction; see section 7"
    claim.computed_on = _computed_on(by)
    claim.body += [
        "Each recipe trains the digits clients with geometric spreads of learning rates and of step counts (client 0 "
        "smallest in both). The growth exponent is the slope of log ‖τ_t‖ against log Σ_k η_t over the clients (1: "
        "linear; 0: saturated); norms over the shared (merged) tensors only.\n\n" + recipes_table(by, exponent=True),
        "Normalized accuracy, one-shot (each method's λ chosen on validation, the same task vectors), mean ± 95% interval:"
        "\n\n" + accuracy_table(by, "one_shot"),
        f"Over {cells[0]['rounds']} rounds (the same local compute split over the rounds, β = 1):\n\n"
        + accuracy_table(by, "multi_round"),
        "Each normaliser − FedAvg, paired by seed (exploratory):\n\n" + family_table(family_rows(comparisons)),
        family_note(list(comparisons.values())),
        "**Reading** (generated from the outcomes above, with each recipe's growth exponent: "
        + ", ".join(f"{r} {e:.2f}" for r, e in exponents.items())
        + "). "
        + ". ".join(outcomes_sentence(comparisons, n) for n in NORMALISERS[1:])
        + ".",
    ]
    claim.figures += [_norm_figure(by), _normaliser_figure(by)]
    return claim


def _computed_on(by: dict[str, list[dict]]) -> str:
    sizes = sorted(
        {
            f"{g[0]['suite']}: {g[0]['evaluation']['test'][0]} test examples per task "
            f"({sum(g[0]['evaluation']['test'])} in all)"
            for g in by.values()
        }
    )
    return (
        "*Computed on:* the test split of each client's task (" + "; ".join(sizes) + "); metric: normalized accuracy "
        "(accuracy on task t ÷ client t's own fine-tune's, averaged over the tasks); one-shot λ chosen on the "
        "validation split; paired by seed on the same task vectors."
    )


# -- section 8: confirmatory -----------------------------------------------------------------------------------
@dataclass(frozen=True)
class DefaultChoice:
    """FedNova's default a_t as the held-out rule picks it, and the one the code ships."""

    picked: str
    shipped: str
    harms: dict[str, list[str]]  # normaliser → the held-out comparisons whose interval lies below zero

    @property
    def sentence(self) -> str:
        passed = [n for n, harm in self.harms.items() if not harm]
        why = f"{passed[0]} passes the screen" if self.picked in passed else "no normaliser passes the screen"
        return (
            f"the held-out rule picks `{self.picked}` ({why}); fedmerge ships `{self.shipped}` "
            f"({'they match' if self.picked == self.shipped else 'they differ'})"
        )


def default_choice(cells: Sequence[dict]) -> DefaultChoice:
    by = by_recipe(cells)
    diffs = {
        n: {(r, m): differences(values(g, m, n), values(g, m, "none")) for r, g in by.items() for m in MODES}
        for n in FEDNOVA_ORDER
    }
    picked = default_normaliser({n: list(d.values()) for n, d in diffs.items()}, FEDNOVA_ORDER)
    harms = {
        n: [f"{r} ({MODES[m]}) {format_interval(v)}" for (r, m), v in d.items() if not harmless([v])]
        for n, d in diffs.items()
    }
    shipped = {c.get("shipped_default") for c in cells}
    return DefaultChoice(picked, ", ".join(sorted(s for s in shipped if s)) or "unknown", harms)


def claim_held_out(cells: Sequence[dict]) -> tuple[Claim, DefaultChoice]:
    claim = Claim(
        8,
        "Mean-direction and FedNova's a_t on held-out recipes and seeds",
        "Mean-direction, designed on section 7's recipes and seeds, does at least as well as FedAvg (to within "
        "the test set's resolution) on recipes and seeds not used to design it, one-shot and over rounds.",
    )
    by = by_recipe(cells)
    parts = []
    for recipe, group in by.items():
        b = recipe_bound(group)
        for mode, name in MODES.items():
            parts.append(
                Part(
                    f"not worse than FedAvg: {recipe}, {name}",
                    "mean-direction − FedAvg",
                    tuple(differences(values(group, mode, "mean-direction"), values(group, mode, "none"))),
                    "greater",
                    -b,
                )
            )
    claim.decide(parts)
    choice = default_choice(cells)
    comparisons = family(by, NORMALISERS[1:])
    claim.computed_on = _computed_on(by)
    claim.body += [
        "Held-out recipes (not used to design mean-direction or to choose its comparisons) on held-out seeds:\n\n"
        + recipes_table(by, exponent=False),
        "Normalized accuracy, one-shot:\n\n" + accuracy_table(by, "one_shot"),
        f"Over {cells[0]['rounds']} rounds:\n\n" + accuracy_table(by, "multi_round"),
        "*Negligible differences:* each recipe's bound is the 95% sampling half-width of FedAvg's one-shot accuracy on "
        "its test examples, ÷ the own fine-tunes' mean accuracy: "
        + ", ".join(f"{r} ±{recipe_bound(g):.3f}" for r, g in by.items())
        + ". The claim needs every part (an intersection of "
        "tests, so no multiplicity correction).",
        f"**FedNova's default a_t.** *Rule:* {DEFAULT_RULE}. "
        + " ".join(
            f"{LABELS[n]}: "
            + ("no held-out interval below zero" if not h else "interval below zero in " + ", ".join(h))
            + "."
            for n, h in choice.harms.items()
        )
        + f" So {choice.sentence}.",
        "Every normaliser − FedAvg on the held-out data (descriptive, Holm-corrected):\n\n"
        + family_table(family_rows(comparisons)),
        family_note(list(comparisons.values())),
    ]
    return claim, choice


# -- figures -------------------------------------------------------------------------------------------------
def _norm_figure(by: dict) -> figures.Figure:
    fig, axes = figures.plt.subplots(1, 2, figsize=(11, 4.6), layout="constrained")
    palette = figures.plt.get_cmap("tab10")
    for i, (recipe, group) in enumerate(by.items()):
        for key, ax in zip(("lr_sum", "steps"), axes):
            ax.scatter(
                [x for c in group for x in c[key]],
                [y for c in group for y in c["norm"]],
                s=14,
                color=palette(i),
                alpha=0.7,
                label=recipe if key == "lr_sum" else None,
            )
            mean_x = np.exp(np.mean([np.log(c[key]) for c in group], 0))
            mean_y = np.exp(np.mean([np.log(c["norm"]) for c in group], 0))
            ax.plot(mean_x, mean_y, color=palette(i), lw=1)
            if key == "lr_sum":
                ax.plot(mean_x, mean_y[0] * mean_x / mean_x[0], color=palette(i), lw=0.8, ls=":")
    for ax, label in zip(axes, ("a_t = Σ_k η_t (learning-rate sum, log)", "a_t = K_t (steps, log)")):
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.set_xlabel(label)
        ax.set_ylabel("‖τ_t‖ over the shared tensors (log)")
    axes[0].set_title("‖τ_t‖ against Σ η: dotted = linear growth from the smallest client")
    axes[1].set_title("‖τ_t‖ against steps")
    figures.legend(fig, list(axes))
    return figures.Figure(
        "claim7-norm-vs-effective-steps.png",
        "Each point is one client of one seed; lines join the clients' geometric means (client 0 to 3). "
        "Dotted: what ‖τ_t‖ would be if it grew linearly with Σ η from client 0.",
        fig,
    )


def _normaliser_figure(by: dict) -> figures.Figure:
    fig, axes = figures.plt.subplots(1, 2, figsize=(11, 4.6), layout="constrained", sharey=True)
    palette = figures.plt.get_cmap("tab10")
    recipes = list(by)
    width = 0.8 / len(NORMALISERS)
    for ax, (mode, title) in zip(
        axes, (("one_shot", "one-shot (λ on validation)"), ("multi_round", "over rounds (β = 1)"))
    ):
        for j, n in enumerate(NORMALISERS):
            stats_ = [mean_ci(list(values(by[r], mode, n).values())) for r in recipes]
            ax.bar(
                np.arange(len(recipes)) + (j - (len(NORMALISERS) - 1) / 2) * width,
                [s[0] for s in stats_],
                width,
                yerr=[0 if math.isnan(s[1]) else s[1] for s in stats_],
                color=palette(j),
                capsize=2,
                label=LABELS[n] if mode == "one_shot" else None,
            )
        ax.set_xticks(np.arange(len(recipes)), recipes, rotation=20)
        ax.set_title(title)
        ax.set_ylabel("normalized accuracy (mean over tasks)")
    figures.legend(fig, list(axes))
    return figures.Figure(
        "claim7-normalisers.png",
        "Normalized accuracy of each normaliser per recipe; error bars: 95% "
        "intervals over seeds (unpaired; the paired differences are in the tables).",
        fig,
    )
