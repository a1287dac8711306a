"""The shape of a merging rule and the driver that runs one over task vectors, chunk by chunk."""

import itertools
import math
import threading
from collections.abc import Iterator, Sequence
from concurrent.futures import Executor, ThreadPoolExecutor

import numpy as np
import torch

from fedmerge.errors import FedmergeError
from fedmerge.merging.tensors import (
    Tensors,
    TaskVector,
    Term,
    accumulation_dtype,
    apply_update,
    chunk_size,
    chunks,
    read_chunk,
    read_whole,
    stacked,
    terms,
)
from fedmerge.merging.validate import check_task_vectors
from fedmerge.merging.weights import client_weights
from fedmerge.threads import available_cores, single_threaded


class Rule:
    """A merging rule: an optional first pass over whole task vectors, then a function per chunk.

    Subclasses set ``name`` and implement :meth:`merge_chunk`; rules that need global quantities (norms)
    extend :meth:`prepare`. Rules that need a whole matrix at once (an SVD, a layer's closed form) say which tensors
    in :meth:`merges_whole` and merge those in :meth:`merge_whole`, reading the clients' whole tensors one at a time.
    ``weights`` are raw client weights (e.g. example counts), ``None`` for uniform.
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

    def prepare(self, task_vectors: Sequence[Tensors], names: Sequence[str], device: torch.device | None) -> None:
        """First pass, before any tensor is merged. Resolves p_t; subclasses may add more, e.g. a pass over the
        whole model (:func:`~fedmerge.merging.tensors.gram_matrix`), which runs on ``device``, where the chunks are
        merged (None: where the tensors live)."""
        self.p = client_weights(self.per_client(self.weights), len(task_vectors))

    def prepare_tensor(
        self, name: str, found: Sequence[Term], dtype: torch.dtype, device: torch.device, pool: Executor
    ) -> None:
        """Called before the chunks of each floating tensor, with every present client's term of it (rules that
        need a per-tensor statistic, such as TIES's magnitude threshold, read it here; ``pool`` runs work in
        parallel, torch single-threaded)."""

    def merge_chunk(self, name: str, s: slice, values: torch.Tensor, out: torch.Tensor) -> None:
        """Write Δ for the chunk ``s`` of tensor ``name`` into ``out``, from the T clients' τ chunks.

        ``values`` is a (T, n) matrix, row t client t's chunk, in scratch memory owned by the driver: the
        rule may overwrite it.
        """
        raise NotImplementedError

    def merges_whole(self, name: str, shape: torch.Size) -> bool:
        """Whether floating tensor ``name`` is merged whole, by :meth:`merge_whole`, instead of chunk by chunk."""
        return False

    def merge_whole(self, name: str, clients: "WholeTensors", out: torch.Tensor) -> None:
        """Write Δ for the whole tensor ``name`` into ``out`` (its shape, in the accumulation dtype, on the merge's
        device). ``clients[t]`` reads present client t's whole τ_t, fresh at each access: read them one at a time, so
        that memory holds a few tensors of this size whatever the number of clients."""
        raise NotImplementedError

    def merge_integer(self, tensors: Sequence[torch.Tensor]) -> torch.Tensor:
        """Δ for an integer buffer (a counter): the p-weighted mean, rounded, as int64."""
        values = stacked(tensors, torch.float64)
        p = torch.as_tensor(self.p, dtype=torch.float64, device=values.device).view(-1, *([1] * (values.dim() - 1)))
        return torch.round((values * p).sum(0)).to(torch.int64)

    def linear_coefficients(self) -> Sequence[float] | None:
        """c_t when the rule is a weighted sum Δ = Σ_t c_t τ_t with c fixed before any tensor is merged (read after
        :meth:`prepare`), else None. Such rules can merge LoRA factors stacked (:mod:`fedmerge.merging.lora`)."""
        return None

    def params(self) -> dict:
        """The rule's parameters, for results and checkpoint metadata."""
        return {"rule": self.name}


