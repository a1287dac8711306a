"""Tensor plumbing shared by every rule: lazy task vectors, accumulation dtypes, chunked passes.

Rules never see whole task vectors. The driver walks each tensor in cache-sized chunks, computes the
chunk of every client's τ_t = θ_t − θ right there (θ's chunk read once for all clients), and hands the rule
those chunks; so a rule over T clients reads each input once and holds one output tensor plus T chunks per
worker. Inputs are tensors, or :class:`SliceReader` s of tensors still on disk, read a chunk at a time.

Devices: the work on a tensor runs on the device asked for, by default where the first client's tensor (for
a :class:`TaskVector`, its base θ) lives (:attr:`Term.home`), and every buffer is made there; chunks are
copied there as they are read. The passes over the whole model (:func:`gram_matrix`, :func:`squared_norms`)
take the same device.
"""

from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from functools import lru_cache
from typing import Protocol

import numpy as np
import torch

Tensors = Mapping[str, torch.Tensor]

CHUNK = (
    1 << 18
)  # elements per CPU chunk (1 MiB of float32): large enough to amortise Python, small enough to stay cached
DEVICE_CHUNK = 1 << 22  # elements per chunk on an accelerator (16 MiB of float32): few kernel launches per tensor


def accumulation_dtype(dtype: torch.dtype) -> torch.dtype:
    """float64 stays float64; every other floating dtype accumulates in float32."""
    return torch.float64 if dtype == torch.float64 else torch.float32


SCRATCH_BYTES = 1 << 28
"""The scratch rows one worker holds (T clients × a chunk): 256 MiB at most, so chunks shrink as T grows."""
MIN_CHUNK = 1 << 10


