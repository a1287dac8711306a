"""The findings page: the paper's claims tested on fedmerge's own suites, from the results files of the studies.

This module reads files only (the study sweeps' results directories, ``exactness.json``, ``evaluation.json``,
``code.json`` and the FedNova studies' cells, all under the work folder :mod:`fedmerge.studies` ran them into) and
writes the page and its figures. It never runs anything. Each claim is built and decided in
:mod:`fedmerge.report.paper_claims` (claims 1–6) and :mod:`fedmerge.report.fednova_claims` (7 and 8) by the rules of
:mod:`fedmerge.report.verdicts`.
"""

from __future__ import annotations

import datetime as dt
import io
import re
from collections.abc import Sequence
from pathlib import Path

from fedmerge.errors import FedmergeError
from fedmerge.files import check_output_dir, write_file, write_tree
from fedmerge.report.claim import CHECK, EXPLORATORY, FINDING, Claim, decisions_table
from fedmerge.report.fednova_claims import DefaultChoice, claim_held_out, claim_update_size
from fedmerge.report.load import MANIFEST, load_runs
from fedmerge.report.paper_claims import (
    claim_data_heterogeneity,
    claim_objective_inconsistency,
    claim_remedies,
    claim_robustness,
    claim_task_arithmetic_is_fedavg,
    claim_training_heterogeneity,
    suite_section,
)
from fedmerge.report.verdicts import EQUIVALENCE_LEVEL, rule_text
from fedmerge.report.workfolder import (
    CODE,
    EVALUATION,
    EXACTNESS,
    FEDNOVA_STUDIES,
    HELD_OUT,
    SWEEP_STUDIES,
    UPDATE_SIZE,
    cells_dir,
    read_json,
)

TITLE = "# Findings: the paper's claims on fedmerge's own suites"
ROLES = {FINDING: "Verdict", CHECK: "Check", EXPLORATORY: "Exploratory"}


def missing_results(work: Path) -> list[str]:
    """What the page needs that ``work`` lacks (names of studies and files)."""
    work = Path(work)
    missing = [name for name in SWEEP_STUDIES if not (work / name / MANIFEST).exists()]
    missing += [
        f"{name} ({file})"
        for name, file in (("exactness", EXACTNESS), ("evaluation sets", EVALUATION), ("code fingerprints", CODE))
        if not (work / file).exists()
    ]
    return missing + [name for name in FEDNOVA_STUDIES if not list(cells_dir(work, name).glob("*.json"))]


def load_fednova(work: Path, study: str) -> list[dict]:
    """The cells of a FedNova study."""
    cells = [read_json(p) for p in sorted(cells_dir(work, study).glob("*.json"))]
    return [c for c in cells if c.get("study") == study]


def write_findings(work: Path, out: Path, timings: dict | None = None) -> tuple[Path, list[Claim]]:
    """Read every study's results under ``work`` and write the page ``out`` (figures in ``<out stem>/``)."""
    work = Path(work)
    check_page_out(out)
    if missing := missing_results(work):
        raise FedmergeError(
            f"no results of {', '.join(missing)} in --work {work}; run `fedmerge findings --work {work}` "
            "without --no-run first."
        )
    collections = {name: load_runs(work / name) for name in SWEEP_STUDIES}
    evaluation = read_json(work / EVALUATION)
    fednova = {name: load_fednova(work, name) for name in FEDNOVA_STUDIES}
    held_out, choice = claim_held_out(fednova[HELD_OUT])
    claims = [
        claim_task_arithmetic_is_fedavg(read_json(work / EXACTNESS)),
        claim_training_heterogeneity(collections["training-heterogeneity"], evaluation["training-heterogeneity"]),
        claim_data_heterogeneity(collections["data-heterogeneity"], evaluation["data-heterogeneity"]),
        claim_remedies(collections["training-heterogeneity"], collections["data-heterogeneity"], evaluation),
        claim_objective_inconsistency(collections["quadratic"]),
        claim_robustness(collections["robustness"], evaluation["robustness"]),
        claim_update_size(fednova[UPDATE_SIZE]),
        held_out,
    ]
    costs = {
        name: (len(c.runs), sum(x.get("seconds", 0) for x in c.manifest.get("cells", [])), len(c.missing))
        for name, c in collections.items()
    }
    costs.update({name: (len(cells), sum(c.get("seconds", 0) for c in cells), 0) for name, cells in fednova.items()})
    intro = suite_section(collections, evaluation, fednova)
    path = write_page(claims, out, timings or {}, work, costs, intro, choice, read_json(work / CODE))
    return path, claims


