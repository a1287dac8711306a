"""Progress display of a merge over tensors and shards (rich, on standard error, only on a terminal)."""

from collections.abc import Iterator

import torch
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

Item = tuple[str, torch.Tensor]


class MergeProgress:
    """Two bars, tensors and shards; a no-op unless ``enabled`` and standard error is a terminal.

    Use as a context manager; :meth:`track` counts the tensors of an iterator as they go by.
    """

    def __init__(self, num_tensors: int, num_shards: int, enabled: bool = True) -> None:
        console = Console(stderr=True)
        self._progress = Progress(
            TextColumn("{task.description:<32}"),
            BarColumn(),
            MofNCompleteColumn(),
            TimeElapsedColumn(),
            console=console,
            disable=not (enabled and console.is_terminal),
        )
        self._tensors = self._progress.add_task("reading checkpoints", total=num_tensors)
        self._shards = self._progress.add_task("shards written", total=num_shards)

    def __enter__(self) -> "MergeProgress":
        self._progress.start()
        return self

    def __exit__(self, *exc) -> None:
        self._progress.stop()

    def preparing(self) -> None:
        """Say that the rule's first pass (CCLIP reads every tensor for its norms) is under way."""
        self._progress.update(self._tensors, description="preparing (CCLIP: norms)")

    def track(self, items: Iterator[Item]) -> Iterator[Item]:
        """Yield ``items``, advancing the tensor bar after each."""
        self._progress.update(self._tensors, description="tensors merged")
        for item in items:
            self._progress.advance(self._tensors)
            yield item
            del item  # let the tensor go before the next one is merged

    def shard_done(self) -> None:
        self._progress.advance(self._shards)
