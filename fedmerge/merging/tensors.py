"""Tensor plumbing shared by every rule: lazy task vectors, accumulation dtypes, chunked kernels.

Kernels walk flattened tensors in cache-sized chunks, so a rule over T clients touches each input once
and holds at most one output tensor plus a few chunks beyond its inputs.
"""

from collections.abc import Iterator, Mapping, Sequence

import numpy as np
import torch

Tensors = Mapping[str, torch.Tensor]

CHUNK = 1 << 15  # elements per chunk: T chunks of float32 stay in a core's L2 cache
GRAM_CHUNK = 1 << 20


def accumulation_dtype(dtype: torch.dtype) -> torch.dtype:
    """float64 stays float64; every other floating dtype accumulates in float32."""
    return torch.float64 if dtype == torch.float64 else torch.float32


class TaskVector(Mapping[str, torch.Tensor]):
    """τ = θ_t − θ, computed tensor by tensor when read; nothing is held.

    Floating tensors come back in their accumulation dtype; integer and boolean buffers as int64. With
    ``track_norms`` the squared L2 norm of each floating tensor read is kept, for :attr:`norm`.
    """

    def __init__(self, finetuned: Tensors, base: Tensors, track_norms: bool = False) -> None:
        self.finetuned = finetuned
        self.base = base
        self.squared_norms: dict[str, float] | None = {} if track_norms else None

    def __getitem__(self, name: str) -> torch.Tensor:
        base = self.base[name]
        if not base.is_floating_point():
            return self.finetuned[name].to(torch.int64) - base.to(torch.int64)
        acc = accumulation_dtype(base.dtype)
        delta = self.finetuned[name].to(acc) - base.to(acc)
        if self.squared_norms is not None:
            flat_delta = delta.reshape(-1)
            self.squared_norms[name] = float(torch.dot(flat_delta, flat_delta))
        return delta

    @property
    def norm(self) -> float:
        """‖τ‖ over the floating tensors read so far (needs ``track_norms``)."""
        if self.squared_norms is None:
            raise ValueError("this TaskVector was made without track_norms=True")
        return float(np.sqrt(sum(self.squared_norms.values())))

    def __iter__(self) -> Iterator[str]:
        return iter(self.base)

    def __len__(self) -> int:
        return len(self.base)


def chunks(numel: int, size: int = CHUNK) -> Iterator[slice]:
    """Consecutive slices covering ``range(numel)``."""
    for start in range(0, numel, size):
        yield slice(start, min(start + size, numel))


def flat(tensors: Sequence[torch.Tensor]) -> list[torch.Tensor]:
    """Flattened views (copies only for non-contiguous tensors)."""
    return [t.reshape(-1) for t in tensors]


def weighted_sum(tensors: Sequence[torch.Tensor], coeffs: Sequence[float]) -> torch.Tensor:
    """Σ_t c_t x_t in the accumulation dtype, one cache-sized chunk at a time."""
    acc = accumulation_dtype(tensors[0].dtype)
    out = torch.empty(tensors[0].shape, dtype=acc)
    flat_out = out.view(-1)
    flats = flat(tensors)
    coeffs = [float(c) for c in coeffs]
    for s in chunks(flat_out.numel()):
        o = flat_out[s]
        o.copy_(flats[0][s]).mul_(coeffs[0])
        for x, c in zip(flats[1:], coeffs[1:]):
            if x.dtype == acc:
                o.add_(x[s], alpha=c)
            else:
                o.add_(x[s].to(acc), alpha=c)
    return out


def gram_matrix(vectors: Sequence[Tensors], names: Sequence[str]) -> np.ndarray:
    """G[i, j] = ⟨v_i, v_j⟩ over every floating tensor of ``names``, accumulated in float64."""
    n = len(vectors)
    gram = torch.zeros(n, n, dtype=torch.float64)
    for name in names:
        tensors = [v[name] for v in vectors]
        if not tensors[0].is_floating_point():
            continue
        flats = flat(tensors)
        for s in chunks(flats[0].numel(), GRAM_CHUNK):
            x = torch.stack([f[s] for f in flats]).to(torch.float64)
            gram += x @ x.T
    return gram.numpy()


def apply_update(base: torch.Tensor, delta: torch.Tensor, server_lr: float) -> torch.Tensor:
    """θ + β·Δ in the accumulation dtype, returned in θ's dtype; integer buffers step by round(β·Δ)."""
    if base.is_floating_point():
        acc = accumulation_dtype(base.dtype)
        return torch.add(base.to(acc), delta.to(acc), alpha=server_lr).to(base.dtype)
    step = torch.round(delta.to(torch.float64) * server_lr).to(torch.int64)
    return (base.to(torch.int64) + step).to(base.dtype)
