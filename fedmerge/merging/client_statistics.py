"""The statistics some rules need from each client beside its task vector, checked against the model (metadata only).

Fisher merging takes each client's diagonal Fisher (one tensor per parameter, in its shape), RegMean the Gram matrix
of each linear layer's inputs (under the layer's weight name, in × in for a weight of out × in). Each client's are a
name → tensor mapping (an ArrayRecord's tensors, a checkpoint file, a dict), read a chunk or a tensor at a time as the
merge needs them, like the task vectors. The client contract names them by the same keys
(:data:`fedmerge.contract.MERGING_STATISTICS`).
"""

from collections.abc import Callable, Sequence

import torch

from fedmerge.errors import FedmergeError
from fedmerge.merging.method import Param
from fedmerge.merging.tensors import TaskVector, Tensors
from fedmerge.merging.validate import describe, spec_of
from fedmerge.options import Option, positive_int

Shape = tuple[int, ...]

FISHER = "fisher"
"""Each client's diagonal Fisher (Fisher merging): the key of its statistics, the rule's keyword for them."""
GRAMS = "grams"
"""Each client's input Gram matrices per linear layer (RegMean): the key of its statistics, the rule's keyword."""

EXAMPLES = Param(
    "examples",
    Option(
        256,
        "how many of its training examples each client's statistics average over "
        "(asked for in the train message; fewer where a client holds fewer)",
        positive_int,
    ),
    scope="strategy",
)
"""The size of the sample the clients compute their statistics on (256: FusionBench's default for both methods)."""


def client_labels(labels: Sequence[str] | None, present: Sequence[int]) -> list[str]:
    """How messages name each present client's statistics: the labels given (one per client), else ``client t``."""
    return [f"client {t}'s" if labels is None else labels[t] for t in present]


def check_finite(values: torch.Tensor, who: Sequence[str], what: str, name: str) -> None:
    """Raise naming the first client whose statistics in ``values`` (one row or matrix per client) hold NaN or ±inf."""
    finite = torch.isfinite(values.reshape(len(values), -1)).all(dim=1)
    if not bool(finite.all()):
        culprit = who[int((~finite).nonzero()[0])]
        raise FedmergeError(
            f"{culprit} {what} hold NaN or infinite values in tensor {name!r}; nothing was merged. "
            "Recompute them, or leave that client out."
        )


def check_count(statistics: Sequence[Tensors], num_clients: int, what: str) -> None:
    """One mapping of statistics per client."""
    if len(statistics) != num_clients:
        raise FedmergeError(
            f"{what}: {len(statistics)} given for {num_clients} clients; give one per client, in the clients' order."
        )


def covered(
    statistics: Sequence[Tensors],
    labels: Sequence[str],
    task_vectors: Sequence[Tensors],
    names: Sequence[str],
    what: str,
    shape_of: Callable[[Shape], Shape | None],
) -> set[str]:
    """The merged tensors (``names``) the clients' statistics cover, after checking that every client's cover the same
    ones, each in the shape ``shape_of(the tensor's shape)`` (None: no statistic fits that tensor), and that they cover
    some where some fit. Statistics of other tensors (a client's own head, which is not merged) are ignored."""
    first = task_vectors[0]
    model = describe(first.base if isinstance(first, TaskVector) else first)
    merged = set(names)

    def fitting(name: str) -> Shape | None:  # the shape of a statistic of tensor ``name``, None if none fits it
        shape, dtype = model[name]
        return shape_of(tuple(shape)) if getattr(dtype, "is_floating_point", False) else None

    found = None
    for label, stats in zip(labels, statistics):
        mine = {name for name in (getattr(stats, "specs", None) or stats) if name in merged}  # names from metadata
        for name in sorted(mine):
            expected, (got, got_dtype) = fitting(name), spec_of(stats, name)
            if expected is None or got != expected or not getattr(got_dtype, "is_floating_point", False):
                fits = "no statistic fits it" if expected is None else f"expected a floating tensor of shape {expected}"
                shape, dtype = model[name]
                raise FedmergeError(
                    f"{label} {what} hold {name!r} as {got_dtype} of shape {got}, but the model's "
                    f"tensor is {dtype} of shape {tuple(shape)}: {fits}."
                )
        if found is None:
            found = mine
        elif mine != found:
            name = sorted(mine ^ found)[0]
            raise FedmergeError(
                f"{label} {what} {'lack' if name in found else 'have'} tensor {name!r}, unlike the "
                "first client's; every client must send them for the same tensors."
            )
    could = [name for name in names if fitting(name) is not None]
    if could and not found:
        raise FedmergeError(
            f"the clients' {what} cover none of the merged tensors (such as {could[0]!r}); send them "
            "under the names of the model's tensors."
        )
    return found
