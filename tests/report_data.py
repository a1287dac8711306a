"""Small synthetic results directories in the format the runner writes (no Ray, no training)."""

import json
from pathlib import Path

import numpy as np

THETA0, OWN = 0.3, 0.9
"""θ0's accuracy and each client's own model's accuracy on every task (normalized accuracy = accuracy / OWN)."""
SCALES = {"median": "mean", "ties": "mean", "cclip": "mean"}
GRID = [round(0.05 * k, 2) for k in range(1, 41)]


def summary(accuracy, clients, diverged=False):
    """An evaluation summary over ``clients`` tasks; ``diverged``: every task's outputs non-finite (means null)."""
    names = [f"mnist1d:task-{t}" for t in range(clients)]
    if diverged:
        return {
            "tasks": [{"task": n, "loss": None, "accuracy": None, "diverged": True} for n in names],
            "diverged": names,
            "mean_accuracy": None,
            "mean_normalized_accuracy": None,
            "mean_loss": None,
        }
    tasks = [
        {"task": n, "accuracy": accuracy, "normalized_accuracy": accuracy / OWN, "loss": 1 - accuracy} for n in names
    ]
    return {
        "tasks": tasks,
        "mean_accuracy": accuracy,
        "mean_normalized_accuracy": accuracy / OWN,
        "mean_loss": 1 - accuracy,
    }


def history_entry(round_number, accuracy, clients, lr_sums, diverged=False):
    p = [1 / clients] * clients
    w = [a / sum(lr_sums) for a in lr_sums]
    entry = {"round": round_number, **summary(accuracy, clients, diverged)}
    if round_number:
        entry["aggregation"] = {
            "server_round": round_number,
            "rule": {"rule": "fedavg"},
            "server_lr": 1.0,
            "client_ids": list(range(clients)),
            "weights": p,
            "effective_weights": w,
            "effective_steps_key": "lr-sum",
            "task_vector_norms": [1.0] * clients,
            "chi_square": float(sum((pi - wi) ** 2 / wi for pi, wi in zip(p, w))),
        }
    return entry


def strategy_run(strategy, rounds, base, clients, lr_sums, scaling, diverged=False):
    """One strategy's run: one-shot runs record the method's own λ, its scale, β and what the search tried."""
    history = [history_entry(0, THETA0, clients, lr_sums)] if rounds > 1 else []
    history += [
        history_entry(i, float(base + 0.02 * i), clients, lr_sums, diverged and i == rounds)
        for i in range(1, rounds + 1)
    ]
    scale = SCALES.get(strategy, "sum")
    if rounds > 1:
        return {
            "strategy": strategy,
            "rounds": rounds,
            "selected": {"server_lr": 1.0},
            "history": history,
            "final": history[-1],
        }
    selected = {
        "scaling": scaling,
        "server_lr": scaling * (clients if scale == "sum" else 1),
        "val_score": base,
        "scale": scale,
    }
    searched = {"scaling": GRID}
    if strategy == "fedgma":
        selected["threshold"] = selected["rho"] = 0.3
        searched["threshold"] = [0.1, 0.3, 0.5]
    return {
        "strategy": strategy,
        "rounds": 1,
        "selected": selected,
        "searched": searched,
        "selection": [],
        "history": history,
        "final": history[-1],
    }


def put(table, dotted, value, replace=True):
    """Set ``table``'s dotted key (``training.lr``), creating the tables on the way (unless ``replace`` is false and it
    is set already)."""
    *path, last = dotted.split(".")
    for key in path:
        table = table.setdefault(key, {})
    if replace or last not in table:
        table[last] = value


