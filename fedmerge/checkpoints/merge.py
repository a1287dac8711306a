"""The Python API of offline merging: ``merge_checkpoints(base, models, out, method=...)``.

Tensors stream from the inputs through the merging core's :func:`fedmerge.merging.iter_merged_model`
into the output: every core reads chunks of the inputs (positioned reads, no whole input tensor is ever
held), computes θ + β·Δ of its chunk in float32 and stores it in the output tensor in θ's dtype, while a
writer thread writes the previous tensors. Memory holds a few output tensors (the one being merged and at
most three waiting to be written) plus T + 3 chunks per core, whatever the model's size.

With ``device="cuda"`` chunks are still read on the CPU (into pinned memory, by every core), copied to the
GPU (each copy waits for itself; the cores' reads and copies overlap one another), merged there, and each
finished tensor is brought back to the CPU to be written.

Non-finite inputs are caught by the merge's own pass: a model's ‖τ_t‖² turns non-finite at the first
tensor holding NaN or ±inf, and that tensor is then checked exactly (a norm alone may overflow). Such a
model stops the merge, naming its file and tensor, or, when asked, is left out and the merge restarts.
"""

import itertools
import json
import os
import warnings
from concurrent.futures import ThreadPoolExecutor
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import ExitStack
from pathlib import Path

import numpy as np
import torch

from fedmerge import __version__
from fedmerge.devices import resolve_device
from fedmerge.errors import FedmergeError
from fedmerge.files import staged
from fedmerge.merging import Rule, iter_merged_model
from fedmerge.threads import single_threaded
from fedmerge.checkpoints.adapters import is_adapter, open_model
from fedmerge.checkpoints.methods import Scale, build_rule, per_model_params, resolve_scale
from fedmerge.checkpoints.progress import MergeProgress
from fedmerge.checkpoints.trainer_state import fednova_params
from fedmerge.checkpoints.reader import Checkpoint
from fedmerge.checkpoints.validate import check_compatible, finite, non_finite
from fedmerge.checkpoints.writer import (
    Shard,
    check_output,
    copy_side_files,
    parse_size,
    plan_shards,
    write_index,
    write_shard,
)


class ModelLeftOut(UserWarning):
    """A model left out of a merge (``skip_nonfinite``): the message names it and its first bad tensor."""


class _NonFinite(Exception):
    """Tensor ``name`` of model ``model`` (an index into the merged models; None: the base) is not finite."""

    def __init__(self, model: int | None, name: str) -> None:
        super().__init__(model, name)
        self.model, self.name = model, name


def _watch(merged: Iterator, base: Mapping, models: Sequence[Mapping], squared_norms: np.ndarray) -> Iterator:
    """Yield the merged tensors; raise :class:`_NonFinite` as soon as a model's ‖τ_t‖² is non-finite and the
    tensor just merged confirms it (of the base first, then of the model)."""
    for name, tensor in merged:
        for t in np.flatnonzero(~np.isfinite(squared_norms)):
            if not finite(base[name]):
                raise _NonFinite(None, name)
            if not finite(models[t][name]):
                raise _NonFinite(int(t), name)
            squared_norms[t] = 0.0  # the norm overflowed; the values are finite: keep watching
        yield name, tensor


def _record(
    method: str, rule: Rule, weights, scale: Scale, base, models: Sequence, left_out: Sequence, device: torch.device
) -> dict:
    """What the output's metadata says about how it was made (read after the rule's first pass)."""
    return {
        "fedmerge_version": __version__,
        "method": method,
        "rule": rule.params(),
        "weights": None if weights is None else [float(w) for w in weights],
        **scale.record(),
        "convention": "merged = base + server_lr * delta, delta the rule's mean-scale update",
        "base": str(base),
        "models": [str(m) for m in models],
        "left_out": list(left_out),
        "device": str(device),
    }


