"""Tensor plumbing shared by every rule: lazy task vectors, accumulation dtypes, chunked passes.

Rules never see whole task vectors. The driver walks each tensor in cache-sized chunks, computes the
chunk of every client's τ_t = θ_t − θ right there, and hands the rule those chunks; so a rule over T
clients reads each input once and holds one output tensor plus T chunks.

Devices: the work on a tensor runs where the first client's tensor lives (for a :class:`TaskVector`, its
base θ), and every buffer is made there; another client's chunks are copied there as they are read.
"""

from collections.abc import Iterator, Mapping, Sequence
from functools import lru_cache

import numpy as np
import torch

Tensors = Mapping[str, torch.Tensor]

CHUNK = 1 << 18  # elements per CPU chunk (1 MiB of float32): large enough to amortise Python, small enough to stay cached
DEVICE_CHUNK = 1 << 22  # elements per chunk on an accelerator (16 MiB of float32): few kernel launches per tensor


def accumulation_dtype(dtype: torch.dtype) -> torch.dtype:
    """float64 stays float64; every other floating dtype accumulates in float32."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def chunk_size(device: torch.device) -> int:
    """Elements per chunk on ``device``: cache-sized on the CPU, large on an accelerator."""
    return CHUNK if device.type == "cpu" else DEVICE_CHUNK


def chunks(numel: int, size: int) -> Iterator[slice]:
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
        self.device = base.device

    def chunk(self, s: slice, out: torch.Tensor | None = None) -> torch.Tensor:
        """The chunk ``s`` in ``out``'s dtype on its device (default: the accumulation dtype on θ's device)."""
        dtype, device = (self.dtype, self.device) if out is None else (out.dtype, out.device)
        return torch.sub(self.finetuned[s].to(device, dtype), self.base[s].to(device, dtype), out=out)

    def full(self) -> torch.Tensor:
        return self.chunk(slice(None)).view(self.shape)


Operand = torch.Tensor | Difference


def chunk_of(operand: Operand, s: slice, out: torch.Tensor | None = None) -> torch.Tensor:
    """The chunk ``s`` of a flattened operand, written into ``out`` (its dtype, on its device) if given."""
    if isinstance(operand, Difference):
        return operand.chunk(s, out)
    values = operand.reshape(-1)[s]
    return values if out is None else out.copy_(values)


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
        return self.finetuned[name].to(base.device, torch.int64) - base.to(torch.int64)

    def __getitem__(self, name: str) -> torch.Tensor:
        operand = self.operand(name)
        return operand.full() if isinstance(operand, Difference) else operand

    def __iter__(self) -> Iterator[str]:
        return iter(self.base)

    def __len__(self) -> int:
        return len(self.base)


class OnDevice(Mapping[str, torch.Tensor]):
    """``tensors`` read onto ``device``: each tensor is copied there when read (without waiting on CUDA, which
    is asynchronous from pinned memory), and the last one is kept, so the reads of one name by every τ_t (the
    base's) read and copy it once. Metadata (``specs``) and ``in`` pass through without reading."""

    def __init__(self, tensors: Tensors, device: torch.device | str) -> None:
        self.tensors, self.device = tensors, torch.device(device)
        self.specs = getattr(tensors, "specs", None)
        self._last: tuple[str, torch.Tensor] | None = None

    def __getitem__(self, name: str) -> torch.Tensor:
        if self._last is None or self._last[0] != name:
            self._last = (name, self.tensors[name].to(self.device, non_blocking=self.device.type == "cuda"))
        return self._last[1]

    def __contains__(self, name: object) -> bool:
        return name in (self.tensors if self.specs is None else self.specs)

    def __iter__(self) -> Iterator[str]:
        return iter(self.tensors)

    def __len__(self) -> int:
        return len(self.tensors)


def operands(task_vectors: Sequence[Tensors], name: str) -> list[Operand]:
    """Every client's tensor ``name``, lazily where the task vector allows it."""
    return [tv.operand(name) if isinstance(tv, TaskVector) else tv[name] for tv in task_vectors]


def is_floating(operand: Operand) -> bool:
    return isinstance(operand, Difference) or operand.is_floating_point()


def operand_dtype(operand: Operand) -> torch.dtype:
    return operand.dtype if isinstance(operand, Difference) else accumulation_dtype(operand.dtype)


def stacked(tensors: Sequence[torch.Tensor], dtype: torch.dtype) -> torch.Tensor:
    """The tensors stacked in ``dtype`` on the first one's device."""
    return torch.stack([t.to(tensors[0].device, dtype) for t in tensors])


@lru_cache(maxsize=64)
def _coefficients(values: tuple[float, ...], dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """The coefficients as a tensor on ``device``, made once (not copied to the device for every chunk)."""
    return torch.tensor(values, dtype=dtype, device=device)


def weighted_sum_into(out: torch.Tensor, values: torch.Tensor, coeffs: Sequence[float]) -> torch.Tensor:
    """out = Σ_t c_t x_t for the rows x_t of ``values`` (T, n): one matrix-vector product on their device."""
    return out.copy_(_coefficients(tuple(map(float, coeffs)), values.dtype, values.device) @ values)


def gram_matrix(vectors: Sequence[Tensors], names: Sequence[str]) -> np.ndarray:
    """G[i, j] = ⟨v_i, v_j⟩ over every floating tensor of ``names``, accumulated in float64 on the device of
    the first vector's first floating tensor. Floating tensors are told by the last vector, so the first (a
    CCLIP center) may hold the floating tensors only."""
    gram = None
    for name in names:
        last = operands(vectors[-1:], name)[0]
        if not is_floating(last):
            continue
        ops = operands(vectors[:-1], name) + [last]
        device = ops[0].device
        if gram is None:
            gram = torch.zeros(len(ops), len(ops), dtype=torch.float64, device=device)
        for s in chunks(ops[0].shape.numel(), chunk_size(device)):
            x = torch.stack([chunk_of(op, s).to(device, torch.float64) for op in ops])
            gram += x @ x.T
    return np.zeros((len(vectors), len(vectors))) if gram is None else gram.cpu().numpy()


def apply_update(base: torch.Tensor, delta: torch.Tensor, server_lr: float) -> torch.Tensor:
    """θ + β·Δ in the accumulation dtype, returned in θ's dtype; integer buffers step by round(β·Δ), booleans
    stay within {0, 1}."""
    if base.is_floating_point():
        acc = accumulation_dtype(base.dtype)
        return torch.add(base.to(acc), delta.to(base.device, acc), alpha=server_lr).to(base.dtype)
    step = torch.round(delta.to(base.device, torch.float64) * server_lr).to(torch.int64)
    updated = base.to(torch.int64) + step
    return (updated.clamp(0, 1) if base.dtype == torch.bool else updated).to(base.dtype)