def chunk_size(device: torch.device, rows: int = 1, itemsize: int = 4) -> int:
    """Elements per chunk on ``device``: cache-sized on the CPU, large on an accelerator, and small enough that
    ``rows`` rows of it stay within :data:`SCRATCH_BYTES` (memory bounded whatever the number of clients)."""
    size = CHUNK if device.type == "cpu" else DEVICE_CHUNK
    return min(size, max(MIN_CHUNK, SCRATCH_BYTES // (rows * itemsize)))


def chunks(numel: int, size: int) -> Iterator[slice]:
    """Consecutive slices covering ``range(numel)``."""
    for start in range(0, numel, size):
        yield slice(start, min(start + size, numel))


class SliceReader(Protocol):
    """A tensor kept where it is stored (a checkpoint on disk) and read a flat slice at a time.

    A mapping of tensors offers these through a ``reader(name)`` method; the driver then never reads a whole
    tensor, only the chunks it is merging, from as many threads as it runs.
    """

    shape: torch.Size
    dtype: torch.dtype

    def read(self, s: slice) -> torch.Tensor:
        """The flat elements ``s`` as a CPU tensor of :attr:`dtype`, valid until this thread reads again."""


Source = torch.Tensor | SliceReader


def source(tensors: Tensors, name: str) -> Source:
    """Tensor ``name`` as a slice reader where the mapping offers one (``reader``), else the tensor itself."""
    reader = getattr(tensors, "reader", None)
    return tensors[name] if reader is None else reader(name)


def read_into(src: Source, s: slice, out: torch.Tensor) -> torch.Tensor:
    """The flat elements ``s`` of ``src`` copied into ``out``, converted to its dtype and moved to its device."""
    return copy_flat(src, s, out) if isinstance(src, torch.Tensor) else out.copy_(src.read(s))


def copy_flat(tensor: torch.Tensor, s: slice, out: torch.Tensor) -> torch.Tensor:
    """The row-major elements ``s`` of ``tensor`` copied into the flat ``out``, touching those elements only.

    A non-contiguous tensor (a transposed or expanded view, as a PyTorch file may hold) is not flattened whole:
    ``s`` is cut into a partial leading row, whole rows and a partial trailing row, each copied from a view.
    """
    if s.start >= s.stop:
        return out
    if tensor.is_contiguous() or tensor.dim() <= 1:
        return out.copy_(tensor.reshape(-1)[s])
    if s.start == 0 and s.stop == tensor.numel():
        out.view(tensor.shape).copy_(tensor)
        return out
    row = tensor[0].numel()
    first, last = s.start // row, (s.stop - 1) // row
    if first == last:
        return copy_flat(tensor[first], slice(s.start - first * row, s.stop - first * row), out)
    head = (first + 1) * row - s.start
    middle = (last - first - 1) * row
    copy_flat(tensor[first], slice(s.start - first * row, row), out[:head])
    out[head : head + middle].view(last - first - 1, *tensor.shape[1:]).copy_(tensor[first + 1 : last])
    copy_flat(tensor[last], slice(0, s.stop - last * row), out[head + middle :])
    return out


def read_whole(src: Source, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """All of ``src`` in ``dtype`` on ``device``."""
    out = torch.empty(src.shape, dtype=dtype, device=device)
    read_into(src, slice(0, out.numel()), out.view(-1))
    return out


@dataclass(frozen=True)
class Term:
    """One client's tensor to merge: ``value`` − ``base`` for a task vector, ``value`` alone otherwise."""

    value: Source
    base: Source | None = None

    @property
    def floating(self) -> bool:
        return (self.value if self.base is None else self.base).dtype.is_floating_point

    @property
    def shape(self) -> torch.Size:
        return torch.Size(self.value.shape)

    @property
    def home(self) -> torch.device:
        """Where the work on this tensor runs by default: where its base (else its value) lives; readers are on the
        CPU."""
        held = self.value if self.base is None else self.base
        return held.device if isinstance(held, torch.Tensor) else torch.device("cpu")

    def whole(self, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
        """The whole term (θ_t − θ for a task vector) in ``dtype`` on ``device``."""
        value = read_whole(self.value, dtype, device)
        return value if self.base is None else value.sub_(read_whole(self.base, dtype, device))


def terms(vectors: Sequence[Tensors], name: str) -> list[Term]:
    """Every vector's tensor ``name``; task vectors of one base share its source, so it is read once per chunk."""
    bases: dict[int, Source] = {}
    found = []
    for vector in vectors:
        if isinstance(vector, TaskVector):
            base = bases.setdefault(id(vector.base), source(vector.base, name))
            found.append(Term(source(vector.finetuned, name), base))
        else:
            found.append(Term(source(vector, name)))
    return found


def read_chunk(found: Sequence[Term], s: slice, values: torch.Tensor, base_row: torch.Tensor) -> torch.Tensor | None:
    """Chunk ``s`` of every term into the rows of ``values``; a shared base is read once, into ``base_row``.

    Returns ``base_row`` holding the base's chunk when every term is a task vector of that base, else None.
    """
    shared = found[0].base if all(term.base is found[0].base for term in found) else None
    if shared is not None:
        read_into(shared, s, base_row)
    for term, row in zip(found, values):
        read_into(term.value, s, row)
        if term.base is not None:
            row.sub_(base_row if term.base is shared else read_into(term.base, s, torch.empty_like(row)))
    return None if shared is None else base_row


class TaskVector(Mapping[str, torch.Tensor]):
    """τ = θ_t − θ as a name → tensor mapping, computed when read; nothing is held.

    Indexing gives the whole tensor (floating tensors in their accumulation dtype; integer and boolean
    buffers as int64). The merging driver reads it chunk by chunk through :meth:`operand` instead.
    """

    def __init__(self, finetuned: Tensors, base: Tensors) -> None:
        self.finetuned = finetuned
        self.base = base

    def __getitem__(self, name: str) -> torch.Tensor:
        base = self.base[name]
        if base.is_floating_point():
            return self.finetuned[name].to(base.device, accumulation_dtype(base.dtype)) - base.to(
                accumulation_dtype(base.dtype)
            )
        return self.finetuned[name].to(base.device, torch.int64) - base.to(torch.int64)

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


def stacked(tensors: Sequence[torch.Tensor], dtype: torch.dtype) -> torch.Tensor:
    """The tensors stacked in ``dtype`` on the first one's device."""
    return torch.stack([t.to(tensors[0].device, dtype) for t in tensors])


@lru_cache(maxsize=64)
def coefficients(values: tuple[float, ...], dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """The coefficients as a tensor on ``device``, made once (not copied to the device for every chunk)."""
    return torch.tensor(values, dtype=dtype, device=device)


def weighted_sum_into(out: torch.Tensor, values: torch.Tensor, coeffs: Sequence[float]) -> torch.Tensor:
    """out = Σ_t c_t x_t for the rows x_t of ``values`` (T, n): one matrix-vector product on their device."""
    return out.copy_(coefficients(tuple(map(float, coeffs)), values.dtype, values.device) @ values)


def _floating_chunks(
    vectors: Sequence[Tensors],
    names: Sequence[str],
    device: torch.device | str | None,
) -> Iterator[torch.Tensor]:
    """Every floating tensor of ``names`` as (T, n) float64 chunks, row t vector t's, on ``device`` (None: the last
    vector's :attr:`Term.home`). Floating tensors and their home are told by the last vector, so the first (a CCLIP
    center) may hold the floating tensors only, and live anywhere."""
    for name in names:
        if not terms(vectors[-1:], name)[0].floating:
            continue
        found = terms(vectors, name)
        where = found[-1].home if device is None else torch.device(device)
        size = chunk_size(where, len(found), 8)
        values = torch.empty(len(found), min(size, found[0].shape.numel()), dtype=torch.float64, device=where)
        base_row = torch.empty(values.shape[1], dtype=torch.float64, device=where)
        for s in chunks(found[0].shape.numel(), size):
            n = s.stop - s.start
            read_chunk(found, s, values[:, :n], base_row[:n])
            yield values[:, :n]


def gram_matrix(
    vectors: Sequence[Tensors], names: Sequence[str], device: torch.device | str | None = None
) -> np.ndarray:
    """G[i, j] = ⟨v_i, v_j⟩ over every floating tensor of ``names``, accumulated in float64 (T² numbers) on
    ``device`` (None: where each tensor lives)."""
    gram = None
    for x in _floating_chunks(vectors, names, device):
        gram = x @ x.T if gram is None else gram.add_(x @ x.T)
    return np.zeros((len(vectors), len(vectors))) if gram is None else gram.cpu().numpy()


def squared_norms(
    vectors: Sequence[Tensors], names: Sequence[str], device: torch.device | str | None = None
) -> np.ndarray:
    """‖v_t‖² over every floating tensor of ``names``, in float64 on ``device`` (None: where each tensor lives): the
    Gram matrix's diagonal in O(T)."""
    total = None
    for x in _floating_chunks(vectors, names, device):
        row = (x * x).sum(1)
        total = row if total is None else total.add_(row)
    return np.zeros(len(vectors)) if total is None else total.cpu().numpy()


def products_with_first(
    vectors: Sequence[Tensors], names: Sequence[str], device: torch.device | str | None = None
) -> tuple[np.ndarray, np.ndarray]:
    """(‖v_i‖², ⟨v_i, v_0⟩) for every vector, in float64: the Gram matrix's diagonal and first column in O(T)."""
    squares = products = None
    for x in _floating_chunks(vectors, names, device):
        squares = (x * x).sum(1) if squares is None else squares.add_((x * x).sum(1))
        products = x @ x[0] if products is None else products.add_(x @ x[0])
    if squares is None:
        return np.zeros(len(vectors)), np.zeros(len(vectors))
    return squares.cpu().numpy(), products.cpu().numpy()


def apply_update(base: torch.Tensor, delta: torch.Tensor, server_lr: float) -> torch.Tensor:
    """θ + β·Δ in the accumulation dtype, returned in θ's dtype; integer buffers step by round(β·Δ), booleans
    stay within {0, 1}."""
    if base.is_floating_point():
        acc = accumulation_dtype(base.dtype)
        return torch.add(base.to(acc), delta.to(base.device, acc), alpha=server_lr).to(base.dtype)
    step = torch.round(delta.to(base.device, torch.float64) * server_lr).to(torch.int64)
    updated = base.to(torch.int64) + step
    return (updated.clamp(0, 1) if base.dtype == torch.bool else updated).to(base.dtype)