def merge_checkpoints(
    base: str | os.PathLike,
    models: Sequence[str | os.PathLike],
    out: str | os.PathLike,
    *,
    method: str = "task-arithmetic",
    scaling: float | None = None,
    server_lr: float | None = None,
    weights: Sequence[float] | None = None,
    max_shard_size: int | str | None = None,
    skip_nonfinite: bool = False,
    force: bool = False,
    progress: bool = False,
    device: str | torch.device = "cpu",
    trainer_state: str | None = None,
    statistics: Sequence[str | os.PathLike] | None = None,
    note: Callable[[str], None] | None = None,
    **params,
) -> Path:
    """Merge fine-tuned checkpoints of one base into a new checkpoint at ``out``.

    Parameters
    ----------
    base : the pretrained checkpoint θ (a file or a model directory).
    models : the fine-tuned models θ_t, T ≥ 1 of them: checkpoints with exactly the base's tensors, or PEFT LoRA
        adapter directories of the base (``adapter_config.json`` + ``adapter_model.safetensors``; read as
        θ_t = θ + ΔW, see :mod:`fedmerge.checkpoints.adapters`), mixed freely. An adapter whose
        ``base_model_name_or_path`` names another model than ``base`` is merged with a
        :class:`~fedmerge.checkpoints.adapters.BaseMismatch` warning (make it an error with a warnings filter).
    out : a directory (Hugging Face layout, the base's config and tokenizer files copied) or, if it ends in
        ``.safetensors``, a single file.
    method : "task-arithmetic" or any of :data:`fedmerge.merging.METHODS` ("fedavg", "fednova", "fedgma", "median",
        "cclip", "ties", "dare-linear", "dare-ties", "mean-direction").
    scaling : the method's own λ, as its paper means it (:class:`~fedmerge.merging.Method` ``scale``): θ + λ·Σ_t τ_t
        (Task Arithmetic's convention: β = λ·T) or θ + λ·Δ (TIES's: β = λ); refused where that λ is ambiguous
        (median, cclip have none: ``Method.no_lambda``). Exclusive with ``server_lr``.
    server_lr : β: merged = θ + β·Δ, Δ the rule's mean-scale update. Neither given: β = 1.
    weights : per-model weights p_t (normalised to sum 1) for the weighted methods. A model of weight 0 is left
        out (never read).
    max_shard_size : bytes (int) or a size like "5GB" per output shard; default: the base's sharding.
    skip_nonfinite : leave out the models holding NaN or ±inf (each with a :class:`ModelLeftOut` warning,
        and listed under ``left_out`` in the output's metadata) instead of refusing them; a λ of Task
        Arithmetic's convention then counts the models merged (β = λ·T).
    force : replace an existing ``out``.
    progress : show progress bars (on a terminal).
    device : where the arithmetic runs: "cpu" (default), "cuda" (or "cuda:N"; tensors are read on the CPU,
        merged on the GPU and written from the CPU; results equal the CPU's within float rounding) or "auto"
        (cuda when ``torch.cuda.is_available()``). Recorded in the output's metadata.
    trainer_state : fednova only: read each a_t from the model directory's ``trainer_state.json``, its
        ``global_step`` ("steps") or its logged learning rates summed ("lr-sum"). Given neither this nor ``steps``
        or ``lr_sums``, a_t is read from it by FedNova's default normaliser
        (:data:`fedmerge.merging.rules.fednova.DEFAULT_NORMALIZE_BY`); see :mod:`fedmerge.checkpoints.trainer_state`.
    statistics : fisher and regmean only: one safetensors file (or directory) per model, in the order of ``models``,
        holding that model's diagonal Fisher (fisher) or its linear layers' input Gram matrices (regmean), by the
        model's tensor names, as :mod:`fedmerge.clients.merging_statistics` makes them; read a chunk (a layer) at a
        time like the models.
    note : called, once the output is written, with one line saying which β was applied and why (and, for
        fednova, which a_t and where they came from); ``fedmerge merge`` prints them on standard error.

    **params : the method's parameters, named as in its record (:func:`fedmerge.merging.find_method`), e.g.
        ``threshold=0.3`` (fedgma), ``radius=12.5`` (cclip), ``density=0.2`` (ties, dare-*), ``steps=[...]`` or
        ``lr_sums=[...]`` (fednova, one value per model); each defaults as its record says.

    Returns the output path. Raises :class:`FedmergeError` naming the file and tensor on bad input
    (non-finite values included, unless ``skip_nonfinite``); nothing is left at ``out`` if the merge fails.
    """
    out, models = Path(out), list(models)
    steps = None
    if method == "fednova":
        params, steps = fednova_params(models, params, trainer_state)
    elif trainer_state is not None:
        raise FedmergeError(
            f"trainer_state (--trainer-state) is only used by method 'fednova', not {method!r}; drop it."
        )
    options = dict(params, weights=weights)
    per_model = ["weights", *per_model_params(method)]
    statistics = None if statistics is None else list(statistics)
    build_rule(method, len(models), statistics=statistics, **options)  # every option checked before any file is read
    resolve_scale(method, len(models), scaling, server_lr)
    device = resolve_device(device)
    if out.name.endswith(".safetensors") and max_shard_size is not None:
        raise FedmergeError(f"the output {out} is a single file; drop max_shard_size or give a directory.")
    max_size = None if max_shard_size is None else parse_size(max_shard_size)
    check_output(out, [Path(base), *map(Path, models), *map(Path, statistics or [])], force)

    with ExitStack() as stack:
        stack.enter_context(single_threaded())
        pin = device.type == "cuda"
        if is_adapter(base):
            raise FedmergeError(
                f"the base {base} is a PEFT adapter; give the full model it adapts as the base, and "
                "adapters among the models (--models)."
            )
        source = stack.enter_context(Checkpoint(base, pin))
        finetuned = [stack.enter_context(open_model(model, source, pin)) for model in models]
        check_compatible(source, finetuned)
        stats = None if statistics is None else [stack.enter_context(Checkpoint(path, pin)) for path in statistics]
        specs = source.specs
        single_file = out.name.endswith(".safetensors")
        shards = [Shard(out.name, list(specs))] if single_file else plan_shards(source.groups(), specs, max_size)
        kept, left_out = list(range(len(models))), []
        for t, weight in enumerate(options["weights"] or []):
            if weight == 0:  # absent under every rule: not in T either (β = λ·T counts the models merged)
                left_out.append({"model": str(models[t]), "reason": "weight 0"})
                warnings.warn(ModelLeftOut(f"left out {models[t]}: its weight is 0."), stacklevel=2)
        while True:
            chosen = {key: _pick(options.get(key), kept) for key in per_model}
            labels = None if statistics is None else _pick([f"{path}'s" for path in statistics], kept)
            rule = build_rule(method, len(kept), statistics=_pick(stats, kept), labels=labels, **{**options, **chosen})
            merged = [t for i, t in enumerate(kept) if not chosen["weights"] or chosen["weights"][i] != 0]
            scale = resolve_scale(method, len(merged), scaling, server_lr)

            def record() -> dict:  # called after the rule's first pass
                made = _record(method, rule, chosen["weights"], scale, base, _pick(models, merged), left_out, device)
                return made if steps is None else {**made, **steps.record()}

            try:
                _write(
                    out, shards, source, _pick(finetuned, kept), rule, scale.server_lr, record, force, progress, device
                )
                if note is not None:
                    note(str(scale))
                    if steps is not None:
                        note(str(steps))
                return out
            except _NonFinite as bad:
                culprit = source if bad.model is None else finetuned[kept[bad.model]]
                if bad.model is None:
                    raise FedmergeError(f"{non_finite(culprit, bad.name, 'the base')}; nothing was written.") from None
                if not skip_nonfinite:
                    raise FedmergeError(
                        f"{non_finite(culprit, bad.name)}; nothing was written. Repair or drop that model, or pass "
                        "--skip-nonfinite (skip_nonfinite=True) to leave such models out."
                    ) from None
                model = models[kept.pop(bad.model)]
                left_out.append({"model": str(model), "reason": f"non-finite values in tensor {bad.name!r}"})
                file = culprit.specs[bad.name].file.name
                warnings.warn(
                    ModelLeftOut(f"left out {model}: tensor {bad.name!r} in {file} holds NaN or infinite values."),
                    stacklevel=2,
                )
                if not kept:
                    raise FedmergeError(
                        "every model holds NaN or infinite values: nothing to merge; nothing was written."
                    ) from None


