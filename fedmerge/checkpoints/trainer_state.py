"""FedNova's a_t of checkpoints: given, or read from each model's ``trainer_state.json`` (what Hugging Face's Trainer
saves beside a model).

Two readings, one per normaliser (:data:`fedmerge.merging.rules.fednova.NORMALIZE_BY`):

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

One rule gives a_t for ``fedmerge merge`` and ``fedmerge evaluate`` (:func:`effective_steps`): by the normaliser asked
for, else by the one whose values are given, else by FedNova's default
(:data:`fedmerge.merging.rules.fednova.DEFAULT_NORMALIZE_BY`); its values as given, else read from every model's
trainer_state.json; else refused, naming the model and the ways to give them. Never a silent a_t = 1.
"""

import dataclasses
import math
import os
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from fedmerge.checkpoints.reader import read_json_object
from fedmerge.errors import FedmergeError
from fedmerge.merging.rules.fednova import DEFAULT_NORMALIZE_BY, NORMALIZE_BY

TRAINER_STATE = "trainer_state.json"
FLAGS = {"steps": "--steps", "lr-sum": "--lr-sums"}
SOURCES = {"steps": "trainer_state.json global_step", "lr-sum": "trainer_state.json log_history learning_rate sum"}
GIVE = "give --steps (local step counts) or --lr-sums (sums of learning rates), one value per model"
"""The ways to give a_t that every command has; a refusal ends with its command's (``ways``)."""


@dataclasses.dataclass(frozen=True)
class EffectiveSteps:
    """FedNova's a_t of every model: by ``normalize_by``, chosen for ``reason``; ``values`` from ``source`` (a flag
    or the trainer_state.json field read)."""

    normalize_by: str
    values: list[float]
    source: str
    reason: str

    def record(self) -> dict:
        """Where a_t came from, for results and merge metadata (the values are the rule's)."""
        return {
            "normalize_by": self.normalize_by,
            "normalize_by_reason": self.reason,
            "effective_steps_from": self.source,
        }

    def __str__(self) -> str:
        values = ", ".join(f"{a:g}" for a in self.values)
        return f"fednova: a_t by {self.normalize_by} ({self.reason}) from {self.source}: {values}"


def state_file(model: str | os.PathLike) -> Path | None:
    """``trainer_state.json`` in the model's directory, if it is a directory holding one."""
    path = Path(model) / TRAINER_STATE
    return path if path.is_file() else None


def read_state(path: Path) -> dict:
    return read_json_object(path, "Hugging Face trainer state")


def global_step(state: dict, path: Path, ways: str = GIVE) -> int:
    """The state's ``global_step``: a positive integer, else :class:`FedmergeError` naming the file (then ``ways``)."""
    step = state.get("global_step")
    number = isinstance(step, (int, float)) and not isinstance(step, bool) and math.isfinite(step)
    if not number or step != int(step) or step < 1:
        raise FedmergeError(
            f"{path}: global_step is {step!r}, not a positive step count (was the model trained by "
            f"this Trainer run?); {ways}."
        )
    return int(step)


def lr_sum(state: dict, path: Path, ways: str = GIVE) -> float:
    """Σ_{k=1}^{G} η(k) over the ``global_step`` G steps, η the logged learning rates interpolated linearly
    (see the module docstring)."""
    steps = global_step(state, path, ways)
    history = state.get("log_history")
    logged: dict[int, float] = {}
    for entry in history if isinstance(history, list) else []:
        if not isinstance(entry, dict) or "learning_rate" not in entry:
            continue
        step, rate = entry.get("step"), entry["learning_rate"]
        if not all(isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) for v in (step, rate)):
            raise FedmergeError(
                f"{path}: a log_history entry has step {step!r} and learning_rate {rate!r}, not "
                f"finite numbers; repair the file, or {ways}."
            )
        logged[int(step)] = float(rate)
    if not logged:
        raise FedmergeError(
            f"{path}: its log_history holds no learning_rate, so the sum of learning rates is unknown; {ways}."
        )
    points = sorted(logged.items())
    total = float(np.interp(np.arange(1, steps + 1), [s for s, _ in points], [r for _, r in points]).sum())
    if not total > 0:
        raise FedmergeError(
            f"{path}: the logged learning rates sum to {total} over {steps} steps, not a positive a_t; {ways}."
        )
    return total


