"""``fedmerge findings``: run every study into ``--work`` (resumable), then write the page from the files there.

The study sweeps are ``fedmerge sweep`` files shipped in ``fedmerge/simulations/presets/studies/`` and run
through the simulation (Flower on Ray), one results directory per cell; claim 1 is checked on the merging core
and the Flower strategy (``exactness.json``); the FedNova studies run the local trainer and the merging core in
this process (``<study>/cells/*.json``). Each study's cells are reused only while the code that made them is
unchanged (``code.json``, :mod:`fedmerge.studies.fingerprint`); each sweep setting's evaluation sets are recorded in
``evaluation.json``. The page itself is :mod:`fedmerge.report.findings`.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

from fedmerge.errors import FedmergeError
from fedmerge.files import remove, write_file
from fedmerge.report.findings import check_page_out, missing_results, write_findings
from fedmerge.report.workfolder import CODE, EVALUATION, EXACTNESS, SWEEP_STUDIES, TIMINGS
from fedmerge.studies.fingerprint import code_fingerprint

STUDIES = SWEEP_STUDIES


def run_findings(
    out: Path = Path("docs/findings.md"),
    work: Path = Path("results/studies"),
    run: bool = True,
    show_progress: bool = True,
    log=print,
) -> Path:
    """Run the studies into ``work`` (unless ``run`` is false), then write the page ``out`` and its figures."""
    started = time.perf_counter()
    work = Path(work)
    check_page_out(out)
    if not run:
        check_results(work)
    previous = _read_timings(work)
    timings = run_studies(work, show_progress, log) if run else {}
    measured = {**previous.get("studies", {}), **{k: round(v, 1) for k, v in timings.items()}}
    timings = {"studies": measured, "this_run": round(time.perf_counter() - started, 1)}
    write_file(work / TIMINGS, json.dumps(timings, indent=1))
    path, claims = write_findings(work, out, timings)
    for claim in claims:
        log(f"{claim.label}: {claim.verdict} — {claim.summary}")
    log(f"findings: {path} ({timings['this_run']:.0f} s)")
    return path


def current_code() -> dict[str, str]:
    """Study → the fingerprint of the code that would make its cells now."""
    from fedmerge.studies import fednova

    return {
        **{name: code_fingerprint() for name in SWEEP_STUDIES},
        **{name: fednova.code() for name in fednova.STUDIES},
    }


def check_results(work: Path) -> None:
    """Refuse (``--no-run``) a work folder that lacks a study's results or holds results of other code."""
    if missing := missing_results(work):
        raise FedmergeError(
            f"--no-run: no results of {', '.join(missing)} in --work {work}; run `fedmerge findings "
            f"--work {work}` without --no-run first (finished cells are reused)."
        )
    recorded = _read_code(work)
    if stale := [name for name, fingerprint in current_code().items() if recorded.get(name) != fingerprint]:
        raise FedmergeError(
            f"--no-run: the results of {', '.join(stale)} in --work {work} were made by other code than "
            f"this; run `fedmerge findings --work {work}` without --no-run to compute them again."
        )


def run_studies(work: Path, show_progress: bool, log) -> dict[str, float]:
    """Run every study's missing or stale cells; returns the seconds of each study that ran cells. The code's
    fingerprints are taken once, before anything runs."""
    from fedmerge.simulations.sweep import load_sweep, run_sweep
    from fedmerge.studies import exactness, fednova

    timings: dict[str, float] = {}
    code = current_code()
    sweeps = {name: load_sweep(name) for name in SWEEP_STUDIES}  # validate every study before running any
    for name, sweep in sweeps.items():
        forget_stale(work, name, code[name], log)
        before, begun = _finished(work / name), time.perf_counter()
        run_sweep(sweep, work / name, show_progress=show_progress, log=log)
        if _finished(work / name) > before:  # cells ran: this is (part of) the cost from nothing
            timings[name] = time.perf_counter() - begun
    write_file(
        work / EVALUATION, json.dumps({name: evaluation_sets(sweep) for name, sweep in sweeps.items()}, indent=1)
    )
    begun = time.perf_counter()
    write_file(work / EXACTNESS, json.dumps(exactness.check(), indent=1))
    timings["exactness"] = time.perf_counter() - begun
    for name, study in fednova.STUDIES.items():
        computed, begun = [], time.perf_counter()
        fednova.run_study(work, study, log=lambda line: (computed.append(line), log(line)), fingerprint=code[name])
        _record_code(work, name, code[name])
        if computed:
            timings[name] = time.perf_counter() - begun
    return timings


def forget_stale(work: Path, name: str, fingerprint: str, log) -> None:
    """Remove the sweep ``name``'s cells when other code (or code not recorded) made them; record ``fingerprint``
    as the code of every cell made from now on."""
    folder = Path(work) / name
    if _read_code(work).get(name) != fingerprint and (folder / "sweep.json").exists():
        log(f"{name}: its cells were made by other code; removed, to run again")
        remove(folder)
    _record_code(work, name, fingerprint)


def evaluation_sets(sweep) -> list[dict]:
    """Each setting of ``sweep`` (its first seed): the suite, its options, and every client's validation and test
    examples; ``shared_test`` when every client is scored on the same test set."""
    from fedmerge.tasks import load_suite

    first = sweep.cells[0].levels.get("seed")
    out = []
    for cell in sweep.cells:
        if cell.levels.get("seed") != first:
            continue
        spec = cell.spec
        fed = load_suite(spec.suite, spec.clients, spec.suite_options, spec.seed)
        out.append(
            {
                "levels": {k: v for k, v in cell.levels.items() if k != "seed"},
                "seed": spec.seed,
                "suite": spec.suite,
                "options": dict(fed.options),
                "metric": fed.metric,
                "tasks": [{"task": t.name, "val": len(t.val), "test": len(t.test)} for t in fed.tasks],
                "shared_test": len({id(t.test) for t in fed.tasks}) == 1,
            }
        )
    return out


def _finished(folder: Path) -> int:
    return len(list(folder.glob("cells/*/results.json")))


def _read_code(work: Path) -> dict:
    try:
        data = json.loads((Path(work) / CODE).read_text())
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


def _record_code(work: Path, name: str, fingerprint: str) -> None:
    write_file(Path(work) / CODE, json.dumps({**_read_code(work), name: fingerprint}, indent=1))


def _read_timings(work: Path) -> dict:
    """The last measured seconds of each study (kept while its cells are reused), or nothing."""
    try:
        data = json.loads((work / TIMINGS).read_text())
    except (OSError, ValueError):
        return {}
    return data if isinstance(data.get("studies"), dict) else {}
