"""The ``fedmerge`` command line: a thin front-end over the package's layers.

Each subcommand lives in the module of its layer and exposes ``register(subparsers)``, which adds its
parser and sets ``handler``. A :class:`FedmergeError` is printed without a traceback and exits 2.
"""

import argparse
import sys

from fedmerge import __version__
from fedmerge.errors import FedmergeError

COMMAND_MODULES = (
    "fedmerge.simulations.command",
    "fedmerge.checkpoints.command",
    "fedmerge.simulations.sweep_command",
    "fedmerge.report.command",
)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="fedmerge",
        description=(
            "Federated learning in which model merging is a one-round federation: Task Arithmetic with "
            "scaling λ is one round of FedAvg with server learning rate β = λ·T."
        ),
    )
    parser.add_argument("--version", action="version", version=f"fedmerge {__version__}")
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND")
    for module_name in COMMAND_MODULES:
        module = __import__(module_name, fromlist=["register"])
        module.register(subparsers)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "handler", None):
        parser.print_help()
        return 2
    try:
        return int(args.handler(args) or 0)
    except FedmergeError as error:
        print(f"fedmerge: error: {error}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("fedmerge: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
