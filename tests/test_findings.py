"""The findings page on a synthetic work folder (no Ray, no training): every verdict comes from the computed
intervals, the page says what each number is computed on, and cached cells carry the code that made them."""

import json
import math
from pathlib import Path

import numpy as np
import pytest

from fedmerge.errors import FedmergeError
from fedmerge.report import load_runs
from fedmerge.report.claim import CHECK, EXPLORATORY, FINDING
from fedmerge.report.fednova_claims import claim_held_out
from fedmerge.report.findings import write_findings
from fedmerge.report.paper_claims import claim_training_heterogeneity
from fedmerge.report.verdicts import CONTRADICTED, INCONCLUSIVE, REPRODUCES
from fedmerge.report.workfolder import CODE, EVALUATION, EXACTNESS, HELD_OUT, UPDATE_SIZE, cells_dir
from fedmerge.studies import findings as runner
from fedmerge.studies import fingerprint
from report_data import write_grid

SEEDS = (0, 1, 2, 3, 4)
DIGITS = [{"task": f"digits:task-{t}", "val": 270, "test": 269} for t in range(4)]
GLOBAL = [{"task": f"mnist1d:client-{t}", "val": 500, "test": 500} for t in range(4)]


def evaluation_entry(levels, tasks, shared):
    return {
        "levels": levels,
        "seed": 0,
        "suite": "x",
        "options": {},
        "metric": "accuracy",
        "tasks": tasks,
        "shared_test": shared,
    }


def training_sweep(root, nova_16x=-0.3):
    """TA loses 0.1 at 16x; FedNova's shift at 16x relative to its 1x level."""
    return write_grid(
        root,
        "spread",
        {
            "1x": {"strategies": ("fedavg", "fednova", "fedgma", "median", "cclip"), "rounds": (1,), "clients": 4},
            "16x": {
                "strategies": ("fedavg", "fednova", "fedgma", "median", "cclip"),
                "rounds": (1,),
                "clients": 4,
                "shift": {"fedavg": -0.1, "fednova": -0.1 + nova_16x, "cclip": -0.05},
            },
        },
        seeds=SEEDS,
    )


def quadratic_sweep(root):
    """FedAvg goes to θ_w, FedNova to θ* (20 rounds, halving the distance each round)."""
    eta, steps = 0.02, np.array([5, 10, 20, 40])
    weights = 1 - (1 - eta) ** steps
    cells = []
    for seed in SEEDS:
        centers = np.random.default_rng(seed).normal(0, 1, (4, 2))
        targets = {"fedavg": weights / weights.sum() @ centers, "fednova": centers.mean(0)}
        runs = []
        for strategy, target in targets.items():
            history = []
            for r in range(21):
                theta = target * (1 - 0.5**r)
                history.append(
                    {
                        "round": r,
                        "tasks": [
                            {"task": f"q{t}", "loss": 0.5 * float(np.sum((theta - c) ** 2))}
                            for t, c in enumerate(centers)
                        ],
                        "distance_to_optimum": float(np.linalg.norm(theta - centers.mean(0))),
                    }
                )
            runs.append({"strategy": strategy, "rounds": 20, "history": history, "final": history[-1]})
        data = {
            "spec": {"name": "quadratic", "seed": seed, "clients": 4},
            "seed": seed,
            "suite": {
                "name": "quadratic",
                "metric": "loss",
                "options": {},
                "tasks": [f"q{t}" for t in range(4)],
                "optimum": {"theta": centers.mean(0).tolist(), "tasks": centers.tolist()},
            },
            "pretrained": {
                "tasks": [{"task": f"q{t}", "loss": 0.5 * float(np.sum(c**2))} for t, c in enumerate(centers)]
            },
            "clients": [
                {"id": t, "task": f"q{t}", "settings": {"lr": eta, "steps": int(k)}} for t, k in enumerate(steps)
            ],
            "runs": runs,
        }
        cell = f"seed{seed}"
        (root / "cells" / cell).mkdir(parents=True)
        (root / "cells" / cell / "results.json").write_text(json.dumps(data))
        cells.append({"id": cell, "dir": f"cells/{cell}", "complete": True, "levels": {"seed": str(seed)}})
    (root / "sweep.json").write_text(
        json.dumps(
            {
                "name": "quadratic",
                "axes": [{"name": "seed", "keys": ["seed"], "labels": [str(s) for s in SEEDS]}],
                "cells": cells,
            }
        )
    )


