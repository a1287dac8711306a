"""Checks of checkpoints: that fine-tuned ones fit their base (made before anything is merged or written), and that
a tensor holds finite values (what ``fedmerge merge`` and ``fedmerge evaluate`` refuse, the same way)."""

from collections.abc import Sequence

import torch

from fedmerge.errors import FedmergeError
from fedmerge.checkpoints.reader import Checkpoint, StoredTensors

ARCHITECTURE_KEYS = ("model_type", "architectures")


def _check_architecture(base: Checkpoint, model: Checkpoint) -> None:
    if base.config is None or model.config is None:
        return
    for key in ARCHITECTURE_KEYS:
        if key in base.config and key in model.config and base.config[key] != model.config[key]:
            raise FedmergeError(
                f"{model.path}: config.json says {key}={model.config[key]!r} but the base {base.path} says "
                f"{base.config[key]!r}; models of another architecture cannot be merged."
            )


def _check_names(base: Checkpoint, model: Checkpoint) -> None:
    missing = [name for name in base.specs if name not in model.specs]
    extra = [name for name in model.specs if name not in base.specs]
    if not (missing or extra):
        return
    if missing and extra:
        raise FedmergeError(
            f"{model.path}: its tensor names differ from the base {base.path}'s ({len(missing)} missing, e.g. "
            f"{missing[0]!r}; {len(extra)} extra, e.g. {extra[0]!r}); is it a model of another architecture? "
            "Every model must be a fine-tune of the base."
        )
    if missing:
        raise FedmergeError(
            f"{model.path}: tensor {missing[0]!r} is missing ({len(missing)} of the base's tensors are); every model "
            f"must hold all of the base {base.path}'s tensors."
        )
    raise FedmergeError(
        f"{model.path}: tensor {extra[0]!r} is not in the base {base.path} ({len(extra)} extra tensors); every "
        "model must hold exactly the base's tensors."
    )


def _check_specs(base: Checkpoint, model: Checkpoint) -> None:
    for name, spec in base.specs.items():
        other = model.specs[name]
        if other.shape != spec.shape:
            raise FedmergeError(
                f"{other.file}: tensor {name!r} has shape {list(other.shape)} but the base's ({spec.file}) has "
                f"{list(spec.shape)}; is it a model of another size or architecture?"
            )
        if other.dtype != spec.dtype:
            raise FedmergeError(
                f"{other.file}: tensor {name!r} is {other.dtype} but the base's ({spec.file}) is {spec.dtype}; "
                "convert the checkpoints to one dtype before merging."
            )


def check_compatible(base: Checkpoint, models: Sequence[Checkpoint]) -> None:
    """Raise :class:`FedmergeError` naming the file and tensor unless every model has the base's
    architecture (config.json, where both have one) and exactly its tensor names, shapes and dtypes."""
    if not models:
        raise FedmergeError("nothing to merge: give at least one fine-tuned model besides the base.")
    for model in models:
        _check_architecture(base, model)
        _check_names(base, model)
        _check_specs(base, model)


def finite(tensor: torch.Tensor) -> bool:
    """Whether ``tensor`` holds no NaN or ±inf (an integer tensor always does)."""
    return not tensor.is_floating_point() or bool(torch.isfinite(tensor).all())


def non_finite(checkpoint: StoredTensors, name: str, role: str | None = None) -> str:
    """The start of a refusal of ``checkpoint``'s tensor ``name`` for holding NaN or ±inf, naming its file (and the
    checkpoint's ``role``, e.g. "the base"); the caller adds what happened and the fix."""
    of = "" if role is None else f" of {role}"
    return f"{checkpoint.specs[name].file}: tensor {name!r}{of} holds NaN or infinite values"