class WholeTensors(Sequence[torch.Tensor]):
    """Every present client's whole tensor of one name (τ_t = θ_t − θ for a task vector), read when indexed.

    A base θ the clients share is read once and held while the tensor is merged; each access reads client t's
    tensor again into a new buffer, so a rule holding one at a time holds one. Each read records ‖τ_t‖²; a client's
    tensor holding NaN or ±inf is handed over as zeros (its norm flags it, and the caller refuses that client or
    leaves it out and merges again), so that no decomposition fails on it.
    """

    def __init__(self, found: Sequence[Term], dtype: torch.dtype, device: torch.device) -> None:
        self.found, self.dtype, self.device = found, dtype, device
        shared = found[0].base if all(term.base is found[0].base for term in found) else None
        self.base = None if shared is None else read_whole(shared, dtype, device)
        self.norms = np.zeros(len(found))
        self.read = np.zeros(len(found), dtype=bool)

    @property
    def shape(self) -> torch.Size:
        return self.found[0].shape

    def __len__(self) -> int:
        return len(self.found)

    def __getitem__(self, t: int) -> torch.Tensor:
        term = self.found[t]
        if self.base is None:
            tensor = term.whole(self.dtype, self.device)
        else:
            tensor = read_whole(term.value, self.dtype, self.device).sub_(self.base)
        self.norms[t] = float(torch.linalg.vector_norm(tensor, dtype=torch.float64)) ** 2
        self.read[t] = True
        return tensor.nan_to_num_(0.0, 0.0, 0.0) if not np.isfinite(self.norms[t]) else tensor

    def squared_norms(self) -> np.ndarray:
        """Each client's ‖τ_t‖² (reading, once, any client the rule did not read)."""
        for t in np.flatnonzero(~self.read):
            self[t]
        return self.norms


def iter_merge(
    rule: Rule,
    task_vectors: Sequence[Tensors],
    names: Sequence[str] | None = None,
    squared_norms: np.ndarray | None = None,
    device: torch.device | str | None = None,
) -> Iterator[tuple[str, torch.Tensor]]:
    """Yield ``(name, Δ)`` tensor by tensor; Δ is in the accumulation dtype (int64 for integer buffers).

    The entrance of the merging core: tensor names, shapes and dtypes are checked first, from metadata
    (:func:`~fedmerge.merging.validate.check_task_vectors`), and clients of weight 0 are dropped (never read).
    If ``squared_norms`` (length T) is given, each present client's ‖τ_t‖² over the floating tensors is
    added to it, and a non-finite entry flags non-finite values for the caller to handle (the strategies leave
    such a client out); without it, a client holding NaN or ±inf is refused with a :class:`FedmergeError` naming
    it and the tensor. Every pass runs on ``device`` (the rule's first pass
    over the whole model, its per-tensor statistics and the chunks); by default where the first client's tensor, or
    its base θ, lives (the CPU for tensors read from disk). See :func:`_drive`.
    """
    yield from _drive(rule, task_vectors, names, squared_norms, device, None)


