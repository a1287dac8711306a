"""The ``fedmerge`` command line: a thin front-end over the package's layers.

Each subcommand lives in the module of its layer and exposes ``register(subparsers)``, which adds its
parser and sets ``handler``. Only the module of the command being run is imported (torch, Flower and Ray
load in seconds, a minute on a loaded machine; ``fedmerge --help`` should not wait for them), and only
after the output path (``--out``) is checked. A :class:`FedmergeError` is printed without a traceback and
exits 2. Ctrl-C exits 130, SIGTERM (Slurm, ``docker stop``, systemd, ``timeout``) 143: both unwind the
command (its outputs, its processes), print one line and end the process within seconds.
"""

import argparse
import os
import signal
import sys
import threading
from pathlib import Path

from fedmerge import __version__
from fedmerge.errors import FedmergeError
from fedmerge import files
from fedmerge.files import check_output_dir

COMMANDS = {
    "run": ("fedmerge.simulations.command", "run a simulation (a preset or a TOML experiment file)", "directory"),
    "list": ("fedmerge.simulations.command", "list strategies, task suites and presets", None),
    "merge": (
        "fedmerge.checkpoints.command",
        "merge fine-tuned checkpoints of one base model offline (streaming, any size)",
        "entry",
    ),
    "sweep": ("fedmerge.simulations.sweep_command", "run a grid of experiments (resumable)", "directory"),
    "findings": (
        "fedmerge.studies.command",
        "test the paper's claims (study sweeps, paired statistics) and write docs/findings.md",
        "entry",
    ),
    "report": ("fedmerge.report.command", "tables and figures (Markdown + HTML) from a run or a sweep", "directory"),
    "evaluate": (
        "fedmerge.simulations.evaluate_command",
        "merge fine-tuned checkpoints with every rule and evaluate them on a suite's tasks",
        "directory",
    ),
}
"""Command → (the module that registers it, its one-line help, what its ``--out`` names: a directory to write in or
to create, or an entry, file or directory, of a directory)."""

SHUTDOWN_SECONDS = 3.0
"""After Ctrl-C or SIGTERM, how long the outputs still being written get to finish before the process exits."""

EXIT_CODES = {"interrupted": 130, "terminated by SIGTERM": 143}
"""How an interrupted command exits: 128 + the signal's number, as a shell reports a process the signal ended."""


class Terminated(KeyboardInterrupt):
    """SIGTERM: the command stops as on Ctrl-C (every ``except KeyboardInterrupt`` and ``finally`` cleans up)."""


def _terminate(signum, frame) -> None:
    raise Terminated("terminated by SIGTERM")


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
    for name, (module_name, help_text, _) in COMMANDS.items():
        if module_name == loaded:
            if name == command:
                __import__(module_name, fromlist=["register"]).register(subparsers)
        else:
            subparsers.add_parser(name, help=help_text)
    return parser


def _command(argv: list[str]) -> str | None:
    return next((arg for arg in argv if not arg.startswith("-")), None)


def check_out(command: str | None, argv: list[str]) -> None:
    """Check ``--out`` (given as ``--out X`` or ``--out=X``) before the command's modules load: a path at or under a
    file, or in a folder that cannot be written, fails in a fraction of a second instead of after the imports."""
    kind = COMMANDS[command][2] if command in COMMANDS else None
    if kind is None or "-h" in argv or "--help" in argv:
        return
    out = None
    for arg, following in zip(argv, [*argv[1:], None]):  # the last one counts, as for argparse
        if arg == "--out" and following is not None:
            out = Path(following)
        elif arg.startswith("--out="):
            out = Path(arg.removeprefix("--out="))
    if out is None:
        return
    if kind == "directory":
        check_output_dir(out, "--out")
    else:
        check_output_dir(out.parent, f"--out {out}: its directory")


def _exit_interrupted(interrupt: KeyboardInterrupt) -> None:
    """Say what stopped the command, let the outputs still being written finish (or remove them), and end the
    process: its threads may be blocked in Ray for good, and tearing the interpreter down under them can crash."""
    what = "terminated by SIGTERM" if isinstance(interrupt, Terminated) else "interrupted"
    code = EXIT_CODES[what]
    for signum in (signal.SIGINT, signal.SIGTERM):  # a second one ends the process at once
        signal.signal(signum, lambda *_: os._exit(code))
    notes = "".join(f"; {note}" for note in getattr(interrupt, "__notes__", []))
    print(f"fedmerge: {what}{notes}; nothing half-written is left behind.", file=sys.stderr, flush=True)
    files.close(SHUTDOWN_SECONDS)
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    in_main_thread = threading.current_thread() is threading.main_thread()
    previous = signal.signal(signal.SIGTERM, _terminate) if in_main_thread else None
    try:  # Ctrl-C while the command's modules load (torch takes seconds) ends as quietly as during its run
        command = _command(argv)
        check_out(command, argv)
        parser = build_parser(command)
        args = parser.parse_args(argv)
        if not getattr(args, "handler", None):
            parser.print_help()
            return 2
        return int(args.handler(args) or 0)
    except FedmergeError as error:
        print(f"fedmerge: error: {error}", file=sys.stderr)
        return 2
    except KeyboardInterrupt as interrupt:
        _exit_interrupted(interrupt)
    finally:
        if in_main_thread:
            signal.signal(signal.SIGTERM, signal.SIG_DFL if previous is None else previous)


if __name__ == "__main__":
    sys.exit(main())