def fednova_cell(study, recipe, seed, shifts, shipped="lr-sum"):
    """A FedNova study cell whose normalisers' normalized accuracies are FedAvg's plus ``shifts`` (and seed noise)."""
    noise = np.random.default_rng(seed).normal(0, 0.01, 8)
    base = 0.7 + noise[0]
    one = {
        n: base + shifts.get(n, 0) + (noise[i] if n != "none" else 0)
        for i, n in enumerate(("none", "steps", "lr-sum", "mean-direction"), 1)
    }
    many = {n: v + 0.1 for n, v in one.items()}
    return {
        "study": study,
        "recipe": recipe,
        "seed": seed,
        "suite": "digits",
        "description": recipe,
        "rounds": 5,
        "lr": [0.01, 0.02, 0.04, 0.08],
        "steps": [10, 20, 40, 80],
        "lr_sum": [0.1, 0.4, 1.6, 6.4],
        "norm": [0.1, 0.35, 1.2, 4.0],
        "evaluation": {"val": [270] * 4, "test": [269] * 4},
        "theta0_accuracy": [0.5] * 4,
        "own_accuracy": [0.9] * 4,
        "one_shot": {n: {"normalized_accuracy": v, "task_accuracy": [0.9 * v] * 4} for n, v in one.items()},
        "multi_round": {n: {"normalized_accuracy": v} for n, v in many.items()},
        "shipped_default": shipped,
        "seconds": 1.0,
    }


def write_work(work, nova_16x=-0.3, held_out_lr_sum=-0.2):
    training_sweep(work / "training-heterogeneity", nova_16x)
    write_grid(
        work / "data-heterogeneity",
        "suite_options.alpha",
        {
            "0.1": {
                "alpha": 0.1,
                "strategies": ("fedavg", "fedgma", "median", "cclip"),
                "rounds": (1, 5),
                "shift": {"fedavg": -0.3},
            },
            "100": {"alpha": 100.0, "strategies": ("fedavg", "fedgma", "median", "cclip", "ties"), "rounds": (1, 5)},
        },
        seeds=SEEDS,
    )
    write_grid(
        work / "robustness",
        "attack",
        {
            "f0": {"strategies": ("fedavg", "fedgma", "median", "cclip"), "rounds": (1, 3)},
            "f2-sign-flip": {
                "strategies": ("fedavg", "fedgma", "median", "cclip"),
                "rounds": (1, 3),
                "shift": {"fedavg": -0.2, "fedgma": -0.1},
            },
        },
        seeds=SEEDS,
    )
    quadratic_sweep(work / "quadratic")
    (work / EXACTNESS).write_text(
        json.dumps(
            {
                "model": "m",
                "cases": [
                    {
                        "dtype": "float32",
                        "clients": 2,
                        "scaling": s,
                        "server_lr": 2 * s,
                        "core_error": 1e-7,
                        "strategy_error": 1e-7,
                        "tolerance": 4e-5,
                    }
                    for s in (0.3, 2.0)
                ],
            }
        )
    )
    (work / EVALUATION).write_text(
        json.dumps(
            {
                "training-heterogeneity": [evaluation_entry({"spread": s}, DIGITS, False) for s in ("1x", "16x")],
                "data-heterogeneity": [
                    evaluation_entry({"suite_options.alpha": a}, GLOBAL, True) for a in ("0.1", "100")
                ],
                "robustness": [evaluation_entry({"attack": a}, GLOBAL, True) for a in ("f0", "f2-sign-flip")],
                "quadratic": [],
            }
        )
    )
    (work / CODE).write_text(json.dumps({"quadratic": "abc"}))
    for study, seeds, shifts in (
        (UPDATE_SIZE, SEEDS, {"lr-sum": -0.2, "steps": 0.05}),
        (HELD_OUT, (5, 6, 7, 8, 9), {"steps": 0.02, "lr-sum": held_out_lr_sum, "mean-direction": 0.01}),
    ):
        cells_dir(work, study).mkdir(parents=True)
        for recipe in ("a", "b"):
            for seed in seeds:
                (cells_dir(work, study) / f"{recipe}-seed{seed}.json").write_text(
                    json.dumps(fednova_cell(study, recipe, seed, shifts))
                )
    return work


