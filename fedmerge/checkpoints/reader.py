"""Checkpoints on disk as lazy ``name → tensor`` mappings: a tensor is read only when indexed.

Accepted inputs: a ``.safetensors`` file; a PyTorch ``.bin``/``.pt``/``.pth`` file; or a Hugging Face
model directory holding one of those, or shards listed by a ``*.index.json``. PyTorch files are opened
with ``torch.load(weights_only=True, mmap=True)``: a pickle that would run code is refused.
"""

import json
import os
import pickle
import threading
from collections.abc import Iterator, Mapping
from pathlib import Path

import torch

from fedmerge.errors import FedmergeError
from fedmerge.checkpoints.safetensors_format import TensorSpec, nbytes, read_bytes, read_header, read_tensor

SAFETENSORS_SUFFIXES = (".safetensors",)
TORCH_SUFFIXES = (".bin", ".pt", ".pth")
INDEX_SUFFIX = ".index.json"
STANDARD_NAMES = ("model.safetensors", "pytorch_model.bin")  # beside them, e.g. training_args.bin is no model


class SafetensorsFile:
    """One safetensors file: its tensor specs, read by positioned reads (into pinned memory if asked)."""

    def __init__(self, path: Path, pin_memory: bool = False) -> None:
        self.path = path
        self.pin_memory = pin_memory
        self.specs, self.metadata = read_header(path)
        self._fd = os.open(path, os.O_RDONLY)

    def read(self, name: str) -> torch.Tensor:
        return read_tensor(self._fd, self.specs[name], self.pin_memory)

    def reader(self, name: str) -> "SliceReader":
        return SliceReader(self._fd, self.specs[name], self.pin_memory)

    def close(self) -> None:
        os.close(self._fd)


_buffers = threading.local()  # each thread's read buffer, grown as needed and reused: no allocation per read


class SliceReader:
    """One tensor of a safetensors file, read a flat slice at a time into the calling thread's buffer (the
    merging core's :class:`~fedmerge.merging.tensors.SliceReader`)."""

    def __init__(self, fd: int, spec: TensorSpec, pin_memory: bool) -> None:
        self.fd, self.spec, self.pin_memory = fd, spec, pin_memory
        self.shape, self.dtype = torch.Size(spec.shape), spec.dtype

    def read(self, s: slice) -> torch.Tensor:
        itemsize = self.dtype.itemsize
        size = (s.stop - s.start) * itemsize
        key = "pinned" if self.pin_memory else "plain"
        buffer = getattr(_buffers, key, None)
        if buffer is None or buffer.numel() < size:
            buffer = torch.empty(max(size, 1 << 20), dtype=torch.uint8, pin_memory=self.pin_memory)
            setattr(_buffers, key, buffer)
        read_bytes(self.fd, self.spec, s.start * itemsize, buffer[:size])
        return buffer[:size].view(self.dtype)


