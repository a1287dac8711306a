"""A live progress bar for long runs (rich), silent when asked or when output is not a terminal."""

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn


class ProgressDisplay:
    """``advance(message)`` moves the bar one step and shows what was just done."""

    def __init__(self, total: int, title: str, enabled: bool = True) -> None:
        console = Console(stderr=True)
        self.enabled = enabled and console.is_terminal
        self.progress = Progress(
            TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
            TextColumn("{task.fields[last]}"), console=console, disable=not self.enabled,
        )
        self.task = self.progress.add_task(title, total=total, last="")

    def __enter__(self) -> "ProgressDisplay":
        self.progress.start()
        return self

    def __exit__(self, *exc) -> None:
        self.progress.stop()

    def advance(self, message: str) -> None:
        self.progress.update(self.task, advance=1, last=message)