def _pick(values: Sequence | None, kept: Sequence[int]) -> list | None:
    return None if values is None else [values[t] for t in kept]


def _write(
    out: Path,
    shards: Sequence[Shard],
    source: Checkpoint,
    finetuned: Sequence[Checkpoint],
    rule: Rule,
    beta: float,
    record: Callable[[], dict],
    force: bool,
    progress: bool,
    device: torch.device,
) -> None:
    """One pass: merge on ``device`` and write every shard (from the CPU); raises :class:`_NonFinite` (nothing
    written) on bad values."""
    specs, single_file = source.specs, out.name.endswith(".safetensors")
    names = [name for shard in shards for name in shard.names]
    with MergeProgress(len(names), len(shards), progress) as display, ThreadPoolExecutor(1) as writer:
        display.preparing()
        squared_norms = np.zeros(len(finetuned))
        merged = iter_merged_model(rule, source, finetuned, beta, names, squared_norms, device)
        merged = _watch(merged, source, finetuned, squared_norms)
        first = next(merged)  # runs the rule's first pass (CCLIP's norms) before any file is written
        metadata = record()
        header = {"format": "pt", "fedmerge": json.dumps(metadata)}
        tensors = display.track(itertools.chain([first], merged))
        with staged(out, directory=not single_file, replace=force) as target:
            for shard in shards:
                path = target if single_file else target / shard.filename
                write_shard(path, {name: specs[name] for name in shard.names}, tensors, header, writer)
                display.shard_done()
            if not single_file:
                if len(shards) > 1:
                    write_index(target, shards, specs, {"fedmerge": metadata})
                if source.directory is not None:
                    copy_side_files(source.directory, target)