def results(
    seed=0,
    alpha=1.0,
    strategies=("fedavg", "median"),
    rounds=(1, 3),
    clients=3,
    lrs=None,
    corruption="none",
    shift=None,
    settings=None,
    diverged=(),
    weak=(),
    started="2026-01-01T00:00:00",
):
    """One run's results. ``shift`` (strategy → number) moves a strategy's accuracies; ``settings`` (dotted spec key →
    value) adds to the spec; ``diverged`` strategies end with non-finite outputs; ``weak`` clients' own models are no
    better than θ0 on their tasks."""
    rng = np.random.default_rng(seed)
    lrs = lrs or [0.05] * clients
    steps = [100] * clients
    lr_sums = [lr * k for lr, k in zip(lrs, steps)]
    runs = []
    for r in rounds:
        for k, strategy in enumerate(strategies):
            base = (
                0.6 + 0.05 * np.log10(alpha) + 0.02 * k + 0.01 * rng.standard_normal() + (shift or {}).get(strategy, 0)
            )
            scaling = GRID[int(rng.integers(4, 12))]
            runs.append(strategy_run(strategy, r, base, clients, lr_sums, scaling, strategy in diverged))
    cos = np.eye(clients) + 0.2 * (1 - np.eye(clients))
    spec = {
        "name": "synthetic",
        "seed": seed,
        "clients": clients,
        "strategies": list(strategies),
        "rounds": list(rounds),
        "suite_options": {"partition": "dirichlet", "alpha": alpha},
        "training": {"lr": lrs, "corruption": corruption},
    }
    for key, value in (settings or {}).items():
        put(spec, key, value)
    pretrained = summary(THETA0, clients)
    return {
        "spec": spec,
        "seed": seed,
        "started": started,
        "suite": {
            "name": "mnist1d",
            "metric": "accuracy",
            "options": {"partition": "dirichlet", "alpha": alpha},
            "tasks": [f"mnist1d:task-{t}" for t in range(clients)],
        },
        "tensors": {"shared": 4, "private": clients * 2, "statistics": 0},
        "statistics": None,
        "lora": None,
        "pretrained": pretrained,
        "clients": [
            {
                "id": t,
                "task": f"mnist1d:task-{t}",
                "settings": {"lr": lrs[t], "steps": steps[t]},
                "reply": {"num-steps": steps[t], "lr-sum": lr_sums[t]},
                "own": {"test": {"accuracy": THETA0 - 0.01 if t in weak else OWN, "loss": 0.1}},
                "own_above_theta0": t not in weak,
            }
            for t in range(clients)
        ],
        "diagnostics": {"task_vector_norms": [1.0] * clients, "cosine_similarity": cos.tolist(), "zeta2": 1 / alpha},
        "runs": runs,
        "timings": {"total": 1.0},
    }


def write_run(path, **kwargs) -> Path:
    path = Path(path)
    path.mkdir(parents=True)
    (path / "results.json").write_text(json.dumps(results(**kwargs)))
    return path


def write_sweep(root, alphas=(0.1, 1.0, 10.0), seeds=(0, 1, 2)) -> Path:
    return write_grid(root, "suite_options.alpha", {f"{a:g}": {"alpha": a} for a in alphas}, seeds)


def write_grid(root, axis, levels, seeds=(0, 1, 2), more=None) -> Path:
    """A sweep directory over ``axis`` (and the ``more`` axes, axis → labels, crossed): ``levels`` maps each label to the
    keyword arguments of :func:`results`. A cell's spec holds its level (as the label unless the arguments set it)."""
    root = Path(root)
    axes = {axis: list(levels), **(more or {})}
    cells = []
    for combination in np.ndindex(*(len(labels) for labels in axes.values())):
        chosen = {name: labels[i] for (name, labels), i in zip(axes.items(), combination)}
        for seed in seeds:
            data = results(seed=seed, **levels[chosen[axis]])
            for name, label in chosen.items():
                put(data["spec"], name, label, replace=False)
            cell_id = "-".join(f"{name.split('.')[-1]}{label}" for name, label in chosen.items()) + f"-seed{seed}"
            (root / "cells" / cell_id).mkdir(parents=True)
            (root / "cells" / cell_id / "results.json").write_text(json.dumps(data))
            cells.append(
                {"id": cell_id, "dir": f"cells/{cell_id}", "complete": True, "levels": {**chosen, "seed": str(seed)}}
            )
    manifest = {
        "name": "synthetic-sweep",
        "axes": [
            *({"name": name, "keys": [name], "labels": labels} for name, labels in axes.items()),
            {"name": "seed", "keys": ["seed"], "labels": [str(s) for s in seeds]},
        ],
        "cells": cells,
    }
    (root / "sweep.json").write_text(json.dumps(manifest))
    return root
