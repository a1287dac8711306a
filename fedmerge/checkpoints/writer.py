"""Writing a merged checkpoint: shard by shard, tensor by tensor, atomically.

The output is staged beside OUT by :func:`fedmerge.files.staged` (with the user's umask) and renamed into
place only once complete, so a failed or interrupted merge leaves nothing at OUT; a full file system (or
quota, or file-size limit) ends it with a :class:`~fedmerge.files.DiskFull` naming the shard and its size.
A directory output is in Hugging Face's layout:
``model.safetensors``, or ``model-0000i-of-0000N.safetensors`` shards with ``model.safetensors.index.json``.
"""

import json
import os
import re
import shutil
from collections import deque
from concurrent.futures import Executor, Future, wait
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch

from fedmerge.errors import FedmergeError
from fedmerge.files import DISK_FULL, check_output_dir, disk_full
from fedmerge.checkpoints.safetensors_format import TensorSpec, layout, tensor_bytes

INDEX_NAME = "model.safetensors.index.json"
WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".ckpt", ".h5", ".msgpack", ".gguf", ".index.json")
_UNITS = {
    "": 1,
    "B": 1,
    "KB": 10**3,
    "MB": 10**6,
    "GB": 10**9,
    "TB": 10**12,
    "KIB": 2**10,
    "MIB": 2**20,
    "GIB": 2**30,
    "TIB": 2**40,
}


@dataclass(frozen=True)
class Shard:
    """One output file and the tensors it holds, in the order they are merged."""

    filename: str
    names: list[str]


def parse_size(size: int | str) -> int:
    """Bytes from an int or a string such as ``"5GB"`` (10⁹ bytes, as Hugging Face counts) or ``"2GiB"``."""
    if isinstance(size, int):
        value = size
    else:
        match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([A-Za-z]*)\s*", str(size))
        if not match or match.group(2).upper() not in _UNITS:
            raise FedmergeError(f"cannot read the shard size {size!r}; write it like 5GB, 500MB or 2GiB.")
        value = int(float(match.group(1)) * _UNITS[match.group(2).upper()])
    if value <= 0:
        raise FedmergeError(f"the shard size must be positive, got {size!r}.")
    return value


def shard_names(count: int) -> list[str]:
    """Hugging Face's file names for ``count`` shards."""
    if count == 1:
        return ["model.safetensors"]
    return [f"model-{i:05d}-of-{count:05d}.safetensors" for i in range(1, count + 1)]


def plan_shards(groups: Sequence[Sequence[str]], specs: Mapping[str, TensorSpec], max_size: int | None) -> list[Shard]:
    """Shards keeping the base's grouping, or, with ``max_size``, filled in order up to that many bytes."""
    if max_size is not None:
        names = [name for group in groups for name in group]
        groups, current, total = [], [], 0
        for name in names:
            if current and total + specs[name].nbytes > max_size:
                groups.append(current)
                current, total = [], 0
            current.append(name)
            total += specs[name].nbytes
        groups.append(current)
    return [Shard(filename, list(group)) for filename, group in zip(shard_names(len(groups)), groups)]


def write_shard(
    path: Path,
    specs: Mapping[str, TensorSpec],
    tensors: Iterator[tuple[str, torch.Tensor]],
    metadata: Mapping[str, str],
    writer: Executor,
) -> None:
    """Write the tensors of ``specs`` as one safetensors file, taking them one at a time from ``tensors``.

    Each tensor is written by ``writer`` (one thread) while the next one is made; at most two wait, so memory
    holds a few tensors whatever the shard's size. Every write has ended when this returns or raises.
    Raises :class:`~fedmerge.files.DiskFull` when the shard does not fit.
    """
    header, offsets = layout(specs, metadata)
    try:
        _write_tensors(path, header, offsets, specs, tensors, writer)
    except OSError as error:
        if error.errno not in DISK_FULL:
            raise
        raise disk_full(error, path, len(header) + sum(spec.nbytes for spec in specs.values())) from None


def _write_tensors(
    path: Path,
    header: bytes,
    offsets: Mapping[str, int],
    specs: Mapping[str, TensorSpec],
    tensors: Iterator[tuple[str, torch.Tensor]],
    writer: Executor,
) -> None:
    pending: deque[Future] = deque()
    with open(path, "wb") as f:
        try:
            f.write(header)
            f.flush()
            for expected in specs:
                name, tensor = next(tensors)
                spec = specs[name]
                if name != expected or tensor.dtype != spec.dtype or tuple(tensor.shape) != spec.shape:
                    raise RuntimeError(f"writer expected {expected!r} {spec.dtype} {spec.shape}, got {name!r}")
                pending.append(writer.submit(_put, f.fileno(), tensor, offsets[name]))
                del tensor  # the writer holds it until written
                while len(pending) > 2:
                    pending.popleft().result()
            while pending:
                pending.popleft().result()
        finally:
            wait(pending)  # never close the file under a write


def _put(fd: int, tensor: torch.Tensor, offset: int) -> None:
    """Write a tensor's bytes at ``offset`` (positioned writes; a write may be short)."""
    data = tensor_bytes(tensor)
    done = 0
    while done < len(data):
        done += os.pwrite(fd, data[done:], offset + done)


def write_index(directory: Path, shards: Sequence[Shard], specs: Mapping[str, TensorSpec], metadata: Mapping) -> None:
    """``model.safetensors.index.json``: the total size, ``metadata`` and which shard holds each tensor."""
    index = {
        "metadata": {"total_size": sum(spec.nbytes for spec in specs.values()), **metadata},
        "weight_map": {name: shard.filename for shard in shards for name in shard.names},
    }
    (directory / INDEX_NAME).write_text(json.dumps(index, indent=2) + "\n")


def copy_side_files(source: Path, directory: Path) -> list[str]:
    """Copy the base directory's other top-level files (config, tokenizer, ...); its weights are not copied."""
    copied = []
    for file in sorted(source.iterdir()):
        if file.is_file() and not file.name.startswith(".") and not file.name.endswith(WEIGHT_SUFFIXES):
            shutil.copy2(file, directory / file.name)
            copied.append(file.name)
    return copied


def check_output(out: Path, inputs: Sequence[Path], force: bool) -> None:
    """Refuse an OUT that exists (without ``force``), that is or holds one of the inputs, or that lies under a file."""
    check_output_dir(out.parent, f"the output {out}: its directory")
    resolved = out.resolve()
    for path in inputs:
        if resolved == Path(path).resolve() or resolved in Path(path).resolve().parents:
            raise FedmergeError(
                f"the output {out} is or holds the input {path}; replacing it would delete the input. "
                "Choose another output path."
            )
    if out.exists() and not force:
        raise FedmergeError(
            f"the output {out} already exists; choose another path or pass --force (force=True) to replace it."
        )
