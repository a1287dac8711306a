"""A claim of the findings page, its decisions, and the helpers its sections share: per-seed values from results,
the evaluation sets a number is computed on, and the tables that show every verdict with its interval."""

from __future__ import annotations

import math
from collections.abc import Hashable, Mapping, Sequence
from dataclasses import dataclass, field

from fedmerge.errors import FedmergeError
from fedmerge.report import figures, records
from fedmerge.report.document import Table, _md_table
from fedmerge.report.load import Collection
from fedmerge.report.stats import format_ci, format_interval, mean_ci
from fedmerge.report.verdicts import (
    ALPHA,
    COMBINE_TEXT,
    EQUIVALENCE_LEVEL,
    FAMILY_TEXT,
    INCONCLUSIVE,
    Comparison,
    Part,
    combine,
    negligible,
    resolvable,
)
from fedmerge.report.workfolder import EVALUATION

FINDING, CHECK, EXPLORATORY = "finding", "check", "exploratory"
CI = "95% interval"


@dataclass(frozen=True)
class Decision:
    """One decided statement: what it says, the numbers it rests on, the rule, and the verdict."""

    statement: str
    evidence: str
    rule: str
    verdict: str


def decision(part: Part) -> Decision:
    """A part's decision, its evidence the mean paired difference with its 95% interval (and the 90% one for
    equivalence)."""
    evidence = f"{part.quantity}: {format_interval(part.diffs)}"
    if part.test == "within":
        evidence += f"; 90%: {format_interval(part.diffs, EQUIVALENCE_LEVEL)}"
    return Decision(part.statement, f"{evidence} ({len(part.diffs)} seeds)", part.rule, part.verdict)


@dataclass
class Claim:
    number: int
    title: str
    statement: str
    role: str = FINDING
    decisions: list[Decision] = field(default_factory=list)
    verdict: str = INCONCLUSIVE
    rule: str = COMBINE_TEXT
    summary: str = ""
    computed_on: str = ""
    body: list[str] = field(default_factory=list)
    figures: list[figures.Figure] = field(default_factory=list)

    @property
    def label(self) -> str:
        return {FINDING: "claim", CHECK: "check", EXPLORATORY: "exploratory study"}[self.role] + f" {self.number}"

    def decide(self, parts: Sequence[Part | Decision]) -> None:
        """Decide the claim from its parts (:func:`~fedmerge.report.verdicts.combine`); the summary lists them."""
        self.decisions = [p if isinstance(p, Decision) else decision(p) for p in parts]
        self.verdict = combine([d.verdict for d in self.decisions])
        self.summary = "; ".join(f"{d.statement}: {d.verdict} ({d.evidence})" for d in self.decisions)


def decisions_table(decisions: Sequence[Decision]) -> str:
    return _md_table(
        Table(
            ["part", "evidence: paired difference, mean [95% interval]", "rule", "verdict"],
            [[d.statement, d.evidence, d.rule, f"**{d.verdict}**"] for d in decisions],
        )
    )


# -- families -------------------------------------------------------------------------------------------------
def family_table(rows: Sequence[tuple[str, str, Comparison]]) -> str:
    """setting | comparison | mean [95% interval] | bound | adjusted p-values | outcome, one row per comparison."""
    return _md_table(
        Table(
            [
                "setting",
                "comparison",
                "mean [95% interval]",
                "negligible within",
                "p (t-test, Holm)",
                "p (TOST, Holm)",
                "outcome",
            ],
            [
                [
                    setting,
                    name,
                    format_interval(c.diffs),
                    f"±{c.bound:.3f}",
                    _p(c.p),
                    _p(c.p_equivalence),
                    f"**{c.outcome}**",
                ]
                for setting, name, c in rows
            ],
        )
    )


def family_note(comparisons: Sequence[Comparison]) -> str:
    """The family's rule and the smallest effect its seeds can resolve."""
    m = len(comparisons)
    diffs = [c.diffs for c in comparisons]
    seeds = min((len(d) for d in diffs), default=0)
    return (
        f"*Rule:* {FAMILY_TEXT.format(m=m)}. *Resolution:* with {seeds} seeds and the spread of these paired "
        f"differences (pooled), a mean difference must exceed {resolvable(diffs):.3f} for its 95% interval to clear "
        f"zero, and {resolvable(diffs, m):.3f} to pass Holm's first step over the {m} comparisons; smaller effects "
        "cannot be resolved here."
    )


