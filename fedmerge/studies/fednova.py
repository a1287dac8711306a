"""FedNova and the size of the local updates: when does normalising by a_t help a merge, and when does it hurt?

Every client fine-tunes θ0 with the real local trainer (:func:`fedmerge.clients.trainer.train`, the code the
ClientApp runs) under a *recipe*: an optimizer and a 16× geometric spread of learning rates and of step counts
over the clients (client 0 the smallest of both, client T−1 the largest, as in the training-heterogeneity study),
at a given overall size. The same task vectors are then merged by the merging core with different choices of
the effective steps a_t of FedNova (Δ = ā Σ_t p_t τ_t / a_t):

* ``none``: a_t = 1 (FedAvg, Task Arithmetic);
* ``steps``: a_t = K_t, the step count;
* ``lr-sum``: a_t = Σ_k η_t^(k), the sum of the learning rates;
* ``norm`` (shipped as FedNova's ``normalize_by="norm"``): a_t = ‖τ_t‖, so each client enters with a unit-norm direction and the
  merge keeps the mean norm (ā = mean ‖τ_t‖). In the linear regime ‖τ_t‖ ∝ Σ η, so this is ``lr-sum``; where
  updates saturate it stops dividing a client's update by work that did not move it.

One-shot: λ chosen on the validation splits from the paper's grid (Task-Arithmetic convention), normalized
accuracy on test. Over rounds: R rounds from θ0, each client doing K_t / R of its steps per round (the same local
compute), β = 1, normalised by that round's a_t. This runs in this process (no Ray): the one-shot replies the
simulation would collect are exactly these (same trainer, same seeds); the merges are the merging core's rules.

Results go to ``<work>/fednova-update-size/cells/<recipe>-seed<k>.json`` (one per recipe and seed, written
atomically, reused when present) and are read by :mod:`fedmerge.report.findings`.
"""

from __future__ import annotations

import hashlib
import json
import time
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
import torch

from fedmerge.clients.app import round_steps
from fedmerge.clients.settings import client_table
from fedmerge.clients.trainer import total_steps, train
from fedmerge.files import write_file
from fedmerge.merging import FedAvgRule, FedNovaRule, merged_model
from fedmerge.merging.scale import PAPER_GRID as SCALING_GRID
from fedmerge.tasks import load_suite

NAME = "fednova-update-size"
SUITE, SUITE_OPTIONS, CLIENTS, ROUNDS, BATCH = "digits", {}, 4, 5, 32
SEEDS = tuple(range(5))
NORMALISERS = ("none", "steps", "lr-sum", "norm")
RECIPES = {
    # name: (optimizer, [lr low, lr high], [steps low, steps high], what it stands for)
    "sgd-small": ("sgd", [0.0025, 0.04], [25, 400], "SGD, small updates (‖τ‖ still growing with Σ η)"),
    "sgd-large": ("sgd", [0.0125, 0.2], [75, 1200], "SGD, large updates (the largest clients near convergence)"),
    "momentum-large": ("momentum", [0.00625, 0.1], [75, 1200], "SGD with momentum 0.9: the claim-2 study's recipe"),
    "adamw-small": ("adamw", [1e-5, 1.6e-4], [75, 1200], "AdamW at a small learning rate (the paper's 1e-5 CLIP recipe, scaled)"),
    "adamw-large": ("adamw", [2.5e-4, 4e-3], [75, 1200], "AdamW at a usual learning rate"),
}


def recipe_training(recipe: str) -> dict:
    optimizer, lrs, steps, _ = RECIPES[recipe]
    return {"optimizer": optimizer, "lr": {"geometric": lrs}, "steps": {"geometric": steps}, "batch_size": BATCH}


def cell_key(recipe: str, seed: int) -> str:
    """What a cached cell was computed from: a stale cell (another recipe, suite or round count) is recomputed."""
    text = json.dumps({"suite": SUITE, "options": SUITE_OPTIONS, "clients": CLIENTS, "rounds": ROUNDS, "seed": seed,
                       "training": recipe_training(recipe), "normalisers": NORMALISERS, "version": 1}, sort_keys=True)
    return hashlib.sha256(text.encode()).hexdigest()[:12]


def effective_steps(normaliser: str, steps: Sequence[float], lr_sums: Sequence[float], norms: Sequence[float]) -> list[float] | None:
    """a_t of a normaliser; None for ``none`` (FedAvg)."""
    return {"none": None, "steps": list(steps), "lr-sum": list(lr_sums), "norm": list(norms)}[normaliser]


def rule_for(normaliser: str, steps, lr_sums, norms):
    a = effective_steps(normaliser, steps, lr_sums, norms)
    return FedAvgRule() if a is None else FedNovaRule([max(float(x), 1e-12) for x in a])


def _norm(model: dict, base: dict) -> float:
    return float(torch.sqrt(sum(((model[k].double() - base[k].double()) ** 2).sum() for k in base)))


