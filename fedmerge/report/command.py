"""``fedmerge report``: one run or a sweep → Markdown and self-contained HTML with tables and figures."""

import argparse
from pathlib import Path

REPORT_HELP = """\
Turn results into a report: report.md (figures as PNG files in figures/) and report.html (one self-contained
file, figures embedded). DIR is a run directory (results.json), a sweep directory (sweep.json) or a folder of
run directories. Runs are grouped into settings by their whole spec except the seed (and a sweep's levels), each
labelled by what differs; only a setting's seeds are averaged, with 95% confidence intervals (Student's t) where
it has two or more. Two runs of one setting with the same seed are one sample: the newest is kept, and the report
says so. θ0 and the clients' own models are baseline rows of the summary and reference lines in the metric figures.

examples:
  fedmerge report results/quadratic-20250101-120000
  fedmerge report results/sweeps/study-data-heterogeneity --out my-report
  fedmerge report RUN --out shared/figures --force         replace a folder that is not a previous report
"""


def register(subparsers) -> None:
    report = subparsers.add_parser(
        "report", description=REPORT_HELP, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    report.add_argument(
        "directory", type=Path, metavar="DIR", help="a run directory, a sweep directory or a folder of runs"
    )
    report.add_argument(
        "--out",
        type=Path,
        metavar="OUT",
        help="the report directory (default: DIR/report); a previous report there is replaced whole, "
        "anything else is refused",
    )
    report.add_argument("--force", action="store_true", help="replace OUT even if it is a folder of other files")
    report.set_defaults(handler=report_command)


def report_command(args) -> int:
    from fedmerge.report.document import write_report

    path = write_report(args.directory, args.out, force=args.force)
    print(f"report: {path / 'report.md'}  and  {path / 'report.html'} (self-contained)")
    return 0
