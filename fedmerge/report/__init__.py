"""Reports: results files → tables and figures (Markdown and self-contained HTML).

This layer reads results directories only (``results.json`` of a run, ``sweep.json`` of a sweep); it does
not know how they were made. :func:`load_runs` finds and validates them, :mod:`~fedmerge.report.records`
flattens them into one row per (run, strategy, round count), :mod:`~fedmerge.report.stats` gives means
with 95% confidence intervals over seeds, :mod:`~fedmerge.report.figures` draws, and
:func:`~fedmerge.report.document.build_report` writes ``report.md``, ``report.html`` and ``figures/``.
"""

from fedmerge.report.load import Collection, RunResult, load_runs
from fedmerge.report.document import build_report, write_report

__all__ = ["Collection", "RunResult", "build_report", "load_runs", "write_report"]
