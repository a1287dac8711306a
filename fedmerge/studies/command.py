"""``fedmerge findings``: the paper's claims, run as studies and written up as a page."""

import argparse
from pathlib import Path

FINDINGS_HELP = """\
Test the paper's claims on fedmerge's own suites: run the shipped study sweeps (Flower simulations, resumable,
under --work), check claim 1 exactly, run the FedNova studies (exploratory and held-out), decide each claim by
explicit rules on paired differences over seeds, and write a Markdown page with the numbers, a verdict per claim
and figures (PNGs beside the page, in <page-stem>/). About 20 minutes on 2 CPU cores from nothing; finished cells
made by the same code are reused.
"""


def register(subparsers) -> None:
    findings = subparsers.add_parser(
        "findings", description=FINDINGS_HELP, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    findings.add_argument(
        "--out",
        type=Path,
        default=Path("docs/findings.md"),
        metavar="FILE.md",
        help="the page to write (default: docs/findings.md); figures go to docs/findings/",
    )
    findings.add_argument(
        "--work",
        type=Path,
        default=Path("results/studies"),
        metavar="DIR",
        help="where the studies run (resumable; default: results/studies)",
    )
    findings.add_argument("--no-run", action="store_true", help="write the page from the results already in --work")
    findings.add_argument("--no-progress", action="store_true", help="no live progress bar inside each cell")
    findings.set_defaults(handler=findings_command)


def findings_command(args) -> int:
    from fedmerge.studies.findings import run_findings

    run_findings(args.out, args.work, run=not args.no_run, show_progress=not args.no_progress)
    return 0
