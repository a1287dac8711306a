"""FedNova's a_t from each model's ``trainer_state.json`` (what Hugging Face's Trainer saves beside a model).

Two readings, chosen by ``trainer_state`` (``fedmerge merge --trainer-state``):

- ``steps``: a_t = ``global_step``, the optimizer steps the model was trained for (with gradient accumulation,
  one per accumulated batch).
- ``lr-sum``: a_t = Σ_{k=1}^{G} η(k), G = ``global_step``, where η is the learning rate logged in
  ``log_history`` (its entries holding both ``step`` and ``learning_rate``; a step logged twice keeps its last
  value) interpolated linearly between logging points at every integer step and held at the first (last)
  logged value before (after) them: ``numpy.interp(range(1, G + 1), steps, rates).sum()``. transformers logs at
  step s the rate that step s used (read before the scheduler steps), so with ``logging_steps=1`` this is the
  exact sum, and between logging points it is exact for linear schedules (warm-up and linear decay), a
  trapezoid rule for others. (transformers 4.x logged the rate after the scheduler's step, the next step's:
  a shift of one step.)

Values given by the caller (``steps`` or ``lr_sums``; ``--steps``, ``--lr-sums``)
win: trainer_state.json is read only when none is given, and then as ``steps`` unless ``lr-sum`` is asked for.
"""

import math
import os
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from fedmerge.checkpoints.reader import read_json_object
from fedmerge.errors import FedmergeError

TRAINER_STATE = "trainer_state.json"
CHOICES = ("steps", "lr-sum")
GIVEN = {"steps": "--steps", "lr_sums": "--lr-sums"}
SOURCES = {"steps": "trainer_state.json global_step", "lr-sum": "trainer_state.json log_history learning_rate sum"}


def state_file(model: str | os.PathLike) -> Path | None:
    """``trainer_state.json`` in the model's directory, if it is a directory holding one."""
    path = Path(model) / TRAINER_STATE
    return path if path.is_file() else None


def read_state(path: Path) -> dict:
    return read_json_object(path, "Hugging Face trainer state")


def global_step(state: dict, path: Path) -> int:
    """The state's ``global_step``: a positive integer, else :class:`FedmergeError` naming the file."""
    step = state.get("global_step")
    if isinstance(step, bool) or not isinstance(step, (int, float)) or step != int(step) or step < 1:
        raise FedmergeError(f"{path}: global_step is {step!r}, not a positive step count; the model was not trained "
                            "by this Trainer run, or give FedNova's a_t with --steps or --lr-sums.")
    return int(step)


def lr_sum(state: dict, path: Path) -> float:
    """Σ_{k=1}^{G} η(k) over the ``global_step`` G steps, η the logged learning rates interpolated linearly
    (see the module docstring)."""
    steps = global_step(state, path)
    history = state.get("log_history")
    logged: dict[int, float] = {}
    for entry in history if isinstance(history, list) else []:
        if not isinstance(entry, dict) or "learning_rate" not in entry:
            continue
        step, rate = entry.get("step"), entry["learning_rate"]
        if not all(isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) for v in (step, rate)):
            raise FedmergeError(f"{path}: a log_history entry has step {step!r} and learning_rate {rate!r}, not "
                                "finite numbers; repair the file or give --lr-sums.")
        logged[int(step)] = float(rate)
    if not logged:
        raise FedmergeError(f"{path}: its log_history holds no learning_rate, so the sum of learning rates is unknown; "
                            "use --trainer-state steps (its global_step), or give --lr-sums, one value per model.")
    points = sorted(logged.items())
    total = float(np.interp(np.arange(1, steps + 1), [s for s, _ in points], [r for _, r in points]).sum())
    if not total > 0:
        raise FedmergeError(f"{path}: the logged learning rates sum to {total} over {steps} steps, not a positive "
                            "a_t; use --trainer-state steps, or give --steps or --lr-sums.")
    return total


def effective_steps(models: Sequence[str | os.PathLike], params: dict, trainer_state: str | None) -> tuple[dict, str]:
    """FedNova's parameters with a_t resolved, and where a_t came from (for the output's metadata).

    ``params`` holding ``steps`` or ``lr_sums`` are returned as they are (given values win);
    otherwise a_t is read from every model's trainer_state.json, as ``trainer_state`` says (default ``steps``).
    Raises :class:`FedmergeError` when both are asked for, or when a model has no (usable) trainer state.
    """
    if trainer_state is not None and trainer_state not in CHOICES:
        raise FedmergeError(f"trainer_state (--trainer-state) must be one of {', '.join(CHOICES)}, got {trainer_state!r}.")
    given = [key for key in GIVEN if params.get(key) not in (None, False)]
    if given and trainer_state is not None:
        raise FedmergeError(f"give FedNova's a_t one way: {GIVEN[given[0]]} or --trainer-state {trainer_state}, not "
                            "both.")
    if given:
        return params, given[0]
    choice = trainer_state or "steps"
    files = [state_file(model) for model in models]
    missing = [str(model) for model, file in zip(models, files) if file is None]
    if missing:
        lack = f"{missing[0]} has none ({len(missing)} of {len(models)} models lack one)"
        ways = ("--steps (local step counts) or --lr-sums (sums of learning rates), one value per model (method "
                "'mean-direction' needs neither)")
        if trainer_state is not None:
            raise FedmergeError(f"--trainer-state {choice} reads each model's {TRAINER_STATE}, but {lack}; save the "
                                f"Trainer's state beside each model (trainer.save_state()), or give {ways}.")
        raise FedmergeError(f"method 'fednova' needs the models' effective steps a_t: {ways}; given none, each model "
                            f"directory's {TRAINER_STATE} (Hugging Face Trainer) is read, but {lack}.")
    states = [(read_state(file), file) for file in files]
    if choice == "steps":
        return {**params, "steps": [float(global_step(s, f)) for s, f in states]}, SOURCES[choice]
    return {**params, "lr_sums": [lr_sum(s, f) for s, f in states]}, SOURCES[choice]
