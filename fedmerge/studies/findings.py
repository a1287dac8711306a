"""``fedmerge findings``: run every study into ``--work`` (resumable), then write the page from the files there.

The study sweeps are ``fedmerge sweep`` files shipped in ``fedmerge/simulations/presets/studies/`` and run
through the simulation (Flower on Ray), one results directory per cell; claim 1 is checked on the merging core
and the Flower strategy (``exactness.json``); the FedNova update-size study runs the local trainer and the merging
core in this process (``fednova-update-size/cells/*.json``). The page itself is :mod:`fedmerge.report.findings`.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

from fedmerge.errors import FedmergeError
from fedmerge.files import write_file
from fedmerge.report.findings import SWEEP_STUDIES as STUDIES
from fedmerge.report.findings import check_page_out, missing_results, write_findings

TIMINGS = "timings.json"
"""In the work folder: seconds each part of the last run took (the page reports them)."""


def run_findings(out: Path = Path("docs/findings.md"), work: Path = Path("results/studies"), run: bool = True,
                 show_progress: bool = True, log=print) -> Path:
    """Run the studies into ``work`` (unless ``run`` is false), then write the page ``out`` and its figures."""
    started = time.perf_counter()
    work = Path(work)
    check_page_out(out)
    if not run and (missing := missing_results(work)):
        raise FedmergeError(f"--no-run: no results of {', '.join(missing)} in --work {work}; run `fedmerge findings "
                            f"--work {work}` without --no-run first (about 15 minutes on 2 cores; finished cells are reused).")
    previous = _read_timings(work)
    timings: dict[str, float] = {}
    if run:
        from fedmerge.simulations.sweep import load_sweep, run_sweep
        from fedmerge.studies import exactness, fednova

        sweeps = {name: load_sweep(name) for name in STUDIES}  # validate every study before running any
        for name, sweep in sweeps.items():
            before, begun = _finished(work / name), time.perf_counter()
            run_sweep(sweep, work / name, show_progress=show_progress, log=log)
            if _finished(work / name) > before:  # cells ran: this is (part of) the cost from nothing
                timings[name] = time.perf_counter() - begun
        begun = time.perf_counter()
        write_file(work / "exactness.json", json.dumps(exactness.check(), indent=1))
        timings["exactness"] = time.perf_counter() - begun
        before, begun = len(list((work / fednova.NAME / "cells").glob("*.json"))), time.perf_counter()
        computed = []
        fednova.run_study(work, log=lambda line: (computed.append(line), log(line)))
        if computed:
            timings[fednova.NAME] = time.perf_counter() - begun
    measured = {**previous.get("studies", {}), **{k: round(v, 1) for k, v in timings.items()}}
    timings = {"studies": measured, "this_run": round(time.perf_counter() - started, 1)}
    write_file(work / TIMINGS, json.dumps(timings, indent=1))
    path, claims = write_findings(work, out, timings)
    for claim in claims:
        log(f"claim {claim.number}: {claim.verdict} — {claim.summary}")
    log(f"findings: {path} ({timings['this_run']:.0f} s)")
    return path


def _finished(folder: Path) -> int:
    return len(list(folder.glob("cells/*/results.json")))


def _read_timings(work: Path) -> dict:
    """The last measured seconds of each study (kept while its cells are reused), or nothing."""
    try:
        data = json.loads((work / TIMINGS).read_text())
    except (OSError, ValueError):
        return {}
    if "studies" not in data:  # the first format: study → seconds, plus "total"
        data = {"studies": {k: v for k, v in data.items() if k != "total"}}
    return data if isinstance(data.get("studies"), dict) else {}
