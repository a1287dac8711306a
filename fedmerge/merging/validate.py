"""The merging core's one entrance check: every client holds the base's tensor names, shapes and dtypes.

It reads metadata only: a mapping with a ``specs`` attribute (name → an object with ``shape`` and ``dtype``,
as :class:`fedmerge.checkpoints.Checkpoint` has) is described from it without reading any tensor.
"""

from collections.abc import Sequence

from fedmerge.errors import FedmergeError
from fedmerge.merging.tensors import OnDevice, Tensors, TaskVector


def describe(tensors: Tensors) -> dict[str, tuple[tuple[int, ...], object]]:
    """Every tensor's (shape, dtype), from metadata where the mapping has ``specs``."""
    return {name: spec_of(tensors, name) for name in tensors}


def spec_of(tensors: Tensors, name: str) -> tuple[tuple[int, ...], object]:
    """(shape, dtype) of ``tensors[name]``, from the mapping's ``specs`` where it has them (and from the mapping
    an :class:`OnDevice` wraps, so that looking is not a copy to the device)."""
    while isinstance(tensors, OnDevice):
        tensors = tensors.tensors
    specs = getattr(tensors, "specs", None)
    tensor = tensors[name] if specs is None else specs[name]
    return tuple(tensor.shape), tensor.dtype


def check_like(label: str, tensors: Tensors, expected: dict, reference: str, advice: str | None = None) -> None:
    """``tensors`` must hold exactly the names of ``expected`` (:func:`describe` of the reference), with its
    shapes and dtypes. The message names ``label``, the tensor and ``reference``, and ends with ``advice``
    (default: a hint per kind of mismatch)."""
    held = getattr(tensors, "specs", None) or tensors  # membership from metadata: a Mapping's `in` reads the tensor
    same_set = advice or f"every client must hold exactly {reference} tensors"
    missing = [name for name in expected if name not in held]
    if missing:
        raise FedmergeError(
            f"{label} lacks tensor {missing[0]!r} ({len(missing)} of {reference} tensors missing); {same_set}."
        )
    extra = [name for name in tensors if name not in expected]
    if extra:
        raise FedmergeError(
            f"{label} has tensor {extra[0]!r}, which is not among {reference} ({len(extra)} extra); {same_set}."
        )
    for name, (shape, dtype) in expected.items():
        got_shape, got_dtype = spec_of(tensors, name)
        if got_shape != shape:
            raise FedmergeError(
                f"{label}: tensor {name!r} has shape {got_shape} but {reference} has {shape}; "
                f"{advice or 'is it a model of another size or architecture?'}."
            )
        if got_dtype != dtype:
            raise FedmergeError(
                f"{label}: tensor {name!r} is {got_dtype} but {reference} is {dtype}; "
                f"{advice or 'give every model in one dtype'}."
            )


def check_center(center: Tensors, task_vectors: Sequence[Tensors], names: Sequence[str]) -> None:
    """A center (CCLIP's previous update) must hold every floating tensor to merge, in the model's shape."""
    first = task_vectors[0]
    reference = first.base if isinstance(first, TaskVector) else first
    for name in names:
        shape, dtype = spec_of(reference, name)
        if getattr(dtype, "is_floating_point", False) and (name not in center or tuple(center[name].shape) != shape):
            raise FedmergeError(
                f"the center lacks tensor {name!r} or holds it in another shape than the model's {shape}; "
                "give the previous round's update of the same model."
            )


def check_task_vectors(task_vectors: Sequence[Tensors], names: Sequence[str] | None = None) -> list[str]:
    """Check every client's tensor names, shapes and dtypes against the reference; return the names to merge.

    The reference is the first task vector's base if it is a :class:`TaskVector`, else the first task
    vector. ``names`` (default: all of the reference's) must be among the reference's tensors. Raises
    :class:`FedmergeError` naming the client and the tensor.
    """
    if not task_vectors:
        raise FedmergeError("nothing to merge: give at least one task vector (one client).")
    first = task_vectors[0]
    reference, what = (first.base, "the base's") if isinstance(first, TaskVector) else (first, "client 0's")
    expected = describe(reference)
    for t, tv in enumerate(task_vectors):
        if isinstance(tv, TaskVector):
            if tv.base is not reference:
                check_like(f"client {t}'s base", tv.base, expected, what)
            tv = tv.finetuned
        check_like(f"client {t}", tv, expected, what)
    if names is None:
        return list(expected)
    unknown = [name for name in names if name not in expected]
    if unknown:
        raise FedmergeError(f"tensor {unknown[0]!r} was asked for but is not among {what} tensors.")
    return list(names)
