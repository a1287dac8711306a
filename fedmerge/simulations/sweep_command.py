"""``fedmerge sweep``: a grid of runs, resumable (``fedmerge findings`` is :mod:`fedmerge.studies.command`)."""

import argparse
from pathlib import Path

from fedmerge.errors import FedmergeError

SWEEP_HELP = """\
Run a grid of experiments through the same runner as `fedmerge run`: every combination of the [grid] values
over the [base] spec is one cell, one ordinary results directory under DIR/cells/. Every cell's spec is
validated before any runs. Run the same command again after an interruption: finished cells are skipped.

sweep file:
  name = "alpha-sweep"
  [base]                            # a spec, or preset = "name" plus overrides
  preset = "data-heterogeneity"
  clients = 4
  [grid]                            # dotted spec keys → values; the cells are their product
  "suite_options.alpha" = [0.1, 1.0, 10.0]
  seed = [0, 1, 2]
  [grid.spread]                     # a named axis: keys that vary together, optional labels
  "training.lr" = [0.02, {geometric = [0.005, 0.08]}]
  "training.steps" = [200, {geometric = [50, 800]}]
  labels = ["equal", "16x"]

examples:
  fedmerge sweep my-sweep.toml --out sweeps/alpha
  fedmerge sweep data-heterogeneity --dry-run        a shipped study (see --list)
  fedmerge report sweeps/alpha                       tables and figures over the cells (means, 95% CIs)
"""


def register(subparsers) -> None:
    sweep = subparsers.add_parser("sweep", description=SWEEP_HELP, formatter_class=argparse.RawDescriptionHelpFormatter)
    sweep.add_argument("file", nargs="?", metavar="FILE.toml|STUDY", help="a sweep file, or a shipped study name")
    sweep.add_argument(
        "--out",
        type=Path,
        metavar="DIR",
        help="the sweep directory (default: results/sweeps/<sweep name>); run again with the same DIR to resume",
    )
    sweep.add_argument("--dry-run", action="store_true", help="validate every cell and list them, run nothing")
    sweep.add_argument("--list", action="store_true", help="list the shipped studies")
    sweep.add_argument("--no-progress", action="store_true", help="no live progress bar inside each cell")
    sweep.set_defaults(handler=sweep_command)


def sweep_command(args) -> int:
    from rich.table import Table

    from fedmerge.simulations.command import output_console
    from fedmerge.simulations.presets import shipped_names, shipped_path
    from fedmerge.simulations.sweep import load_sweep, run_sweep
    from fedmerge.simulations.spec import load_toml

    console = output_console()
    if args.list:
        table = Table(title="shipped studies (fedmerge sweep STUDY)")
        table.add_column("name")
        table.add_column("description")
        for name in shipped_names("study"):
            table.add_row(name, load_toml(shipped_path(name, "study")).get("description", ""))
        console.print(table)
        return 0
    if not args.file:
        raise FedmergeError("give a sweep file (or a shipped study name; see `fedmerge sweep --list`).")
    sweep = load_sweep(args.file)
    out = args.out or Path("results/sweeps") / sweep.name
    if args.dry_run:
        # a line of its own, not the table's title: a title wraps at the table's width, cutting the path
        console.print(f"{sweep.name}: {len(sweep.cells)} cells → {out}", highlight=False)
        table = Table()
        table.add_column("#", justify="right")
        table.add_column("cell id")
        for axis in sweep.axes:
            table.add_column(axis.name)
        for cell in sweep.cells:
            table.add_row(str(cell.index + 1), cell.id, *cell.levels.values())
        console.print(table)
        return 0
    run_sweep(sweep, out, show_progress=not args.no_progress, log=lambda line: console.print(line, highlight=False))
    console.print(f"report: fedmerge report {out}")
    return 0