def _scores(fed, state: dict, split: str, own: Sequence[float]) -> tuple[float, list[float]]:
    model = fed.model_from(fed.complete(state), "cpu")
    accuracies = [fed.evaluate(model, task, split)["accuracy"] for task in fed.tasks]
    normalized = [a / o if o else float("nan") for a, o in zip(accuracies, own)]
    return float(np.mean(normalized)), accuracies


def _train_all(fed, configs, start: dict, first_steps: Sequence[int], num_steps: Sequence[int]):
    models, results = [], []
    for t, (config, task) in enumerate(zip(configs, fed.tasks)):
        model = fed.model_from(start, "cpu")
        results.append(train(model, task, fed.loss, config, first_step=first_steps[t], num_steps=num_steps[t], head=task.head))
        state = model.state_dict()
        models.append({k: state[k].detach().clone() for k in start})
    return models, results


def run_cell(recipe: str, seed: int) -> dict:
    """One recipe and seed: the clients' updates, every normaliser's one-shot merge and its R-round run."""
    started = time.perf_counter()
    fed = load_suite(SUITE, CLIENTS, SUITE_OPTIONS, seed)
    base = {k: fed.pretrained[k].clone() for k in fed.trained_names}
    configs = client_table(recipe_training(recipe), CLIENTS, seed)
    totals = [total_steps(c, len(task.train)) for c, task in zip(configs, fed.tasks)]
    models, results = _train_all(fed, configs, base, [0] * CLIENTS, totals)
    steps, lr_sums = [r.num_steps for r in results], [r.lr_sum for r in results]
    norms = [_norm(m, base) for m in models]
    own_val, own_test = [], []
    for t, (model, task) in enumerate(zip(models, fed.tasks)):
        net = fed.model_from(fed.complete(model), "cpu")
        own_val.append(fed.evaluate(net, task, "val")["accuracy"])
        own_test.append(fed.evaluate(net, task, "test")["accuracy"])
    theta0_test = _scores(fed, base, "test", own_test)[1]
    one_shot = {}
    for normaliser in NORMALISERS:
        delta = merged_model(rule_for(normaliser, steps, lr_sums, norms), base, models, server_lr=1.0)
        delta = {k: delta[k] - base[k] for k in base}
        best = None
        for scaling in SCALING_GRID:
            state = {k: base[k] + scaling * CLIENTS * delta[k] for k in base}
            score = _scores(fed, state, "val", own_val)[0]
            if best is None or score > best[0]:
                best = (score, scaling, state)
        test, accuracies = _scores(fed, best[2], "test", own_test)
        one_shot[normaliser] = {"scaling": best[1], "val": best[0], "normalized_accuracy": test, "task_accuracy": accuracies}
    rounds = {}
    for normaliser in NORMALISERS:
        theta = {k: v.clone() for k, v in base.items()}
        history = []
        for r in range(1, ROUNDS + 1):
            chunks = [round_steps(total, r, ROUNDS, True) for total in totals]
            local, res = _train_all(fed, configs, theta, [c[0] for c in chunks], [c[1] for c in chunks])
            rule = rule_for(normaliser, [x.num_steps for x in res], [x.lr_sum for x in res], [_norm(m, theta) for m in local])
            theta = merged_model(rule, theta, local, server_lr=1.0)
            theta = {k: theta[k].clone() for k in base}
            history.append(_scores(fed, theta, "test", own_test)[0])
        rounds[normaliser] = {"normalized_accuracy": history[-1], "history": history}
    return {
        "study": NAME, "key": cell_key(recipe, seed), "recipe": recipe, "seed": seed, "suite": SUITE, "clients": CLIENTS,
        "rounds": ROUNDS, "optimizer": RECIPES[recipe][0], "description": RECIPES[recipe][3],
        "training": recipe_training(recipe), "tasks": [t.name for t in fed.tasks],
        "lr": [c.lr for c in configs], "steps": steps, "lr_sum": lr_sums, "norm": norms,
        "theta0_accuracy": theta0_test, "own_accuracy": own_test,
        "one_shot": one_shot, "multi_round": rounds, "seconds": round(time.perf_counter() - started, 2),
    }


def run_study(work: Path, seeds: Sequence[int] = SEEDS, recipes: Sequence[str] = tuple(RECIPES),
              log: Callable[[str], None] = print) -> Path:
    """Run every (recipe, seed) cell not already in ``work/fednova-update-size/cells``; returns that folder."""
    folder = Path(work) / NAME / "cells"
    todo = [(r, s) for r in recipes for s in seeds]
    for i, (recipe, seed) in enumerate(todo, 1):
        path = folder / f"{recipe}-seed{seed}.json"
        if path.exists():
            try:
                if json.loads(path.read_text()).get("key") == cell_key(recipe, seed):
                    continue
            except (OSError, ValueError):
                pass  # unreadable: computed again
        cell = run_cell(recipe, seed)
        write_file(path, json.dumps(cell, indent=1))
        log(f"[{NAME} {i}/{len(todo)}] {recipe}, seed {seed}: {cell['seconds']:.1f} s")
    return folder
