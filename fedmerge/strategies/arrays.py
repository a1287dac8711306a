"""Read Flower ArrayRecords as torch tensors without copying, and write tensors back."""

import io
import warnings
from collections.abc import Iterator, Mapping

import numpy as np
import torch
from flwr.app import Array, ArrayRecord
from flwr.common.constant import SType

_HEADER_READERS = {(1, 0): np.lib.format.read_array_header_1_0, (2, 0): np.lib.format.read_array_header_2_0}


def array_view(array: Array) -> torch.Tensor:
    """A read-only tensor over an Array's serialized bytes (NumPy format), with no copy.

    Falls back to :meth:`Array.numpy` for layouts a plain view cannot express.
    """
    buffer = io.BytesIO(array.data)
    version = np.lib.format.read_magic(buffer)
    reader = _HEADER_READERS.get(version)
    if reader is None:
        return torch.from_numpy(array.numpy())
    shape, fortran_order, dtype = reader(buffer)
    if fortran_order or dtype.hasobject:
        return torch.from_numpy(np.require(array.numpy(), requirements="C"))
    count = int(np.prod(shape))
    values = np.frombuffer(array.data, dtype=dtype, count=count, offset=buffer.tell()).reshape(shape)
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="The given NumPy array is not writable")
        return torch.from_numpy(values)


class RecordTensors(Mapping[str, torch.Tensor]):
    """An ArrayRecord seen as a name → tensor mapping; each tensor is a zero-copy view made when first read (its
    header parsed once, however often the merge, its checks and its diagnostics read it)."""

    def __init__(self, record: ArrayRecord) -> None:
        self.record = record
        self._views: dict[str, torch.Tensor] = {}

    def __getitem__(self, name: str) -> torch.Tensor:
        if name not in self._views:
            self._views[name] = array_view(self.record[name])
        return self._views[name]

    def __iter__(self) -> Iterator[str]:
        return iter(self.record)

    def __len__(self) -> int:
        return len(self.record)


def to_array(tensor: torch.Tensor) -> Array:
    """A tensor as a Flower Array (NumPy serialization), copying its data once."""
    values = np.require(tensor.detach().cpu().numpy(), requirements="C")  # 0-d stays 0-d (ascontiguousarray: 1-d)
    header = io.BytesIO()
    np.lib.format.write_array_header_1_0(header, np.lib.format.header_data_from_array_1_0(values))
    data = b"".join([header.getvalue(), memoryview(values).cast("B")])
    return Array(dtype=str(values.dtype), shape=tuple(values.shape), stype=SType.NUMPY, data=data)
