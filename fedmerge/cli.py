"""The ``fedmerge`` command line: a thin front-end over the package's layers.

Each subcommand lives in the module of its layer and exposes ``register(subparsers)``, which adds its
parser and sets ``handler``. Only the module of the command being run is imported (torch, Flower and Ray
load in a few seconds; ``fedmerge --help`` should not wait for them). A :class:`FedmergeError` is printed
without a traceback and exits 2; Ctrl-C exits 130.
"""

import argparse
import os
import signal
import sys
import threading
import time

from fedmerge import __version__
from fedmerge.errors import FedmergeError

COMMANDS = {
    "run": ("fedmerge.simulations.command", "run a simulation (a preset or a TOML experiment file)"),
    "list": ("fedmerge.simulations.command", "list strategies, task suites and presets"),
    "merge": ("fedmerge.checkpoints.command", "merge fine-tuned checkpoints of one base model offline (streaming, any size)"),
    "sweep": ("fedmerge.simulations.sweep_command", "run a grid of experiments (resumable)"),
    "findings": ("fedmerge.studies.command", "test the paper's claims (study sweeps, paired statistics) and write docs/findings.md"),
    "report": ("fedmerge.report.command", "tables and figures (Markdown + HTML) from a run or a sweep"),
    "evaluate": ("fedmerge.simulations.evaluate_command", "merge fine-tuned checkpoints with every rule and evaluate them on a suite's tasks"),
}
"""Command → (the module that registers it, its one-line help)."""

SHUTDOWN_SECONDS = 10.0
"""After Ctrl-C, how long the run's threads get to stop before the process exits regardless."""


def build_parser(command: str | None = None) -> argparse.ArgumentParser:
    """The parser; ``command``'s module registers its full parser, the others are listed by name only."""
    parser = argparse.ArgumentParser(
        prog="fedmerge",
        description=(
            "Federated learning in which model merging is a one-round federation: Task Arithmetic with "
            "scaling λ is one round of FedAvg with server learning rate β = λ·T."
        ),
        epilog="`fedmerge COMMAND --help` explains each command. Docs: docs/ in the repository.",
    )
    parser.add_argument("--version", action="version", version=f"fedmerge {__version__}")
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND")
    loaded = COMMANDS[command][0] if command in COMMANDS else None
    for name, (module_name, help_text) in COMMANDS.items():
        if module_name == loaded:
            if name == command:
                __import__(module_name, fromlist=["register"]).register(subparsers)
        else:
            subparsers.add_parser(name, help=help_text)
    return parser


def _command(argv: list[str]) -> str | None:
    return next((arg for arg in argv if not arg.startswith("-")), None)


def _finish_interrupted() -> None:
    """After Ctrl-C: a second one exits at once; threads still running get a few seconds, then we go."""
    signal.signal(signal.SIGINT, lambda *_: os._exit(130))
    deadline = time.monotonic() + SHUTDOWN_SECONDS
    for thread in threading.enumerate():
        if thread is not threading.current_thread() and not thread.daemon:
            thread.join(max(0.0, deadline - time.monotonic()))
    if any(t.is_alive() and not t.daemon for t in threading.enumerate() if t is not threading.current_thread()):
        sys.stderr.flush()
        os._exit(130)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    try:  # Ctrl-C while the command's modules load (torch takes seconds) ends as quietly as during its run
        parser = build_parser(_command(argv))
        args = parser.parse_args(argv)
        if not getattr(args, "handler", None):
            parser.print_help()
            return 2
        return int(args.handler(args) or 0)
    except FedmergeError as error:
        print(f"fedmerge: error: {error}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("fedmerge: interrupted (nothing half-written is left behind)", file=sys.stderr)
        _finish_interrupted()
        return 130


if __name__ == "__main__":
    sys.exit(main())
