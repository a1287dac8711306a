"""Progress of a long run: a live bar on a terminal, plain log lines elsewhere (batch jobs, ``nohup``)."""

import sys
import threading
import time

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn


class ProgressDisplay:
    """``advance(message)`` moves the bar one step (or prints one line) saying what was just done.

    ``enabled=False`` shows nothing. Safe to call from any thread.
    """

    def __init__(self, total: int, title: str, enabled: bool = True) -> None:
        console = Console(stderr=True)
        self.total, self.title, self.done = total, title, 0
        self.live = enabled and console.is_terminal
        self.lines = enabled and not self.live
        self.progress = Progress(
            TextColumn("[bold]{task.description}"),
            BarColumn(),
            MofNCompleteColumn(),
            TimeElapsedColumn(),
            TextColumn("left"),
            TimeRemainingColumn(),
            TextColumn("{task.fields[last]}"),
            console=console,
            disable=not self.live,
        )
        self.task = self.progress.add_task(title, total=total, last="")
        self.started = time.perf_counter()
        self.lock = threading.Lock()

    def __enter__(self) -> "ProgressDisplay":
        self._line("started")
        self.progress.start()
        return self

    def __exit__(self, *exc) -> None:
        self.progress.stop()

    def advance(self, message: str) -> None:
        with self.lock:
            self.done += 1
            self.progress.update(self.task, advance=1, last=message)
            self._line(message)

    def _line(self, message: str) -> None:
        if self.lines:
            elapsed = time.perf_counter() - self.started
            left = f" (about {elapsed / self.done * (self.total - self.done):.0f}s left)" if self.done else ""
            print(
                f"{self.title} [{self.done}/{self.total}] {elapsed:.0f}s{left} {message}", file=sys.stderr, flush=True
            )
