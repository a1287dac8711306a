"""Tensor plumbing shared by every rule: lazy task vectors, accumulation dtypes, chunked passes.

Rules never see whole task vectors. The driver walks each tensor in cache-sized chunks, computes the
chunk of every client's τ_t = θ_t − θ right there, and hands the rule those chunks; so a rule over T
clients reads each input once and holds one output tensor plus T chunks.
"""

from collections.abc import Iterator, Mapping, Sequence

import numpy as np
import torch

Tensors = Mapping[str, torch.Tensor]

CHUNK = 1 << 18  # elements per chunk (1 MiB of float32): large enough to amortise Python, small enough to stay cached


def accumulation_dtype(dtype: torch.dtype) -> torch.dtype:
    """float64 stays float64; every other floating dtype accumulates in float32."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def chunks(numel: int, size: int = CHUNK) -> Iterator[slice]:
    """Consecutive slices covering ``range(numel)``."""
    for start in range(0, numel, size):
        yield slice(start, min(start + size, numel))


class Difference:
    """θ_t − θ for one tensor, produced chunk by chunk in the accumulation dtype (never held whole)."""

    def __init__(self, finetuned: torch.Tensor, base: torch.Tensor) -> None:
        self.finetuned = finetuned.reshape(-1)
        self.base = base.reshape(-1)
        self.shape = base.shape
        self.dtype = accumulation_dtype(base.dtype)

    def chunk(self, s: slice, out: torch.Tensor | None = None) -> torch.Tensor:
        finetuned, base = self.finetuned[s], self.base[s]
        if finetuned.dtype != self.dtype:
            finetuned, base = finetuned.to(self.dtype), base.to(self.dtype)
        return torch.sub(finetuned, base, out=out)

    def full(self) -> torch.Tensor:
        return self.chunk(slice(None)).view(self.shape)


Operand = torch.Tensor | Difference


def chunk_of(operand: Operand, s: slice, dtype: torch.dtype, out: torch.Tensor | None = None) -> torch.Tensor:
    """The chunk ``s`` of a flattened operand in ``dtype``, written into ``out`` if given."""
    if isinstance(operand, Difference):
        return operand.chunk(s, out)
    values = operand.reshape(-1)[s]
    return values.to(dtype) if out is None else out.copy_(values)


class TaskVector(Mapping[str, torch.Tensor]):
    """τ = θ_t − θ as a name → tensor mapping, computed when read; nothing is held.

    Indexing gives the whole tensor (floating tensors in their accumulation dtype; integer and boolean
    buffers as int64). The merging driver reads it chunk by chunk through :meth:`operand` instead.
    """

    def __init__(self, finetuned: Tensors, base: Tensors) -> None:
        self.finetuned = finetuned
        self.base = base

    def operand(self, name: str) -> Operand:
        base = self.base[name]
        if base.is_floating_point():
            return Difference(self.finetuned[name], base)
        return self.finetuned[name].to(torch.int64) - base.to(torch.int64)

    def __getitem__(self, name: str) -> torch.Tensor:
        operand = self.operand(name)
        return operand.full() if isinstance(operand, Difference) else operand

    def __iter__(self) -> Iterator[str]:
        return iter(self.base)

    def __len__(self) -> int:
        return len(self.base)


def operands(task_vectors: Sequence[Tensors], name: str) -> list[Operand]:
    """Every client's tensor ``name``, lazily where the task vector allows it."""
    return [tv.operand(name) if isinstance(tv, TaskVector) else tv[name] for tv in task_vectors]


def is_floating(operand: Operand) -> bool:
    return isinstance(operand, Difference) or operand.is_floating_point()


def operand_dtype(operand: Operand) -> torch.dtype:
    return operand.dtype if isinstance(operand, Difference) else accumulation_dtype(operand.dtype)


def weighted_sum_into(out: torch.Tensor, values: torch.Tensor, coeffs: Sequence[float]) -> torch.Tensor:
    """out = Σ_t c_t x_t for the rows x_t of ``values`` (T, n): one matrix-vector product."""
    return out.copy_(torch.as_tensor(coeffs, dtype=values.dtype) @ values)


def gram_matrix(vectors: Sequence[Tensors], names: Sequence[str]) -> np.ndarray:
    """G[i, j] = ⟨v_i, v_j⟩ over every floating tensor of ``names``, accumulated in float64."""
    gram = torch.zeros(len(vectors), len(vectors), dtype=torch.float64)
    for name in names:
        ops = operands(vectors, name)
        if not is_floating(ops[0]):
            continue
        numel = ops[0].shape.numel() if isinstance(ops[0], Difference) else ops[0].numel()
        for s in chunks(numel, 1 << 18):
            x = torch.stack([chunk_of(op, s, torch.float64).to(torch.float64) for op in ops])
            gram += x @ x.T
    return gram.numpy()


def apply_update(base: torch.Tensor, delta: torch.Tensor, server_lr: float) -> torch.Tensor:
    """θ + β·Δ in the accumulation dtype, returned in θ's dtype; integer buffers step by round(β·Δ), booleans
    stay within {0, 1}."""
    if base.is_floating_point():
        acc = accumulation_dtype(base.dtype)
        return torch.add(base.to(acc), delta.to(acc), alpha=server_lr).to(base.dtype)
    step = torch.round(delta.to(torch.float64) * server_lr).to(torch.int64)
    updated = base.to(torch.int64) + step
    return (updated.clamp(0, 1) if base.dtype == torch.bool else updated).to(base.dtype)