def effective_steps(
    models: Sequence[str | os.PathLike],
    steps: Sequence[float] | None = None,
    lr_sums: Sequence[float] | None = None,
    asked: tuple[str, str] | None = None,
    ways: str = GIVE,
) -> EffectiveSteps:
    """FedNova's a_t of ``models``, by the normaliser ``asked`` (its name and who asked), else by the one whose
    values are given (``steps`` or ``lr_sums``, one per model), else by FedNova's default; its values as given,
    else read from every model's trainer_state.json.

    Raises :class:`FedmergeError` ending with ``ways`` (the caller's ways to give a_t) when the normaliser's values
    are neither given nor readable: another normaliser's values given, a model without trainer_state.json, or
    one that does not hold them.
    """
    given = {"steps": steps, "lr-sum": lr_sums}
    named = [by for by in NORMALIZE_BY if given[by] is not None]
    if asked is not None:
        by, reason = asked
    elif len(named) == 1:
        by, reason = named[0], f"only {FLAGS[named[0]]} given"
    else:
        by, reason = DEFAULT_NORMALIZE_BY, "FedNova's default"
    if given[by] is not None:
        return EffectiveSteps(by, [float(a) for a in given[by]], FLAGS[by], reason)
    if named:
        raise FedmergeError(
            f"FedNova's a_t by {by} ({reason}) needs {FLAGS[by]}, but {FLAGS[named[0]]} was given instead; {ways}."
        )
    missing = [str(model) for model in models if state_file(model) is None]
    if missing:
        raise FedmergeError(
            f"FedNova needs each model's effective steps a_t: {ways}. Given neither, a_t by {by} "
            f"({reason}) is read from each model directory's {TRAINER_STATE} (Hugging Face Trainer; "
            f"trainer.save_state() writes it), but {missing[0]} has none ({len(missing)} of "
            f"{len(models)} models lack one)."
        )
    return EffectiveSteps(by, from_trainer_state(models, by, ways), SOURCES[by], reason)


def from_trainer_state(models: Sequence[str | os.PathLike], normalize_by: str, ways: str = GIVE) -> list[float] | None:
    """Every model's a_t by ``normalize_by`` read from its trainer_state.json; None when some model has none. A file
    that does not hold it is refused, naming the file (then ``ways``)."""
    files = [state_file(model) for model in models]
    if None in files:
        return None
    read = global_step if normalize_by == "steps" else lr_sum
    return [float(read(read_state(file), file, ways)) for file in files]


MERGE_WAYS = (
    f"{GIVE}, or choose what each trainer_state.json gives with --trainer-state {'|'.join(NORMALIZE_BY)} "
    "(method 'mean-direction' needs no a_t)"
)
PARAMS = {"steps": "steps", "lr-sum": "lr_sums"}
"""FedNova's ``fedmerge merge`` parameter holding a_t, by normaliser."""


def fednova_params(
    models: Sequence[str | os.PathLike], params: dict, trainer_state: str | None
) -> tuple[dict, EffectiveSteps]:
    """``fedmerge merge``'s FedNova parameters with a_t resolved by :func:`effective_steps`, and that a_t.

    ``trainer_state`` (``--trainer-state``) asks for a normaliser read from trainer_state.json: refused beside
    given values.
    """
    if trainer_state is not None and trainer_state not in NORMALIZE_BY:
        raise FedmergeError(
            f"trainer_state (--trainer-state) must be one of {', '.join(NORMALIZE_BY)}, got {trainer_state!r}."
        )
    given = [FLAGS[by] for by, key in PARAMS.items() if params.get(key) is not None]
    if given and trainer_state is not None:
        raise FedmergeError(f"give FedNova's a_t one way: {given[0]} or --trainer-state {trainer_state}, not both.")
    asked = None if trainer_state is None else (trainer_state, f"--trainer-state {trainer_state}")
    steps = effective_steps(models, params.get("steps"), params.get("lr_sums"), asked, MERGE_WAYS)
    return {**params, PARAMS[steps.normalize_by]: steps.values}, steps
