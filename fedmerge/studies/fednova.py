"""FedNova's normaliser and the size of the local updates: when does normalising by a_t help a merge, and when does it
hurt? Two studies of the same cells:

* ``fednova-update-size`` (exploratory): five recipes on seeds 0–4, the data mean-direction was designed on;
* ``fednova-held-out`` (confirmatory): recipes and seeds not used to design it, on which the page decides FedNova's
  default normaliser and tests mean-direction.

Every client fine-tunes θ0 with the real local trainer (:func:`fedmerge.clients.trainer.train`, the code the
ClientApp runs) under a *recipe*: a suite, an optimizer and geometric spreads of learning rates and of step counts
over the clients (client 0 first in both). The same task vectors are then merged by the merging core:

* ``none``: FedAvg (Task Arithmetic);
* ``steps``: FedNova with a_t = K_t, the step count;
* ``lr-sum``: FedNova with a_t = Σ_k η_t^(k), the sum of the learning rates;
* ``mean-direction``: :class:`~fedmerge.merging.MeanDirectionRule`, each update at unit norm, the merge at their mean
  norm (not FedNova's a_t: the update's own norm in place of the client's work).

Rules merge the suite's shared tensors only; each client's private head stays as that client trained it (over
rounds, a client starts each round from the merged shared tensors and its own head). One-shot: each method's λ
chosen on the validation splits from the search grid of :mod:`fedmerge.merging.scale`, normalized accuracy on
test. Over rounds: R rounds from θ0, each client doing K_t / R of its steps per round (the same local compute),
β = 1, normalised by that round's a_t. This runs in this process (no Ray): the one-shot replies the simulation
would collect are exactly these (same trainer, same seeds).

Results go to ``<work>/<study>/cells/<recipe>-seed<k>.json`` (one per recipe and seed, written atomically), keyed by
what made them, the code's fingerprint included: a cell is reused only while its key is unchanged.
"""

from __future__ import annotations

import hashlib
import json
import math
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch

from fedmerge.clients.app import round_steps
from fedmerge.clients.settings import client_table
from fedmerge.clients.trainer import total_steps, train
from fedmerge.errors import FedmergeError
from fedmerge.files import remove, write_file
from fedmerge.merging import METHODS, FedAvgRule, FedNovaRule, MeanDirectionRule, merged_model
from fedmerge.merging.rules.fednova import DEFAULT_NORMALIZE_BY
from fedmerge.merging.scale import search_grid
from fedmerge.report.workfolder import HELD_OUT as HELD_OUT_NAME
from fedmerge.report.workfolder import UPDATE_SIZE as UPDATE_SIZE_NAME
from fedmerge.report.workfolder import cells_dir
from fedmerge.studies.fingerprint import code_fingerprint
from fedmerge.tasks import load_suite

CLIENTS, ROUNDS, BATCH = 4, 5, 32
NORMALISERS = ("none", "steps", "lr-sum", "mean-direction")
METHOD_OF = {"none": "fedavg", "steps": "fednova", "lr-sum": "fednova", "mean-direction": "mean-direction"}


@dataclass(frozen=True)
class Recipe:
    """How the clients train: optimizer, schedule, and geometric spreads of learning rates and steps (client 0 first)."""

    optimizer: str
    lr: tuple[float, float]
    steps: tuple[int, int]
    description: str
    suite: str = "digits"
    options: Mapping = field(default_factory=dict)
    schedule: str = "constant"

    def training(self) -> dict:
        return {
            "optimizer": self.optimizer,
            "schedule": self.schedule,
            "lr": {"geometric": list(self.lr)},
            "steps": {"geometric": list(self.steps)},
            "batch_size": BATCH,
        }


@dataclass(frozen=True)
class Study:
    name: str
    recipes: Mapping[str, Recipe]
    seeds: tuple[int, ...]
    role: str


UPDATE_SIZE = Study(
    UPDATE_SIZE_NAME,
    {
        "sgd-small": Recipe("sgd", (0.0025, 0.04), (25, 400), "SGD, small learning rates and few steps"),
        "sgd-large": Recipe("sgd", (0.0125, 0.2), (75, 1200), "SGD, large learning rates and many steps"),
        "momentum-large": Recipe(
            "momentum", (0.00625, 0.1), (75, 1200), "SGD with momentum 0.9: the claim-2 study's recipe"
        ),
        "adamw-small": Recipe(
            "adamw", (1e-5, 1.6e-4), (75, 1200), "AdamW at a small learning rate (the paper's 1e-5 CLIP recipe, scaled)"
        ),
        "adamw-large": Recipe("adamw", (2.5e-4, 4e-3), (75, 1200), "AdamW at a usual learning rate"),
    },
    tuple(range(5)),
    "exploratory: the recipes and seeds mean-direction was designed on",
)
HELD_OUT = Study(
    HELD_OUT_NAME,
    {
        "crossed-momentum": Recipe(
            "momentum",
            (0.08, 0.01),
            (50, 400),
            "SGD with momentum, learning rates falling as "
            "steps rise, 8x spreads (client 0: largest rate, fewest steps; equal Σ lr)",
        ),
        "adamw-cosine": Recipe(
            "adamw", (1e-4, 8e-4), (100, 800), "AdamW with a cosine schedule, 8x spreads", schedule="cosine"
        ),
        "mnist1d-tasks-adamw": Recipe(
            "adamw",
            (1e-3, 8e-3),
            (100, 800),
            "AdamW on mnist1d transform tasks (a private head each; width 128, θ0 pretrained 50 steps)",
            suite="mnist1d",
            options={"partition": "tasks", "hidden": 128, "pretrain_steps": 50},
        ),
    },
    tuple(range(5, 10)),
    "confirmatory: recipes and seeds not used to design mean-direction",
)
STUDIES = {study.name: study for study in (UPDATE_SIZE, HELD_OUT)}