@pytest.mark.parametrize("nova_16x, verdict", [(-0.3, CONTRADICTED), (0.15, REPRODUCES), (-0.02, INCONCLUSIVE)])
def test_claim_2_is_contradicted_when_fednova_is_significantly_below_ta(tmp_path, nova_16x, verdict):
    # FedNova − TA at 16x = 0.02 (its strategy offset) + nova_16x, plus seed noise; TA drops by 0.1
    claim = claim_training_heterogeneity(
        load_runs(training_sweep(tmp_path / "t", nova_16x)),
        [evaluation_entry({"spread": s}, DIGITS, False) for s in ("1x", "16x")],
    )
    drop, recovers = claim.decisions
    assert drop.verdict == REPRODUCES and "TA(1x) − TA(16x)" in drop.evidence
    assert recovers.verdict == verdict == claim.verdict  # TA's drop reproduces: FedNova's part decides
    assert "a_t = lr-sum" in recovers.statement and "5 seeds" in recovers.evidence
    assert "1076 in all" in claim.computed_on and "normalized accuracy" in claim.computed_on


def test_the_page_decides_from_intervals_and_says_what_each_number_is_computed_on(tmp_path):
    work = write_work(tmp_path / "work")
    path, claims = write_findings(work, tmp_path / "page.md", {"studies": {"quadratic": 60.0}, "this_run": 1.0})
    page = path.read_text()
    by = {c.number: c for c in claims}
    assert by[1].role == CHECK and by[1].verdict == "exact" and by[7].role == EXPLORATORY
    findings = [c for c in claims if c.role == FINDING]
    assert [c.number for c in findings] == [2, 3, 4, 5, 6, 8]
    assert all(c.verdict in (REPRODUCES, CONTRADICTED, INCONCLUSIVE) for c in findings)
    assert by[2].verdict == CONTRADICTED and by[3].decisions[0].verdict == REPRODUCES and by[5].verdict == REPRODUCES
    assert by[6].verdict == REPRODUCES  # FedAvg loses 0.2 on every seed; Median and CCLIP lose nothing
    assert by[4].verdict == REPRODUCES  # FedNova hurts at 16x; Median (its +0.06 offset) helps
    table = page.split("| # | claim |")[1].split("\n\n")[0]
    assert "| 1 |" not in table and "| 7 |" not in table and "| 8 |" in table  # the check and the exploration apart
    for word in ("partly", "does not reproduce", "Verdict: descriptive"):  # the old verdicts
        assert word not in page
    assert "the same 500 test examples for every client" in page and "269 test examples per client's task" in page
    assert "Holm" in page and "cannot be resolved here" in page
    assert "the held-out rule picks `steps` (steps passes the screen); fedmerge ships `lr-sum` (they differ)" in page
    assert "`abc`" in page  # the code fingerprint of the quadratic cells
    family, exploratory = page.split("## 4. ")[1].split("## 5. ")[0].split("*Exploratory, outside the claim:*")
    assert "ties" not in family and "| mnist1d, α = 100 | ties − TA |" in exploratory  # beside the claim, not in it


def test_fednovas_default_follows_the_held_out_data(tmp_path):
    work = write_work(tmp_path / "work", held_out_lr_sum=0.05)
    cells = [json.loads(p.read_text()) for p in sorted(cells_dir(work, HELD_OUT).glob("*.json"))]
    harmful_steps = [
        {
            **c,
            "one_shot": {
                **c["one_shot"],
                "steps": {
                    **c["one_shot"]["steps"],
                    "normalized_accuracy": c["one_shot"]["none"]["normalized_accuracy"] - 0.1,
                },
            },
        }
        for c in cells
    ]
    claim, choice = claim_held_out(harmful_steps)
    assert choice.picked == "lr-sum" and choice.sentence.endswith("(they match)") and choice.harms["steps"]
    assert claim.verdict == REPRODUCES and len(claim.decisions) == 4  # 2 recipes × (one-shot, over rounds)
    _, choice = claim_held_out(cells)
    assert choice.picked == "steps" and not choice.harms["steps"]