class TorchFile:
    """One PyTorch state-dict file, loaded memory-mapped with ``weights_only=True``."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.metadata: dict[str, str] = {}
        self._tensors = _load_state_dict(path)
        self.specs = {
            name: TensorSpec(path, t.dtype, tuple(t.shape), nbytes=nbytes(t.dtype, tuple(t.shape)))
            for name, t in self._tensors.items()
        }

    def read(self, name: str) -> torch.Tensor:
        return self._tensors[name]

    def reader(self, name: str) -> torch.Tensor:
        return self._tensors[name]  # memory-mapped: the core copies a chunk's elements only, even from a strided view

    def close(self) -> None:
        self._tensors = {}


def _load_state_dict(path: Path) -> dict[str, torch.Tensor]:
    try:
        try:
            state = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
        except RuntimeError as error:
            if "mmap" not in str(error):
                raise
            state = torch.load(path, map_location="cpu", weights_only=True)  # legacy (non-zip) format
    except pickle.UnpicklingError as error:
        raise FedmergeError(
            f"{path}: refused to load: it is not a plain state dict of tensors that torch.load(weights_only=True) "
            f"accepts, and fedmerge never unpickles arbitrary objects. Convert it to safetensors with a tool "
            f"you trust. ({str(error).splitlines()[0]})"
        ) from None
    except (RuntimeError, EOFError, OSError, ValueError) as error:
        raise FedmergeError(f"{path}: corrupt or truncated PyTorch file ({error}).") from None
    if not isinstance(state, Mapping):
        raise FedmergeError(f"{path}: expected a state dict (name → tensor), found a {type(state).__name__}.")
    for name, value in state.items():
        if not isinstance(value, torch.Tensor):
            raise FedmergeError(
                f"{path}: entry {name!r} is a {type(value).__name__}, not a tensor; save the model's state_dict()."
            )
    return dict(state)


def _open_file(path: Path, pin_memory: bool) -> SafetensorsFile | TorchFile:
    if path.name.endswith(SAFETENSORS_SUFFIXES):
        return SafetensorsFile(path, pin_memory)
    if path.name.endswith(TORCH_SUFFIXES):
        return TorchFile(path)
    raise FedmergeError(
        f"{path}: unknown checkpoint format; give a .safetensors, .bin, .pt or .pth file or a model directory."
    )


def find_weight_files(path: Path) -> tuple[list[Path], Path | None]:
    """The weight files of ``path`` (a file or a model directory) and the index listing them, if any.

    In a directory, safetensors is preferred to PyTorch files, an index to a lone file, and the standard
    names (model.safetensors, pytorch_model.bin) to other files.
    """
    if path.is_file():
        return [path], None
    if not path.is_dir():
        raise FedmergeError(f"{path}: no such file or directory.")
    for suffixes in (SAFETENSORS_SUFFIXES, TORCH_SUFFIXES):
        indexes = sorted(p for p in path.iterdir() if p.name.endswith(tuple(s + INDEX_SUFFIX for s in suffixes)))
        if len(indexes) > 1:
            raise FedmergeError(f"{path}: several shard indexes ({', '.join(p.name for p in indexes)}); keep one.")
        if indexes:
            return _indexed_files(indexes[0]), indexes[0]
        files = sorted(p for p in path.iterdir() if p.is_file() and p.name.endswith(suffixes))
        files = [p for p in files if p.name in STANDARD_NAMES] or files
        if len(files) > 1:
            raise FedmergeError(
                f"{path}: several weight files ({', '.join(p.name for p in files)}) and no *.index.json listing "
                "them; give the file to use."
            )
        if files:
            return files, None
    raise FedmergeError(
        f"{path}: no checkpoint found; expected model.safetensors, model.safetensors.index.json with its shards, "
        "or pytorch_model.bin."
    )


def _read_index(index: Path) -> dict[str, str]:
    try:
        weight_map = json.loads(index.read_text())["weight_map"]
    except (OSError, UnicodeDecodeError, json.JSONDecodeError, KeyError, TypeError) as error:
        raise FedmergeError(f"{index}: corrupt shard index ({error!r}); it needs a 'weight_map' object.") from None
    if not isinstance(weight_map, dict):
        raise FedmergeError(f"{index}: corrupt shard index: 'weight_map' is not an object.")
    return weight_map


def _indexed_files(index: Path) -> list[Path]:
    files = []
    for name, shard in _read_index(index).items():
        file = index.parent / shard
        if not file.is_file():
            raise FedmergeError(f"{index}: shard {shard!r} (holding tensor {name!r}) is missing.")
        if file not in files:
            files.append(file)
    return sorted(files)


def read_json_object(path: Path, what: str) -> dict:
    """The JSON object in ``path`` (``what`` it should be, for messages); :class:`FedmergeError` naming the file."""
    try:
        value = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
        raise FedmergeError(f"{path}: not a readable {what} ({error}).") from None
    if not isinstance(value, dict):
        raise FedmergeError(f"{path}: not a {what} (a JSON object).")
    return value


class StoredTensors(Mapping[str, torch.Tensor]):
    """A name → tensor mapping over tensors stored on disk: its names, order and metadata are ``specs``
    (name → :class:`TensorSpec`); tensors are read when indexed. Use as a context manager, or call ``close``."""

    specs: dict[str, TensorSpec]

    def close(self) -> None:
        """Release the files."""

    def __contains__(self, name: object) -> bool:
        return name in self.specs

    def __iter__(self) -> Iterator[str]:
        return iter(self.specs)

    def __len__(self) -> int:
        return len(self.specs)

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        self.close()


class Checkpoint(StoredTensors):
    """A checkpoint as a lazy mapping from tensor names to tensors, read one at a time when indexed.

    Parameters
    ----------
    path : str or Path
        A weight file or a model directory (see the module docstring).
    pin_memory : bool (default False)
        Read safetensors tensors into page-locked memory, for fast non-blocking copies to a CUDA device
        (needs CUDA). PyTorch files are memory-mapped and never pinned.

    Attributes: ``specs`` (name → :class:`TensorSpec`, shard by shard in file order), ``files`` (the weight
    files), ``directory`` (the model directory, or None for a lone file), ``config`` (its config.json, or
    None). Use as a context manager, or call :meth:`close`.
    """

    def __init__(self, path: str | os.PathLike, pin_memory: bool = False) -> None:
        self.path = Path(path)
        self.directory = self.path if self.path.is_dir() else None
        self.files, index = find_weight_files(self.path)
        self._files: list[SafetensorsFile | TorchFile] = []
        self._owner: dict[str, SafetensorsFile | TorchFile] = {}
        try:
            for file in self.files:
                self._files.append(_open_file(file, pin_memory))
            self.specs = self._collect_specs(index)
        except BaseException:
            self.close()
            raise
        self.config = self._read_config()

    def _collect_specs(self, index: Path | None) -> dict[str, TensorSpec]:
        specs: dict[str, TensorSpec] = {}
        for file in self._files:
            for name, spec in file.specs.items():
                if name in specs:
                    raise FedmergeError(
                        f"{self.path}: tensor {name!r} is in both {specs[name].file.name} and {file.path.name}."
                    )
                specs[name] = spec
                self._owner[name] = file
        if index is not None:
            weight_map = _read_index(index)
            for name, spec in specs.items():
                if weight_map.get(name) != spec.file.name:
                    raise FedmergeError(
                        f"{index}: tensor {name!r} is in {spec.file.name} but the index says "
                        f"{weight_map.get(name)!r}; the index and its shards disagree."
                    )
            for name, shard in weight_map.items():
                if name not in specs:
                    raise FedmergeError(f"{index}: tensor {name!r} is listed in {shard!r} but that shard lacks it.")
        if not specs:
            raise FedmergeError(f"{self.path}: the checkpoint holds no tensors.")
        return specs

    def _read_config(self) -> dict | None:
        config = self.directory / "config.json" if self.directory else None
        if config is None or not config.is_file():
            return None
        return read_json_object(config, "model config")

    @property
    def metadata(self) -> dict[str, str]:
        """The first weight file's safetensors metadata (empty for PyTorch files)."""
        return self._files[0].metadata

    def groups(self) -> list[list[str]]:
        """Tensor names grouped by weight file, in file order."""
        return [list(file.specs) for file in self._files]

    def __getitem__(self, name: str) -> torch.Tensor:
        try:
            owner = self._owner[name]
        except KeyError:
            raise KeyError(f"{self.path}: no tensor {name!r}") from None
        return owner.read(name)

    def reader(self, name: str) -> "SliceReader | torch.Tensor":
        """Tensor ``name`` to be read a flat slice at a time (the merging core reads checkpoints this way)."""
        return self._owner[name].reader(name)

    def close(self) -> None:
        for file in self._files:
            file.close()
        self._files = []

    def __repr__(self) -> str:
        return f"Checkpoint({str(self.path)!r}, {len(self.specs)} tensors in {len(self.files)} file(s))"