def _p(value: float) -> str:
    return "–" if math.isnan(value) else f"{value:.3f}" + (" ✓" if value < ALPHA else "")


# -- values ---------------------------------------------------------------------------------------------------
def fmt(stat) -> str:
    return format_ci(stat[0], stat[1])


def by_seed(table: Sequence[dict], metric: str = "mean_normalized_accuracy", **where) -> dict[int, float]:
    """seed → ``metric`` of the rows matching ``where``."""
    return {r["seed"]: r[metric] for r in records.select(table, **where) if r.get(metric) is not None}


def axis_labels(collection: Collection, axis: str) -> list[str]:
    for entry in (collection.manifest or {}).get("axes", []):
        if entry["name"] == axis:
            return list(entry["labels"])
    return []


def task_values(
    collection: Collection, strategy: str, rounds: int = 1, metric: str = "normalized_accuracy", **levels
) -> dict[str, dict[int, float]]:
    """task → seed → the metric of ``strategy`` after ``rounds`` on that task."""
    out: dict = {}
    for run in collection.runs:
        if any(run.levels.get(k) != v for k, v in levels.items()):
            continue
        for entry in run.data["runs"]:
            if entry["strategy"] == strategy and int(entry["rounds"]) == rounds:
                for task in entry["final"].get("tasks", []):
                    if task.get(metric) is not None:
                        out.setdefault(task["task"], {})[run.seed] = task[metric]
    return out


def rename(figure: figures.Figure | None, name: str, title: str | None = None) -> figures.Figure | None:
    if figure is None:
        return None
    figure.name = name
    if title:
        figure.figure.axes[0].set_title(title)
    return figure


# -- what a number is computed on ----------------------------------------------------------------------------
def evaluation_set(evaluation: Sequence[dict], **levels) -> dict:
    """The recorded evaluation sets of the setting with these sweep levels."""
    found = next((e for e in evaluation if all(e["levels"].get(k) == v for k, v in levels.items())), None)
    if found is None:
        raise FedmergeError(
            f"{EVALUATION} records no setting {levels}; run `fedmerge findings` without --no-run to record it."
        )
    return found


def test_examples(entry: dict) -> int:
    """Distinct test examples a setting's mean over clients rests on."""
    sizes = [t["test"] for t in entry["tasks"]]
    return sizes[0] if entry["shared_test"] else sum(sizes)


def describe_sets(entry: dict, split: str = "test") -> str:
    """``the same 500 test examples for every client`` or ``269 test examples per task (1076 in all)``."""
    sizes = [t[split] for t in entry["tasks"]]
    if entry["shared_test"]:
        return f"the same {sizes[0]} {split} examples for every client (the suite's whole {split} split)"
    each = f"{sizes[0]}" if len(set(sizes)) == 1 else f"{min(sizes)}–{max(sizes)}"
    return f"{each} {split} examples per client's task ({sum(sizes)} in all)"


def bound(accuracy: float, entry: dict, own: float | None = None) -> float:
    """The negligible difference of a mean accuracy ``accuracy`` on the setting's test examples; divided by the own
    fine-tunes' mean accuracy ``own`` for normalized accuracy."""
    return negligible(accuracy, test_examples(entry), own or 1.0)


def bound_text(accuracy: float, entry: dict, own: float | None = None) -> str:
    """How :func:`bound` was computed, with its numbers."""
    n = test_examples(entry)
    base = f"1.96·√({accuracy:.3f}·{1 - accuracy:.3f}/{n})"
    return (
        f"±{bound(accuracy, entry, own):.3f} = {base}"
        + (f" ÷ {own:.3f}" if own else "")
        + f" (TA's accuracy {accuracy:.3f} on {n} test examples"
        + (", ÷ the own fine-tunes' mean accuracy)" if own else ")")
    )


def mean_over(values: Mapping[Hashable, float]) -> float:
    return mean_ci(list(values.values()))[0]