def code() -> str:
    """The fingerprint of the code a cell runs (:mod:`fedmerge.studies.fingerprint`, plus this module)."""
    return code_fingerprint("studies/fednova.py")


def cell_key(recipe: Recipe, seed: int, fingerprint: str) -> str:
    """What a cached cell was computed from: another recipe, seed, round count or code is computed again."""
    text = json.dumps(
        {
            "recipe": asdict(recipe),
            "clients": CLIENTS,
            "rounds": ROUNDS,
            "seed": seed,
            "normalisers": NORMALISERS,
            "code": fingerprint,
        },
        sort_keys=True,
        default=dict,
    )
    return hashlib.sha256(text.encode()).hexdigest()[:12]


def rule_for(normaliser: str, steps: Sequence[float], lr_sums: Sequence[float]):
    """The merging rule of a normaliser, given this round's step counts and learning-rate sums."""
    if normaliser == "mean-direction":
        return MeanDirectionRule()
    a = {"none": None, "steps": steps, "lr-sum": lr_sums}[normaliser]
    return FedAvgRule() if a is None else FedNovaRule([float(x) for x in a])


def norm(model: Mapping[str, torch.Tensor], base: Mapping[str, torch.Tensor]) -> float:
    """‖model − base‖ over ``base``'s tensors (the shared ones)."""
    return float(torch.sqrt(sum(((model[k].double() - base[k].double()) ** 2).sum() for k in base)))


class Clients:
    """The suite's clients under one recipe and seed: who owns which tensor, and training from a merged state."""

    def __init__(self, recipe: Recipe, seed: int) -> None:
        self.fed = fed = load_suite(recipe.suite, CLIENTS, recipe.options, seed)
        if fed.statistics_names:
            raise FedmergeError(
                f"the FedNova study merges task vectors only; suite {recipe.suite!r} has normalisation "
                "statistics to re-estimate: use a suite without BatchNorm."
            )
        self.shared = list(fed.shared_names)
        self.owned = [[k for k, owner in fed.private_names.items() if owner == t] for t in range(CLIENTS)]
        self.configs = client_table(recipe.training(), CLIENTS, seed)
        self.totals = [total_steps(c, len(task.train)) for c, task in zip(self.configs, fed.tasks)]
        self.theta0 = {k: fed.pretrained[k].clone() for k in self.shared}
        self.heads0 = [{k: fed.pretrained[k].clone() for k in names} for names in self.owned]

    def train(self, theta: Mapping, heads: Sequence[Mapping], chunks: Sequence[tuple[int, int]]):
        """Each client trains its chunk (first step, steps) from the shared ``theta`` and its own head; returns the
        clients' shared tensors, their heads and the trainer's results."""
        shared, new_heads, results = [], [], []
        for t, (config, task, (first, steps)) in enumerate(zip(self.configs, self.fed.tasks, chunks)):
            model = self.fed.model_from({**theta, **heads[t]}, "cpu")
            results.append(train(model, task, self.fed.loss, config, first_step=first, num_steps=steps, head=task.head))
            state = model.state_dict()
            shared.append({k: state[k].detach().clone() for k in self.shared})
            new_heads.append({k: state[k].detach().clone() for k in self.owned[t]})
        return shared, new_heads, results

    def accuracies(self, theta: Mapping, heads: Sequence[Mapping], split: str) -> list[float]:
        """Each task's accuracy of the model with the shared ``theta`` and every client's own head."""
        model = self.fed.model_from({**theta, **{k: v for h in heads for k, v in h.items()}}, "cpu")
        return [self.fed.evaluate(model, task, split)["accuracy"] for task in self.fed.tasks]


def normalized(accuracies: Sequence[float], own: Sequence[float]) -> float:
    """Mean over tasks of accuracy / own accuracy; −∞ when a task diverged (never selected)."""
    value = float(np.mean([a / o for a, o in zip(accuracies, own)]))
    return value if math.isfinite(value) else -math.inf


