"""The Python API of offline merging: ``merge_checkpoints(base, models, out, method=...)``.

Tensors stream from the inputs through the merging core's :func:`fedmerge.merging.iter_merged_model`
into the output, so memory holds a few tensors at a time (about T + 3 of the largest, in float32),
whatever the model's size. bfloat16 and float16 stay in their dtype; arithmetic is in float32.
"""

import itertools
import json
import os
from collections.abc import Iterator, Mapping, Sequence
from contextlib import ExitStack
from pathlib import Path

import torch

from fedmerge import __version__
from fedmerge.errors import FedmergeError
from fedmerge.files import staged
from fedmerge.merging import Rule, iter_merged_model
from fedmerge.threads import single_threaded
from fedmerge.checkpoints.methods import build_rule, resolve_server_lr
from fedmerge.checkpoints.progress import MergeProgress
from fedmerge.checkpoints.reader import Checkpoint
from fedmerge.checkpoints.validate import check_compatible
from fedmerge.checkpoints.writer import (
    Shard, check_output, copy_side_files, parse_size, plan_shards, write_index, write_shard,
)

CONVENTION = (
    "merged = base + server_lr * delta, delta the rule's mean-scale update (FedAvg: the mean task vector); "
    "Task Arithmetic's scaling lambda = server_lr / T"
)


class _ReuseLast(Mapping[str, torch.Tensor]):
    """A mapping that reads each tensor once while it is asked for repeatedly (the base, by every τ_t)."""

    def __init__(self, tensors: Mapping[str, torch.Tensor]) -> None:
        self._tensors = tensors
        self._last: tuple[str, torch.Tensor] | None = None

    def __getitem__(self, name: str) -> torch.Tensor:
        if self._last is None or self._last[0] != name:
            self._last = (name, self._tensors[name])
        return self._last[1]

    def __iter__(self) -> Iterator[str]:
        return iter(self._tensors)

    def __len__(self) -> int:
        return len(self._tensors)


def _record(method: str, rule: Rule, weights, server_lr: float, base, models: Sequence) -> dict:
    """What the output's metadata says about how it was made (read after the rule's first pass)."""
    return {
        "fedmerge_version": __version__,
        "method": method,
        "rule": rule.params(),
        "weights": None if weights is None else [float(w) for w in weights],
        "server_lr": server_lr,
        "scaling": server_lr / len(models),
        "convention": CONVENTION,
        "base": str(base),
        "models": [str(m) for m in models],
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
    steps: Sequence[float] | None = None,
    lr_sums: Sequence[float] | None = None,
    rho: float | None = None,
    iterations: int | None = None,
    even: str | None = None,
    max_shard_size: int | str | None = None,
    force: bool = False,
    progress: bool = False,
) -> Path:
    """Merge fine-tuned checkpoints of one base into a new checkpoint at ``out``.

    Parameters
    ----------
    base : the pretrained checkpoint θ (a file or a model directory).
    models : the fine-tuned checkpoints θ_t, T ≥ 1 of them, with exactly the base's tensors.
    out : a directory (Hugging Face layout, the base's config and tokenizer files copied) or, if it ends in
        ``.safetensors``, a single file.
    method : "task-arithmetic", "fedavg", "fednova", "fedgma", "median" or "cclip".
    scaling : Task Arithmetic's λ: merged = θ + λ·Σ_t τ_t for FedAvg. Exclusive with ``server_lr``.
    server_lr : β: merged = θ + β·Δ, Δ the rule's mean-scale update; β = λ·T. Neither given: β = 1.
    weights, steps, lr_sums, rho, iterations, even : the method's options, see
        :func:`fedmerge.checkpoints.methods.build_rule`.
    max_shard_size : bytes (int) or a size like "5GB" per output shard; default: the base's sharding.
    force : replace an existing ``out``.
    progress : show progress bars (on a terminal).

    Returns the output path. Raises :class:`FedmergeError` naming the file and tensor on bad input,
    before anything is written; nothing is left at ``out`` if the merge fails.
    """
    out, models = Path(out), list(models)
    rule = build_rule(
        method, len(models), weights=weights, steps=steps, lr_sums=lr_sums, rho=rho, iterations=iterations, even=even
    )
    beta = resolve_server_lr(len(models), scaling, server_lr)
    single_file = out.name.endswith(".safetensors")
    if single_file and max_shard_size is not None:
        raise FedmergeError(f"the output {out} is a single file; drop max_shard_size or give a directory.")
    max_size = None if max_shard_size is None else parse_size(max_shard_size)
    check_output(out, [Path(base), *map(Path, models)], force)

    with ExitStack() as stack:
        stack.enter_context(single_threaded())
        source = stack.enter_context(Checkpoint(base))
        finetuned = [stack.enter_context(Checkpoint(model)) for model in models]
        check_compatible(source, finetuned)
        specs = source.specs
        shards = [Shard(out.name, list(specs))] if single_file else plan_shards(source.groups(), specs, max_size)
        names = [name for shard in shards for name in shard.names]
        display = stack.enter_context(MergeProgress(len(names), len(shards), progress))
        display.preparing()
        merged = iter_merged_model(rule, _ReuseLast(source), finetuned, beta, names)
        first = next(merged)  # runs the rule's first pass (CCLIP's norms) before any file is written
        record = _record(method, rule, weights, beta, base, models)
        header = {"format": "pt", "fedmerge": json.dumps(record)}
        tensors = display.track(itertools.chain([first], merged))
        with staged(out, directory=not single_file, replace=force) as target:
            for shard in shards:
                path = target if single_file else target / shard.filename
                write_shard(path, {name: specs[name] for name in shard.names}, tensors, header)
                display.shard_done()
            if not single_file:
                if len(shards) > 1:
                    write_index(target, shards, specs, {"fedmerge": record})
                if source.directory is not None:
                    copy_side_files(source.directory, target)
    return out
