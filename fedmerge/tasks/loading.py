"""Batches from a data set onto a device: how training, pretraining, evaluation and the λ/ρ selection read data.

A data set is any map-style :class:`torch.utils.data.Dataset` of ``(input, target)`` pairs; an input may be a
tensor or a nested dict / list / tuple of tensors (a tokenizer's or a processor's output). A
:class:`~torch.utils.data.TensorDataset` is the in-memory fast path: batches are indexed straight from its
tensors, no DataLoader. Any other data set goes through a :class:`~torch.utils.data.DataLoader`, and an item that
cannot be read (a corrupt image) raises a :class:`FedmergeError` naming the item and, where the data set knows
it, its file.
"""

from collections.abc import Iterator, Mapping, Sequence
from typing import Any

import torch
from torch.utils.data import DataLoader, Dataset, Subset, TensorDataset, default_collate

from fedmerge.errors import FedmergeError

Batch = tuple[Any, torch.Tensor]
Device = torch.device | str | None


def to_device(data: Any, device: Device, non_blocking: bool = False) -> Any:
    """``data`` with every tensor in it (nested in dicts, lists, tuples) moved to ``device``; as is for None."""
    if device is None:
        return data
    if isinstance(data, torch.Tensor):
        return data.to(device, non_blocking=non_blocking)
    if isinstance(data, Mapping):
        moved = {key: to_device(value, device, non_blocking) for key, value in data.items()}
        try:
            return type(data)(moved)  # dict, OrderedDict, a tokenizer's BatchEncoding
        except TypeError:
            return moved
    if isinstance(data, (list, tuple)):
        moved = [to_device(value, device, non_blocking) for value in data]
        return type(data)(*moved) if hasattr(data, "_fields") else type(data)(moved)
    return data


class NamedReads(Dataset):
    """``dataset`` whose failing reads raise a :class:`FedmergeError` naming the item (and its file, if known)."""

    def __init__(self, dataset: Dataset) -> None:
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, index: int):
        try:
            return self.dataset[index]
        except FedmergeError:
            raise
        except Exception as error:  # a corrupt file, a user's __getitem__ failing
            first = (str(error).splitlines() or [""])[0]
            raise FedmergeError(
                f"item {index}{item_file(self.dataset, index)} cannot be read ({type(error).__name__}: "
                f"{first}); repair or remove it."
            ) from None


def item_file(dataset: Dataset, index: int) -> str:
    """`` (its file)`` where the data set knows the item's file (an ImageFolder's ``samples``, through Subsets)."""
    while isinstance(dataset, Subset):
        index, dataset = dataset.indices[index], dataset.dataset
    samples = getattr(dataset, "samples", None) or getattr(dataset, "imgs", None)
    try:
        return f" ({samples[index][0]})"
    except (TypeError, IndexError, KeyError):
        return ""


def _read(batches: Iterator) -> Iterator:
    """The loader's batches; a worker process's read failure re-raised as its one-line message."""
    try:
        yield from batches
    except FedmergeError as error:  # from a worker, torch prefixes the worker's traceback: keep the message
        raise FedmergeError(str(error).rstrip().splitlines()[-1].split("FedmergeError: ", 1)[-1]) from None


def gather(dataset: Dataset, indices: torch.Tensor | Sequence[int], *, device: Device = None) -> Batch:
    """The examples at ``indices`` as one ``(inputs, targets)`` batch on ``device`` (repeats allowed)."""
    if isinstance(dataset, TensorDataset):
        inputs, targets = dataset.tensors
        return to_device((inputs[indices], targets[indices]), device)
    named = NamedReads(dataset)
    return to_device(default_collate([named[int(i)] for i in indices]), device)


def train_batches(
    dataset: Dataset,
    batch_size: int,
    seed: int,
    *,
    num_workers: int = 0,
    pin_memory: bool = False,
    device: Device = None,
) -> Iterator[Batch]:
    """Endless ``(inputs, targets)`` minibatches on ``device``: shuffled passes without replacement.

    Each pass drops its ragged tail; a ``batch_size`` ≥ the set's size gives the whole set, in order, every
    step. The order comes from one local generator seeded by ``seed`` (the global RNG is untouched): the same
    seed gives the same batches, whatever ``num_workers``. Other than a :class:`TensorDataset`, the data is
    read by a DataLoader with ``num_workers`` persistent worker processes, whose ``random``, numpy and torch
    generators torch seeds from ``seed``: random transforms repeat for the same seed and ``num_workers``, but
    draw other values with 0 workers (the main process's RNG) than with some. ``pin_memory`` pins batches bound
    for a GPU and copies them asynchronously.
    """
    size = len(dataset)
    if size == 0:
        raise FedmergeError("the training set is empty; every client needs at least one training example.")
    indices = _shuffled_batches(size, batch_size, torch.Generator().manual_seed(seed))
    if not isinstance(dataset, TensorDataset):
        lists = (index.tolist() for index in indices)
        loader = _loader(
            NamedReads(dataset),
            num_workers,
            pin_memory,
            device,
            torch.Generator().manual_seed(seed),
            batch_sampler=lists,
        )
        for batch in _read(loader):
            yield to_device(batch, device, loader.pin_memory)
    if batch_size >= size:
        whole = to_device(tuple(dataset.tensors), device)
        while True:
            yield whole
    for index in indices:
        yield gather(dataset, index, device=device)


def eval_batches(
    dataset: Dataset, batch_size: int, *, num_workers: int = 0, pin_memory: bool = False, device: Device = None
) -> Iterator[Batch]:
    """One ordered pass over ``dataset`` in ``(inputs, targets)`` batches on ``device`` (the last may be smaller).

    Reads as :func:`train_batches` does (a DataLoader unless a :class:`TensorDataset`), without shuffling.
    """
    if isinstance(dataset, TensorDataset):
        for start in range(0, len(dataset), batch_size):
            yield to_device(tuple(t[start : start + batch_size] for t in dataset.tensors), device)
        return
    loader = _loader(
        NamedReads(dataset), num_workers, pin_memory, device, torch.Generator().manual_seed(0), batch_size=batch_size
    )
    for batch in _read(loader):
        yield to_device(batch, device, loader.pin_memory)


def _shuffled_batches(size: int, batch_size: int, generator: torch.Generator) -> Iterator[torch.Tensor]:
    """Endless index batches: shuffled passes dropping the ragged tail; all of ``range(size)`` if it fits one batch."""
    if batch_size >= size:
        while True:
            yield torch.arange(size)
    while True:
        order = torch.randperm(size, generator=generator)
        for start in range(0, size - batch_size + 1, batch_size):
            yield order[start : start + batch_size]


def _loader(dataset, num_workers, pin_memory, device, generator, **batching) -> DataLoader:
    """A DataLoader whose workers are seeded from ``generator``; memory is pinned only for batches bound for a GPU."""
    pin = pin_memory and device is not None and torch.device(device).type == "cuda"
    return DataLoader(
        dataset,
        **batching,
        generator=generator,
        num_workers=num_workers,
        pin_memory=pin,
        persistent_workers=num_workers > 0,
    )
