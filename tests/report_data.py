"""Small synthetic results directories in the format the runner writes (no Ray, no training)."""

import json
from pathlib import Path

import numpy as np


def history_entry(round_number, accuracy, clients, lr_sums):
    tasks = [{"task": f"mnist1d:task-{t}", "accuracy": accuracy, "normalized_accuracy": accuracy / 0.9, "loss": 1 - accuracy}
             for t in range(clients)]
    p = [1 / clients] * clients
    w = [a / sum(lr_sums) for a in lr_sums]
    entry = {"round": round_number, "tasks": tasks, "mean_accuracy": accuracy,
             "mean_normalized_accuracy": accuracy / 0.9, "mean_loss": 1 - accuracy}
    if round_number:
        entry["aggregation"] = {"server_round": round_number, "rule": {"rule": "fedavg"}, "server_lr": 1.0,
                                "client_ids": list(range(clients)), "weights": p, "effective_weights": w,
                                "effective_steps_key": "lr-sum", "task_vector_norms": [1.0] * clients,
                                "chi_square": float(sum((pi - wi) ** 2 / wi for pi, wi in zip(p, w)))}
    return entry


def results(seed=0, alpha=1.0, strategies=("fedavg", "median"), rounds=(1, 3), clients=3, lrs=None, corruption="none",
            shift=None):
    """One run's results; ``shift`` (strategy → number) moves a strategy's accuracies."""
    rng = np.random.default_rng(seed)
    lrs = lrs or [0.05] * clients
    steps = [100] * clients
    runs = []
    for r in rounds:
        for k, strategy in enumerate(strategies):
            base = 0.6 + 0.05 * np.log10(alpha) + 0.02 * k + 0.01 * rng.standard_normal() + (shift or {}).get(strategy, 0)
            history = [history_entry(0, 0.3, clients, [l * s for l, s in zip(lrs, steps)])] if r > 1 else []
            history += [history_entry(i, float(base + 0.02 * i), clients, [l * s for l, s in zip(lrs, steps)])
                        for i in range(1, r + 1)]
            runs.append({"strategy": strategy, "rounds": r, "selected": {"scaling": 0.4, "server_lr": 0.4 * clients},
                         "history": history, "final": history[-1]})
    cos = np.eye(clients) + 0.2 * (1 - np.eye(clients))
    return {
        "spec": {"name": "synthetic", "seed": seed, "clients": clients, "training": {"corruption": corruption}},
        "seed": seed,
        "suite": {"name": "mnist1d", "metric": "accuracy", "options": {"partition": "dirichlet", "alpha": alpha},
                  "tasks": [f"mnist1d:task-{t}" for t in range(clients)]},
        "pretrained": {"mean_accuracy": 0.3},
        "clients": [{"id": t, "task": f"mnist1d:task-{t}", "settings": {"lr": lrs[t], "steps": steps[t]},
                     "reply": {"num-steps": steps[t], "lr-sum": lrs[t] * steps[t]}} for t in range(clients)],
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


def write_grid(root, axis, levels, seeds=(0, 1, 2)) -> Path:
    """A sweep directory over one axis: ``levels`` maps each label to the keyword arguments of :func:`results`."""
    root = Path(root)
    cells = []
    for label, kwargs in levels.items():
        for seed in seeds:
            cell_id = f"{axis.split('.')[-1]}{label}-seed{seed}"
            write_run(root / "cells" / cell_id, seed=seed, **kwargs)
            cells.append({"id": cell_id, "dir": f"cells/{cell_id}", "complete": True,
                          "levels": {axis: label, "seed": str(seed)}})
    manifest = {"name": "synthetic-sweep", "axes": [
        {"name": axis, "keys": [axis], "labels": list(levels)},
        {"name": "seed", "keys": ["seed"], "labels": [str(s) for s in seeds]}], "cells": cells}
    (root / "sweep.json").write_text(json.dumps(manifest))
    return root
