"""The shape of a merging rule and the driver that runs one over task vectors, chunk by chunk."""

import math
from collections.abc import Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import torch

from fedmerge.errors import FedmergeError
from fedmerge.merging.tensors import (
    Tensors, TaskVector, apply_update, chunk_of, chunk_size, chunks, is_floating, operand_dtype, operands, stacked,
)
from fedmerge.merging.validate import check_task_vectors
from fedmerge.merging.weights import client_weights
from fedmerge.threads import available_cores, single_threaded


class Rule:
    """A merging rule: an optional first pass over whole task vectors, then a function per chunk.

    Subclasses set ``name`` and implement :meth:`merge_chunk`; rules that need global quantities (norms)
    extend :meth:`prepare`. ``weights`` are raw client weights (e.g. example counts), ``None`` for uniform.
    A client of weight 0 is absent: the driver drops it before :meth:`prepare`, so ``p`` and every
    per-client quantity cover the ``present`` clients only.
    """

    name = "rule"

    def __init__(self, weights: Sequence[float] | None = None) -> None:
        self.weights = weights
        self.p: np.ndarray | None = None
        self.present: np.ndarray | None = None

    def present_clients(self, num_clients: int) -> np.ndarray:
        """Check the per-client parameters against ``num_clients``; return the indices of weight > 0."""
        self.present = np.flatnonzero(client_weights(self.weights, num_clients))
        return self.present

    def per_client(self, values: Sequence | None) -> list | None:
        """A per-client parameter (one value per client given) restricted to the present clients."""
        return values if values is None or self.present is None else [values[t] for t in self.present]

    def prepare(self, task_vectors: Sequence[Tensors], names: Sequence[str]) -> None:
        """First pass, before any tensor is merged. Resolves p_t; subclasses may add more."""
        self.p = client_weights(self.per_client(self.weights), len(task_vectors))

    def merge_chunk(self, name: str, s: slice, values: torch.Tensor, out: torch.Tensor) -> None:
        """Write Δ for the chunk ``s`` of tensor ``name`` into ``out``, from the T clients' τ chunks.

        ``values`` is a (T, n) matrix, row t client t's chunk, in scratch memory owned by the driver: the
        rule may overwrite it.
        """
        raise NotImplementedError

    def merge_integer(self, tensors: Sequence[torch.Tensor]) -> torch.Tensor:
        """Δ for an integer buffer (a counter): the p-weighted mean, rounded, as int64."""
        values = stacked(tensors, torch.float64)
        p = torch.as_tensor(self.p, dtype=torch.float64, device=values.device).view(-1, *([1] * (values.dim() - 1)))
        return torch.round((values * p).sum(0)).to(torch.int64)

    def params(self) -> dict:
        """The rule's parameters, for results and checkpoint metadata."""
        return {"rule": self.name}


def iter_merge(
    rule: Rule,
    task_vectors: Sequence[Tensors],
    names: Sequence[str] | None = None,
    squared_norms: np.ndarray | None = None,
) -> Iterator[tuple[str, torch.Tensor]]:
    """Yield ``(name, Δ)`` tensor by tensor; Δ is in the accumulation dtype (int64 for integer buffers).

    The entrance of the merging core: tensor names, shapes and dtypes are checked first, from metadata
    (:func:`~fedmerge.merging.validate.check_task_vectors`), and clients of weight 0 are dropped (never read).
    If ``squared_norms`` (length T) is given, each present client's ‖τ_t‖² over the floating tensors is
    added to it; a non-finite entry flags non-finite values. Each Δ is made on the device of the first
    client's tensor (a :class:`TaskVector`'s base θ); on the CPU the chunks of a tensor are shared among
    worker threads, each running torch single-threaded, and on an accelerator one thread runs them in order.
    """
    names = check_task_vectors(task_vectors, names)
    present = rule.present_clients(len(task_vectors))
    task_vectors = [task_vectors[t] for t in present]
    workers = available_cores()
    with ThreadPoolExecutor(workers) as pool:
        with single_threaded():
            rule.prepare(task_vectors, names)
        for name in names:
            ops = operands(task_vectors, name)
            if not is_floating(ops[0]):
                yield name, rule.merge_integer([op.to(torch.int64) for op in ops])
                continue
            with single_threaded():
                out, norms = _merge_floating(rule, name, ops, pool, workers)
            if squared_norms is not None:
                squared_norms[present] += norms
            yield name, out
            del out  # the caller holds it now; keep at most one Δ alive while the next tensor is read


def _merge_floating(
    rule: Rule, name: str, ops: list, pool: ThreadPoolExecutor, workers: int
) -> tuple[torch.Tensor, np.ndarray]:
    """Δ for one floating tensor, on the first operand's device, its chunks split into contiguous ranges, one
    per worker (one worker off the CPU); and each ‖τ_t‖²."""
    dtype, device = operand_dtype(ops[0]), ops[0].device
    out = torch.empty(ops[0].shape, dtype=dtype, device=device)
    flat_out = out.view(-1)
    size = chunk_size(device)
    slices = list(chunks(flat_out.numel(), size))
    workers = min(workers if device.type == "cpu" else 1, len(slices))
    ranges = [slices[k * len(slices) // workers : (k + 1) * len(slices) // workers] for k in range(workers)]

    def work(part: list[slice]) -> np.ndarray:
        scratch = torch.empty(len(ops), min(size, flat_out.numel()), dtype=dtype, device=device)
        norms = torch.zeros(len(ops), dtype=torch.float64, device=device)
        for s in part:
            values = scratch[:, : s.stop - s.start]
            for op, row in zip(ops, values):
                chunk_of(op, s, row)
            norms += torch.linalg.vector_norm(values, dim=1).to(torch.float64) ** 2
            rule.merge_chunk(name, s, values, flat_out[s])
        return norms.cpu().numpy()  # T numbers, once per tensor

    parts = [work(ranges[0])] if workers == 1 else list(pool.map(work, ranges))
    return out, np.sum(parts, axis=0)


def merge(rule: Rule, task_vectors: Sequence[Tensors]) -> dict[str, torch.Tensor]:
    """Δ = the rule over the task vectors, each tensor in the dtype the first task vector gives it."""
    deltas = dict(iter_merge(rule, task_vectors))
    return {name: delta.to(operands(task_vectors[:1], name)[0].dtype) for name, delta in deltas.items()}


def iter_merged_model(
    rule: Rule,
    base: Tensors,
    finetuned: Sequence[Tensors],
    server_lr: float = 1.0,
    names: Sequence[str] | None = None,
    squared_norms: np.ndarray | None = None,
) -> Iterator[tuple[str, torch.Tensor]]:
    """Yield ``(name, θ + β·Δ)`` tensor by tensor, with Δ the rule over τ_t = θ_t − θ, in θ's dtypes."""
    if not math.isfinite(server_lr):
        raise FedmergeError(f"server_lr (β) must be a finite number, got {server_lr!r}.")
    task_vectors = [TaskVector(model, base) for model in finetuned]
    for name, delta in iter_merge(rule, task_vectors, names, squared_norms):
        updated = apply_update(base[name], delta, server_lr)
        del delta
        yield name, updated


def merged_model(
    rule: Rule, base: Tensors, finetuned: Sequence[Tensors], server_lr: float = 1.0
) -> dict[str, torch.Tensor]:
    """θ + β·Δ as a dict; see :func:`iter_merged_model`."""
    return dict(iter_merged_model(rule, base, finetuned, server_lr))