def verdict_rules() -> list[str]:
    """How every verdict is decided, from the rules' own texts."""
    return [
        "**How verdicts are decided.** Every number is a mean over seeds; methods are compared *paired*: within a seed "
        "every method merged the same clients' replies, so each comparison is the per-seed difference, its mean and its "
        "Student-t interval. Each claim is split into parts, each decided by one rule on its paired differences:",
        "",
        f"* *greater* (“X is above Y”): {rule_text('greater')};",
        f"* *less*: {rule_text('less')};",
        f"* *within ±b* (“no damage”, “on par”: equivalence by two one-sided tests, TOST): reproduces if the "
        f"{EQUIVALENCE_LEVEL:.0%} interval lies inside ±b, contradicted if the 95% interval lies outside ±b, else "
        "inconclusive.",
        "",
        "An interval that touches its threshold decides nothing. A claim reproduces when every part reproduces, is "
        "contradicted when any part is, and is inconclusive otherwise. **The bound b** of “negligible” is derived from "
        "the test set the number is computed on: 1.96·√(a(1 − a)/n), the 95% sampling half-width of an accuracy a "
        "measured on n test examples (÷ the own fine-tunes' accuracy for normalized accuracy); a difference inside it is "
        "one a test set of that size cannot resolve. A *family* of comparisons (claim 4; sections 7 and 8) is decided "
        "with Holm's correction over the family, and each family states the smallest effect its seeds can resolve.",
        "",
    ]


def write_page(
    claims: Sequence[Claim],
    out: Path,
    timings: dict,
    work: Path,
    costs: dict | None = None,
    intro: Sequence[str] = (),
    choice: DefaultChoice | None = None,
    code: dict | None = None,
) -> Path:
    out = Path(out)
    figure_dir = out.parent / out.stem
    images = {}
    for claim in claims:
        for figure in claim.figures:
            if figure is not None:
                buffer = io.BytesIO()
                figure.save(buffer)
                images[figure.name] = buffer.getvalue()
    lines = [*_head(claims, timings, work, out, choice), *intro]
    for claim in claims:
        lines += _section(claim, figure_dir.name)
    lines += _how_made(costs or {}, timings, code or {})
    write_tree(figure_dir, images, replace=True)
    return write_file(out, "\n".join(lines))


def _head(claims: Sequence[Claim], timings: dict, work: Path, out: Path, choice: DefaultChoice | None) -> list[str]:
    measured = timings.get("studies", {})
    cold = sum(measured.values())
    findings = [c for c in claims if c.role == FINDING]
    others = [c for c in claims if c.role != FINDING]
    return [
        TITLE,
        "",
        "This page is generated by `fedmerge findings`; do not edit it by hand. It tests the claims of Tao, Mason, Kulkarni "
        "and Boix, *Task Arithmetic Through The Lens Of One-Shot Federated Learning* (TMLR 2025, arXiv 2411.18607), on small "
        "built-in suites (digits and mnist1d MLPs, analytic quadratics) on a 2-core CPU: few clients, small models, 5 seeds. "
        "They test the direction of each claim, not the paper's magnitudes.",
        "",
        *verdict_rules(),
        f"Regenerate (about {max(cold, 60) / 60:.0f} min on 2 CPU cores from nothing; finished cells made by the same "
        "code are reused):",
        "",
        "```sh",
        f"fedmerge findings --work {work} --out {out}",
        f"fedmerge findings --no-run --work {work} --out {out}   # rewrite the page from the results there",
        "```",
        "",
        "Conventions: β is the server learning rate of the mean-scale update (θ ← θ + β Δ, Δ = Σ p_t τ_t for FedAvg), "
        "and every result records the β applied; λ is a method's own scale where it has one (Task Arithmetic's "
        "θ0 + λ Σ_t τ_t, β = λ·T). Rules merge the shared tensors only; each client's private head stays as it "
        "trained it.",
        "",
        "| # | claim | verdict | parts (paired differences: mean [95% interval]) |",
        "|---|---|---|---|",
        *(f"| {c.number} | {c.title} | **{c.verdict}** | {c.summary} |" for c in findings),
        "",
        *([f"**FedNova's default a_t** (section 8): {choice.sentence}.", ""] if choice else []),
        "Not findings: " + "; ".join(f"{c.label}, {c.title}: {c.verdict} ({c.summary})" for c in others) + ".",
        "",
    ]