def _drive(rule, task_vectors, names, squared_norms, device, server_lr) -> Iterator[tuple[str, torch.Tensor]]:
    """The driver. Each tensor is cut into chunks that worker threads take in turn (one chunk per step, so they
    stay busy), each with its own scratch rows: read every client's chunk (a task vector's base once), run the
    rule, and, when ``server_lr`` is given, write θ + β·Δ in θ's dtype right there. On the CPU every core works,
    each running torch single-threaded; on an accelerator one thread does, or every core when the inputs are read
    from disk (the reads overlap; the device runs the arithmetic in turn)."""
    names = check_task_vectors(task_vectors, names)
    present = rule.present_clients(len(task_vectors))
    task_vectors = [task_vectors[t] for t in present]
    device = None if device is None else torch.device(device)
    workers = available_cores()
    with ThreadPoolExecutor(workers) as pool:
        with single_threaded():
            rule.prepare(task_vectors, names, device)
        for name in names:
            found = terms(task_vectors, name)
            where = found[0].home if device is None else device
            if not found[0].floating:
                delta, base = _merge_integer(rule, found, where)
                yield name, delta if server_lr is None else apply_update(base, delta, server_lr)
                continue
            if rule.merges_whole(name, found[0].shape):  # torch's own threads: few, large decompositions
                out, norms = _merge_whole(rule, name, found, where, server_lr)
            else:
                with single_threaded():
                    out, norms = _merge_floating(rule, name, found, where, pool, workers, server_lr)
            if squared_norms is not None:
                squared_norms[present] += norms
            else:  # the caller does not look at the norms: a non-finite input is refused here, not merged
                _refuse_non_finite(name, found, norms, present)
            yield name, out
            del out  # the caller holds it now; keep at most one Δ alive while the next tensor is read


def _refuse_non_finite(name: str, found: list[Term], norms: np.ndarray, present: np.ndarray) -> None:
    """Raise naming the first client whose tensor ``name`` holds NaN or ±inf (a norm that overflowed from finite
    values is not refused: each flagged term is checked whole)."""
    for t in np.flatnonzero(~np.isfinite(norms)):
        term = found[t]
        if not bool(torch.isfinite(term.whole(torch.float64, torch.device("cpu"))).all()):
            raise FedmergeError(
                f"client {int(present[t])}: tensor {name!r} holds NaN or infinite values; nothing was "
                "merged. Leave that client out (weight 0) or repair its model."
            )


def _merge_integer(rule: Rule, found: list[Term], device: torch.device) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Δ of an integer buffer, and the first term's base as stored (every source read once, whole: they are small)."""
    read: dict[int, torch.Tensor] = {}

    def whole(src) -> torch.Tensor:
        if id(src) not in read:
            read[id(src)] = read_whole(src, src.dtype, device)
        return read[id(src)]

    values = [whole(t.value).to(torch.int64) - (0 if t.base is None else whole(t.base).to(torch.int64)) for t in found]
    return rule.merge_integer(values), None if found[0].base is None else whole(found[0].base)


def _given_dtype(term: Term) -> torch.dtype:
    """The dtype :func:`merge` returns a tensor in: a task vector's accumulation dtype (int64 for integer
    buffers), else the client tensor's own."""
    if term.base is None:
        return term.value.dtype
    return accumulation_dtype(term.base.dtype) if term.floating else torch.int64


def _accumulation(term: Term) -> torch.dtype:
    """The dtype a floating tensor's τ_t and Δ are computed in."""
    return accumulation_dtype((term.value if term.base is None else term.base).dtype)


def _merge_whole(
    rule: Rule, name: str, found: list[Term], device: torch.device, server_lr: float | None
) -> tuple[torch.Tensor, np.ndarray]:
    """One floating tensor merged whole (:meth:`Rule.merge_whole`): Δ in the accumulation dtype, or θ + β·Δ in θ's dtype
    (``server_lr`` given); and each client's ‖τ_t‖². Memory: θ, Δ, the client tensor being read and the rule's own
    per-tensor state, each of this tensor's size."""
    clients = WholeTensors(found, _accumulation(found[0]), device)
    delta = torch.empty(found[0].shape, dtype=clients.dtype, device=device)
    rule.merge_whole(name, clients, delta)
    norms = clients.squared_norms()
    if server_lr is None:
        return delta, norms
    return clients.base.add_(delta, alpha=server_lr).to(found[0].base.dtype), norms


