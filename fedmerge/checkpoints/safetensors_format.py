"""The safetensors format, read and written one tensor at a time.

A file is an 8-byte little-endian header length N, N bytes of JSON (``name → {dtype, shape,
data_offsets}`` plus an optional ``__metadata__`` of strings), then the tensors' bytes, contiguous.
Reading uses positioned reads into a fresh buffer rather than a long-lived memory map: a mapping keeps
every page it touched resident until the file is closed, so merging a model would end up holding all of
it. Writing lays the header out first (shapes and dtypes are known before any tensor is merged), then
puts each tensor at its offset as it arrives.
"""

import json
import os
import struct
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

import torch

from fedmerge.errors import FedmergeError

DTYPES = {
    "F64": torch.float64,
    "F32": torch.float32,
    "F16": torch.float16,
    "BF16": torch.bfloat16,
    "F8_E4M3": torch.float8_e4m3fn,
    "F8_E5M2": torch.float8_e5m2,
    "I64": torch.int64,
    "I32": torch.int32,
    "I16": torch.int16,
    "I8": torch.int8,
    "U64": torch.uint64,
    "U32": torch.uint32,
    "U16": torch.uint16,
    "U8": torch.uint8,
    "BOOL": torch.bool,
}
DTYPE_NAMES = {dtype: name for name, dtype in DTYPES.items()}
MAX_HEADER = 100_000_000  # the reference implementation's limit
MAX_READ = 1 << 30  # Linux caps one read at just under 2 GiB


@dataclass(frozen=True)
class TensorSpec:
    """Where a tensor lives and what it is: its file, dtype, shape, byte offset and size."""

    file: Path
    dtype: torch.dtype
    shape: tuple[int, ...]
    offset: int = 0
    nbytes: int = 0


def _numel(shape: tuple[int, ...]) -> int:
    n = 1
    for d in shape:
        n *= d
    return n


def nbytes(dtype: torch.dtype, shape: tuple[int, ...]) -> int:
    """Bytes of a tensor of ``dtype`` and ``shape``."""
    return _numel(shape) * dtype.itemsize


def read_header(path: Path) -> tuple[dict[str, TensorSpec], dict[str, str]]:
    """The tensors (in offset order) and the metadata of a safetensors file, checked against its size.

    Raises :class:`FedmergeError` naming the file (and tensor) if the file is truncated or corrupt.
    """
    size = path.stat().st_size
    with open(path, "rb") as f:
        prefix = f.read(8)
        if len(prefix) < 8:
            raise FedmergeError(f"{path}: not a safetensors file (only {size} bytes); is it truncated?")
        (length,) = struct.unpack("<Q", prefix)
        if length > MAX_HEADER or 8 + length > size:
            raise FedmergeError(
                f"{path}: corrupt or truncated safetensors file (header of {length} bytes in a file of {size})."
            )
        try:
            header = json.loads(f.read(length))
        except (UnicodeDecodeError, json.JSONDecodeError) as error:
            raise FedmergeError(f"{path}: corrupt safetensors header ({error}).") from None
    if not isinstance(header, dict):
        raise FedmergeError(f"{path}: corrupt safetensors header (not a JSON object).")
    metadata = header.pop("__metadata__", None) or {}
    start = 8 + length
    specs = {}
    for name, entry in header.items():
        try:
            dtype = DTYPES[entry["dtype"]]
            shape = tuple(int(d) for d in entry["shape"])
            begin, end = (int(o) for o in entry["data_offsets"])
        except (KeyError, TypeError, ValueError):
            raise FedmergeError(f"{path}: corrupt safetensors header entry for tensor {name!r}: {entry!r}.") from None
        if end - begin != nbytes(dtype, shape) or begin < 0:
            raise FedmergeError(f"{path}: corrupt safetensors header: tensor {name!r} has wrong data offsets.")
        if start + end > size:
            raise FedmergeError(
                f"{path}: truncated: tensor {name!r} ends at byte {start + end} but the file has {size} bytes."
            )
        specs[name] = TensorSpec(path, dtype, shape, start + begin, end - begin)
    return dict(sorted(specs.items(), key=lambda item: item[1].offset)), dict(metadata)


def read_tensor(fd: int, spec: TensorSpec, pin_memory: bool = False) -> torch.Tensor:
    """Read one tensor from an open file descriptor into its own CPU memory (page-locked if ``pin_memory``)."""
    buffer = torch.empty(spec.nbytes, dtype=torch.uint8, device="cpu", pin_memory=pin_memory)
    read_bytes(fd, spec, 0, buffer)
    return buffer.view(spec.dtype).reshape(spec.shape)


def read_bytes(fd: int, spec: TensorSpec, start: int, buffer: torch.Tensor) -> None:
    """Fill the uint8 CPU tensor ``buffer`` with the tensor's bytes from byte ``start`` of it on."""
    view = memoryview(buffer.numpy())
    done, size = 0, len(view)
    while done < size:
        count = os.preadv(fd, [view[done : done + MAX_READ]], spec.offset + start + done)
        if count == 0:
            raise FedmergeError(f"{spec.file}: truncated while reading a tensor at byte {spec.offset + start + done}.")
        done += count


def layout(specs: Mapping[str, TensorSpec], metadata: Mapping[str, str]) -> tuple[bytes, dict[str, int]]:
    """The header bytes of a file holding ``specs`` and each tensor's absolute byte offset.

    Tensors are laid out by decreasing item size (as the reference writer does), so every tensor is
    aligned to its dtype; the header is padded with spaces to a multiple of 8 bytes.
    """
    order = sorted(specs, key=lambda name: -specs[name].dtype.itemsize)
    header: dict = {"__metadata__": dict(metadata)} if metadata else {}
    relative, position = {}, 0
    for name in order:
        spec = specs[name]
        size = nbytes(spec.dtype, spec.shape)
        header[name] = {
            "dtype": DTYPE_NAMES[spec.dtype],
            "shape": list(spec.shape),
            "data_offsets": [position, position + size],
        }
        relative[name] = position
        position += size
    encoded = json.dumps(header, separators=(",", ":")).encode()
    encoded += b" " * (-len(encoded) % 8)
    start = 8 + len(encoded)
    return struct.pack("<Q", len(encoded)) + encoded, {name: start + r for name, r in relative.items()}


def tensor_bytes(tensor: torch.Tensor) -> memoryview:
    """A tensor's raw bytes (little-endian, row-major), copied to the CPU if it lives elsewhere; without a
    copy when it is a contiguous CPU tensor."""
    return memoryview(tensor.cpu().contiguous().reshape(-1).view(torch.uint8).numpy())