def one_shot(clients: Clients, models, heads, results, own_val, own_test) -> dict:
    """Every normaliser's merge of the same task vectors, its λ chosen on validation; test figures at the choice."""
    steps, lr_sums = [r.num_steps for r in results], [r.lr_sum for r in results]
    theta0, out = clients.theta0, {}
    for normaliser in NORMALISERS:
        merged = merged_model(rule_for(normaliser, steps, lr_sums), theta0, models, server_lr=1.0)
        delta = {k: merged[k] - theta0[k] for k in theta0}
        best = None
        for scaling, beta in search_grid(CLIENTS, METHODS[METHOD_OF[normaliser]].scale):
            state = {k: theta0[k] + beta * delta[k] for k in theta0}
            score = normalized(clients.accuracies(state, heads, "val"), own_val)
            if best is None or score > best[0]:
                best = (score, scaling, beta, state)
        accuracies = clients.accuracies(best[3], heads, "test")
        out[normaliser] = {
            "scaling": best[1],
            "server_lr": best[2],
            "val": best[0],
            "normalized_accuracy": normalized(accuracies, own_test),
            "task_accuracy": accuracies,
        }
    return out


def multi_round(clients: Clients, own_test) -> dict:
    """Every normaliser over R rounds from θ0 (β = 1), the clients splitting their steps evenly over the rounds."""
    out = {}
    for normaliser in NORMALISERS:
        theta, heads, history = dict(clients.theta0), clients.heads0, []
        for r in range(1, ROUNDS + 1):
            chunks = [round_steps(total, r, ROUNDS, True) for total in clients.totals]
            local, heads, results = clients.train(theta, heads, chunks)
            rule = rule_for(normaliser, [x.num_steps for x in results], [x.lr_sum for x in results])
            theta = merged_model(rule, theta, local, server_lr=1.0)
            history.append(normalized(clients.accuracies(theta, heads, "test"), own_test))
        out[normaliser] = {"normalized_accuracy": history[-1], "history": history}
    return out


def run_cell(study: Study, recipe_name: str, seed: int, fingerprint: str) -> dict:
    """One recipe and seed: the clients' updates, every normaliser's one-shot merge and its R-round run."""
    started = time.perf_counter()
    recipe = study.recipes[recipe_name]
    clients = Clients(recipe, seed)
    fed = clients.fed
    models, heads, results = clients.train(clients.theta0, clients.heads0, [(0, total) for total in clients.totals])
    own = {
        split: [
            fed.evaluate(fed.model_from({**m, **h}, "cpu"), task, split)["accuracy"]
            for m, h, task in zip(models, heads, fed.tasks)
        ]
        for split in ("val", "test")
    }
    return {
        "study": study.name,
        "key": cell_key(recipe, seed, fingerprint),
        "code": fingerprint,
        "recipe": recipe_name,
        "seed": seed,
        "suite": recipe.suite,
        "options": dict(recipe.options),
        "clients": CLIENTS,
        "rounds": ROUNDS,
        "optimizer": recipe.optimizer,
        "schedule": recipe.schedule,
        "description": recipe.description,
        "training": recipe.training(),
        "tasks": [t.name for t in fed.tasks],
        "evaluation": {split: [len(task.split(split)) for task in fed.tasks] for split in ("val", "test")},
        "tensors": {"shared": len(clients.shared), "private": len(fed.private_names)},
        "lr": [c.lr for c in clients.configs],
        "steps": [r.num_steps for r in results],
        "lr_sum": [r.lr_sum for r in results],
        "norm": [norm(m, clients.theta0) for m in models],
        "theta0_accuracy": clients.accuracies(clients.theta0, clients.heads0, "test"),
        "own_accuracy": own["test"],
        "one_shot": one_shot(clients, models, heads, results, own["val"], own["test"]),
        "multi_round": multi_round(clients, own["test"]),
        "shipped_default": DEFAULT_NORMALIZE_BY,
        "seconds": round(time.perf_counter() - started, 2),
    }


def _reusable(path: Path, key: str) -> bool:
    try:
        return json.loads(path.read_text()).get("key") == key
    except (OSError, ValueError):
        return False  # missing or unreadable: computed again


def run_study(
    work: Path,
    study: Study,
    recipes: Sequence[str] | None = None,
    seeds: Sequence[int] | None = None,
    log: Callable[[str], None] = print,
    fingerprint: str | None = None,
) -> Path:
    """Run the (recipe, seed) cells of ``study`` (all, or the given ones) whose cached cell under
    ``work/<study>/cells`` was made by other code or settings, and remove the cells of recipes or seeds the study no
    longer has. ``fingerprint``: the code's, as taken when the run began (default: now). Returns that folder."""
    folder = cells_dir(work, study.name)
    fingerprint = fingerprint or code()
    design = {f"{r}-seed{s}.json" for r in study.recipes for s in study.seeds}
    for path in folder.glob("*.json"):
        if path.name not in design:
            remove(path)
    todo = [(r, s) for r in (recipes or study.recipes) for s in (study.seeds if seeds is None else seeds)]
    for i, (recipe, seed) in enumerate(todo, 1):
        path = folder / f"{recipe}-seed{seed}.json"
        if _reusable(path, cell_key(study.recipes[recipe], seed, fingerprint)):
            continue
        cell = run_cell(study, recipe, seed, fingerprint)
        write_file(path, json.dumps(cell, indent=1))
        log(f"[{study.name} {i}/{len(todo)}] {recipe}, seed {seed}: {cell['seconds']:.1f} s")
    return folder
