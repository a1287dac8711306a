"""The roles of a global model's tensors: merged by the rule, private to one client, or normalisation statistics.

Shared tensors are task vectors: the rule merges them and β scales the update. A private tensor (a client's own
head) is trained by one client alone: it is never merged, the new model carries it as its owner's reply had it,
and only its owner receives and sends it. Normalisation statistics (BatchNorm's running mean and variance, its
batch counter) are not task vectors either: the new model keeps the current ones (for re-estimation on the
clients' data, :mod:`fedmerge.strategies.statistics`) or takes the clients' weighted mean.
"""

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field

import numpy as np
import torch
from flwr.app import ArrayRecord

from fedmerge.errors import FedmergeError
from fedmerge.strategies.arrays import array_view, to_array

STATISTICS_SUFFIXES = ("running_mean", "running_var", "num_batches_tracked")
"""``statistics="auto"`` takes the tensors named so (torch's BatchNorm and InstanceNorm buffers) as statistics."""
STATISTICS_RULES = ("keep", "average")


@dataclass(frozen=True)
class TensorRoles:
    """``private``: tensor name → the id of the one client that trains it; ``statistics``: the names of the
    normalisation statistics, or "auto" (names ending in :data:`STATISTICS_SUFFIXES`)."""

    private: Mapping[str, int] = field(default_factory=dict)
    statistics: str | frozenset[str] = "auto"

    @classmethod
    def of(cls, private: Mapping[str, int] | None, statistics: str | Iterable[str]) -> "TensorRoles":
        """Checked roles from a strategy's arguments."""
        private = dict(private or {})
        bad = next(((n, c) for n, c in private.items() if isinstance(c, bool) or not isinstance(c, int) or c < 0), None)
        if bad is not None:
            raise FedmergeError(
                f"private maps tensor names to client ids (integers ≥ 0); {bad[0]!r} maps to {bad[1]!r}."
            )
        if isinstance(statistics, str):
            if statistics != "auto":
                raise FedmergeError(f"statistics must be 'auto' or a list of tensor names, got {statistics!r}.")
            return cls(private, "auto")
        return cls(private, frozenset(statistics))

    def is_statistic(self, name: str) -> bool:
        if name in self.private:
            return False
        if self.statistics == "auto":
            return name.rsplit(".", 1)[-1] in STATISTICS_SUFFIXES
        return name in self.statistics

    def merged(self, names: Iterable[str]) -> list[str]:
        """The names the rule merges: neither private nor statistics."""
        return [name for name in names if name not in self.private and not self.is_statistic(name)]

    def for_client(self, names: Iterable[str], client: int | None) -> list[str]:
        """What client ``client`` receives and sends: everything but the other clients' private tensors (all
        private ones are left out for a client not known yet)."""
        return [name for name in names if self.private.get(name, client) == client]


def subset(arrays: ArrayRecord, names: Sequence[str]) -> ArrayRecord:
    """The arrays ``names`` of ``arrays`` as a record of their own (no data is copied)."""
    return ArrayRecord({name: arrays[name] for name in names})


def assemble(
    global_arrays: ArrayRecord,
    merged: Mapping,
    replies: Sequence,
    roles: TensorRoles,
    statistics_rule: str,
    p: Sequence[float],
) -> ArrayRecord:
    """The new global model in ``global_arrays``' order: the rule's ``merged`` arrays; each private tensor from its
    owner's reply among ``replies`` (the accepted ones), else as it was; statistics kept (``keep``) or the
    p-weighted mean of the replies' (``average``: a variance stays non-negative, a counter is rounded)."""
    owners = {reply.client_id: reply for reply in replies}
    out = {}
    for name in global_arrays:
        if name in merged:
            out[name] = merged[name]
        elif name in roles.private:
            owner = owners.get(roles.private[name])
            out[name] = global_arrays[name] if owner is None else owner.arrays[name]
        elif statistics_rule == "average":
            out[name] = to_array(weighted_mean([array_view(r.arrays[name]) for r in replies], p))
        else:
            out[name] = global_arrays[name]
    return ArrayRecord(out)


def weighted_mean(tensors: Sequence[torch.Tensor], p: Sequence[float]) -> torch.Tensor:
    """Σ_t p_t x_t in float64, returned in the tensors' dtype (integers rounded)."""
    total = sum(float(w) * t.to(torch.float64) for w, t in zip(np.asarray(p, dtype=np.float64), tensors))
    dtype = tensors[0].dtype
    return total.to(dtype) if dtype.is_floating_point else torch.round(total).to(dtype)