def _section(claim: Claim, figure_dir: str) -> list[str]:
    lines = [
        f"## {claim.number}. {claim.title}",
        "",
        f"**Claim.** {claim.statement}",
        "",
        f"**{ROLES[claim.role]}: {claim.verdict}.** {claim.computed_on or claim.summary + '.'}",
        "",
    ]
    if claim.decisions:
        lines += [decisions_table(claim.decisions), ""]
    lines += [f"*Rule:* {claim.rule}.", ""]
    for part in claim.body:
        lines += [part, ""]
    for figure in claim.figures:
        if figure is not None:
            lines += [f"![{figure.caption}]({figure_dir}/{figure.name})", "", f"*{figure.caption}*", ""]
    return lines


def _how_made(costs: dict, timings: dict, code: dict) -> list[str]:
    measured = timings.get("studies", {})
    cold = sum(measured.values())
    where = {
        name: f"`fedmerge/simulations/presets/studies/{name}.toml` (Flower simulation on Ray, one Ray per cell)"
        for name in SWEEP_STUDIES
    }
    where.update(
        {name: "`fedmerge/studies/fednova.py` (local trainer + merging core, in process)" for name in FEDNOVA_STUDIES}
    )
    return [
        "## How these numbers were made",
        "",
        "| study | what runs it | cells | compute (s, sum over cells) | code fingerprint |",
        "|---|---|---|---|---|",
        *(
            f"| {name} | {where[name]} | {n}{f' ({m} missing)' if m else ''} | {s:.0f} | `{code.get(name, '–')}` |"
            for name, (n, s, m) in costs.items()
        ),
        f"| exactness (check 1) | `fedmerge/studies/exactness.py` | 1 | {measured.get('exactness', 0):.0f} | – |",
        "",
        "A cell is reused only while the fingerprint of the code that made it (a hash of the source files of the fedmerge "
        "modules it runs) is unchanged. Measured from nothing on this 2-core machine (wall time of each study when its "
        "cells last ran): "
        + ", ".join(f"{k} {v:.0f} s" for k, v in measured.items())
        + f"; in all {cold:.0f} s ({cold / 60:.1f} min). This `fedmerge findings` run took {timings.get('this_run', 0):.0f} s "
        f"(cells already finished are reused and cost nothing). Generated {dt.date.today().isoformat()}.",
        "",
    ]


def check_page_out(out: Path) -> None:
    """Refuse a page path that would replace something other than a previous findings page and its figures."""
    out = Path(out)
    figure_dir = out.parent / out.stem
    if out.suffix != ".md":
        raise FedmergeError(
            f"--out {out}: give a Markdown file path ending in .md (its figures go beside it, in <stem>/)."
        )
    check_output_dir(out.parent, "--out")
    if out.is_dir() or out.exists() and not out.read_text(errors="replace").startswith(TITLE):
        raise FedmergeError(f"--out {out} exists and is not a findings page; give another path, or remove it first.")
    if figure_dir.exists() and (
        not figure_dir.is_dir() or not all(re.fullmatch(r"claim\d+-[\w-]+\.png", p.name) for p in figure_dir.iterdir())
    ):
        raise FedmergeError(f"--out {out}: its figures go to {figure_dir}, which holds other files; give another path.")
