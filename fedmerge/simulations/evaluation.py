"""How a global model is judged: every task's test (or validation) metric, normalised by the client's own.

Normalised accuracy of a merged model on task t is its accuracy on t divided by the accuracy of client t's
own fine-tuned model θ0 + τ_t on t (the paper's measure). Suites scored by loss (quadratic) report loss
and, where the suite knows its optima, distances to them.
"""

import math
from collections.abc import Mapping, Sequence

import numpy as np
import torch
from flwr.app import ArrayRecord

from fedmerge.merging import TaskVector
from fedmerge.merging.tensors import gram_matrix
from fedmerge.tasks import Federation


def state_dict(arrays: ArrayRecord) -> dict[str, torch.Tensor]:
    return arrays.to_torch_state_dict()


def evaluate(
    fed: Federation, arrays: ArrayRecord, split: str, own: Sequence[float] | None = None, device: str | None = None
) -> dict:
    """Per-task results on ``split`` and their means; ``normalized_accuracy`` when ``own`` accuracies are given.

    ``arrays`` may hold only the trained tensors (the rest is θ0's); the model runs on ``device`` (CPU default).
    """
    model = fed.model_from(state_dict(arrays), device)
    tasks = []
    for t, task in enumerate(fed.tasks):
        result = {"task": task.name, **fed.evaluate(model, task, split)}
        if own is not None and "accuracy" in result and own[t]:
            result["normalized_accuracy"] = result["accuracy"] / own[t]
        tasks.append(result)
    summary = {"tasks": tasks}
    if own is not None and None in own and any("normalized_accuracy" in r for r in tasks):
        summary["normalized_over"] = [r["task"] for r in tasks if "normalized_accuracy" in r]  # a client failed
    diverged = [r["task"] for r in tasks if r.get("diverged")]
    if diverged:
        summary["diverged"] = diverged  # non-finite outputs: its means are NaN, and selection never prefers it
    for key in ("accuracy", "normalized_accuracy", "loss"):
        values = [r[key] for r in tasks if key in r]
        if len(values) == len(tasks) or key == "normalized_accuracy" and "normalized_over" in summary:
            summary[f"mean_{key}"] = float(np.mean(values))
    optimum = fed.optimum()
    if optimum is not None:
        summary["distance_to_optimum"] = distance(arrays, optimum["theta"])
    return summary


def distance(arrays: ArrayRecord, target: Mapping[str, torch.Tensor] | torch.Tensor) -> float:
    """‖θ − target‖ over all floating tensors (a single tensor target means a one-tensor model)."""
    model = state_dict(arrays)
    if isinstance(target, torch.Tensor):
        target = {name: target.reshape(model[name].shape) for name in model}
    return float(np.sqrt(gram_matrix([TaskVector(model, target)], list(model))[0, 0]))


def score(summary: dict) -> float:
    """What selection maximises: mean normalised accuracy, else mean accuracy, else −mean loss; −∞ for a model
    whose outputs are not finite on some task."""
    if summary.get("diverged"):
        return -math.inf
    for key in ("mean_normalized_accuracy", "mean_accuracy"):
        if key in summary:
            return summary[key]
    return -summary["mean_loss"]