# -- code fingerprints ------------------------------------------------------------------------------------
def test_the_fingerprint_follows_the_code_a_cell_runs_and_nothing_else(tmp_path, monkeypatch):
    package = tmp_path / "fedmerge"
    for name in (
        "__init__.py",
        "cli.py",
        "merging/rule.py",
        "report/findings.py",
        "studies/fednova.py",
        "studies/x.py",
    ):
        (package / name).parent.mkdir(parents=True, exist_ok=True)
        (package / name).write_text(f"# {name}\n")
    monkeypatch.setattr(fingerprint, "PACKAGE", package)
    before, study = fingerprint.code_fingerprint(), fingerprint.code_fingerprint("studies/fednova.py")
    for name in ("cli.py", "report/findings.py", "studies/x.py"):
        (package / name).write_text("# edited\n")
    assert fingerprint.code_fingerprint() == before  # the report, other studies and the CLI run no cell
    (package / "studies" / "fednova.py").write_text("# edited\n")
    assert fingerprint.code_fingerprint() == before != fingerprint.code_fingerprint("studies/fednova.py") != study
    (package / "merging" / "rule.py").write_text("# edited\n")
    assert fingerprint.code_fingerprint() != before


def test_sweep_cells_of_other_code_are_removed_before_the_sweep_runs(tmp_path):
    work = tmp_path / "work"
    sweep = work / "quadratic"
    (sweep / "cells" / "a").mkdir(parents=True)
    (sweep / "sweep.json").write_text("{}")
    lines = []
    runner.forget_stale(work, "quadratic", "new", lines.append)  # no recorded code: made by code we cannot name
    assert not sweep.exists() and len(lines) == 1
    assert json.loads((work / CODE).read_text()) == {"quadratic": "new"}
    (sweep / "cells" / "a").mkdir(parents=True)
    (sweep / "sweep.json").write_text("{}")
    runner.forget_stale(work, "quadratic", "new", lines.append)
    assert (sweep / "cells" / "a").exists() and len(lines) == 1  # same code: reused
    runner.forget_stale(work, "quadratic", "newer", lines.append)
    assert not sweep.exists() and json.loads((work / CODE).read_text()) == {"quadratic": "newer"}


def test_no_run_refuses_results_of_other_code(tmp_path, monkeypatch):
    work = write_work(tmp_path / "work")
    code = {name: "current" for name in runner.current_code()}
    monkeypatch.setattr(runner, "current_code", lambda: code)
    (work / CODE).write_text(json.dumps({**code, "robustness": "old"}))
    with pytest.raises(FedmergeError, match=r"robustness .*other code.*without --no-run"):
        runner.run_findings(tmp_path / "page.md", work, run=False, log=lambda line: None)
    (work / CODE).write_text(json.dumps(code))
    path = runner.run_findings(tmp_path / "page.md", work, run=False, log=lambda line: None)
    assert Path(path).exists() and math.isfinite(json.loads((work / "timings.json").read_text())["this_run"])


def test_each_settings_evaluation_sets_are_recorded_from_the_suite():
    from fedmerge.simulations.sweep import sweep_from_dict

    sweep = sweep_from_dict(
        {
            "base": {"suite": "mnist1d", "clients": 3, "suite_options": {"partition": "dirichlet"}},
            "grid": {"suite_options.client_eval": ["global", "matched"], "seed": [0, 1]},
        }
    )
    shared, matched = runner.evaluation_sets(sweep)
    assert shared["levels"] == {"suite_options.client_eval": "global"} and shared["seed"] == 0
    assert shared["shared_test"] and {t["test"] for t in shared["tasks"]} == {500}
    assert not matched["shared_test"] and all(t["test"] < 500 for t in matched["tasks"])