def _merge_floating(
    rule: Rule,
    name: str,
    found: list[Term],
    device: torch.device,
    pool: ThreadPoolExecutor,
    workers: int,
    server_lr: float | None,
) -> tuple[torch.Tensor, np.ndarray]:
    """One floating tensor: Δ in the accumulation dtype, or θ + β·Δ in θ's dtype (``server_lr`` given); and each
    client's ‖τ_t‖² (non-finite where its values are)."""
    dtype = _accumulation(found[0])
    numel = found[0].shape.numel()
    out = torch.empty(found[0].shape, dtype=found[0].base.dtype if server_lr is not None else dtype, device=device)
    flat_out = out.view(-1)
    size = chunk_size(device, len(found), torch.tensor([], dtype=dtype).element_size())
    slices = list(chunks(numel, size))
    reads_disk = any(not isinstance(term.value, torch.Tensor) for term in found)
    workers = min(workers if device.type == "cpu" or reads_disk else 1, len(slices))
    rule.prepare_tensor(name, found, dtype, device, pool)
    taken = itertools.count()  # next() on a count is atomic under the GIL: each chunk goes to one worker
    stop = threading.Event()  # set when the tensor is abandoned (an error, Ctrl-C): the other workers stop too

    def work() -> np.ndarray:
        width = min(size, numel)
        rows = torch.empty(len(found), width, dtype=dtype, device=device)
        base_row = torch.empty(width, dtype=dtype, device=device)
        delta = torch.empty(width, dtype=dtype, device=device) if server_lr is not None else None
        norms = torch.zeros(len(found), dtype=torch.float64, device=device)
        while not stop.is_set() and (k := next(taken)) < len(slices):
            s = slices[k]
            n = s.stop - s.start
            values = rows[:, :n]
            theta = read_chunk(found, s, values, base_row[:n])
            norms += torch.linalg.vector_norm(values, dim=1).to(torch.float64) ** 2
            if delta is None:
                rule.merge_chunk(name, s, values, flat_out[s])
            else:
                rule.merge_chunk(name, s, values, delta[:n])
                flat_out[s].copy_(torch.add(theta, delta[:n], alpha=server_lr, out=delta[:n]))
        return norms.cpu().numpy()  # T numbers, once per tensor

    try:
        parts = [work()] if workers == 1 else [f.result() for f in [pool.submit(work) for _ in range(workers)]]
    finally:
        stop.set()
    return out, np.sum(parts, axis=0)


def merge(rule: Rule, task_vectors: Sequence[Tensors]) -> dict[str, torch.Tensor]:
    """Δ = the rule over the task vectors, each tensor in the dtype the first task vector gives it."""
    deltas = dict(iter_merge(rule, task_vectors))
    return {name: delta.to(_given_dtype(terms(task_vectors[:1], name)[0])) for name, delta in deltas.items()}


def iter_merged_model(
    rule: Rule,
    base: Tensors,
    finetuned: Sequence[Tensors],
    server_lr: float = 1.0,
    names: Sequence[str] | None = None,
    squared_norms: np.ndarray | None = None,
    device: torch.device | str | None = None,
) -> Iterator[tuple[str, torch.Tensor]]:
    """Yield ``(name, θ + β·Δ)`` tensor by tensor, with Δ the rule over τ_t = θ_t − θ, in θ's dtypes, on
    ``device`` (default: θ's). θ + β·Δ is computed chunk by chunk beside Δ (in the accumulation dtype), so no
    whole Δ is ever held."""
    if not math.isfinite(server_lr):
        raise FedmergeError(f"server_lr (β) must be a finite number, got {server_lr!r}.")
    yield from _drive(
        rule, [TaskVector(model, base) for model in finetuned], names, squared_norms, device, float(server_lr)
    )


def merged_model(
    rule: Rule, base: Tensors, finetuned: Sequence[Tensors], server_lr: float = 1.0
) -> dict[str, torch.Tensor]:
    """θ + β·Δ as a dict; see :func:`iter_merged_model`."""
    return dict(iter_merged_model(rule, base, finetuned, server_lr))
