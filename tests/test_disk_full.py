"""A full disk, as real processes meet it: the write fails, the command says which output and how much it needed,
exits 2 without a traceback, and leaves nothing half-written; finished runs and sweep cells are kept.

No root is needed: RLIMIT_FSIZE (``ulimit -f``) makes the kernel refuse a write past a size with EFBIG, handled as
ENOSPC (a full file system) and EDQUOT (a used-up quota) are. Ray's own processes cannot live under such a limit
(its daemons are killed by SIGXFSZ), so a simulation gets it once Ray runs: when its results are first written.
"""

import json
import resource
import subprocess
import sys
import textwrap

import pytest
import torch
from safetensors.torch import save_file

from fedmerge.simulations.sweep import is_complete
from processes import seconds

pytestmark = pytest.mark.slow

LIMIT = 64
"""Bytes a limited process may write to one file: less than any results file or model."""

QUICK = {
    "suite": "quadratic",
    "clients": 2,
    "strategies": ["fedavg"],
    "select": False,
    "training": {"steps": [3, 6], "lr": 0.1},
}


def limit_writes() -> None:
    resource.setrlimit(resource.RLIMIT_FSIZE, (LIMIT, resource.getrlimit(resource.RLIMIT_FSIZE)[1]))


def limited_after(when: str, argv: list[str], cwd) -> subprocess.CompletedProcess:
    """Run ``fedmerge argv`` in a process whose writes are limited to :data:`LIMIT` bytes from the first write of
    results for which ``when`` (a Python expression of ``self``, the ResultsDirectory, and ``count``) holds."""
    script = textwrap.dedent(f"""
        import resource, sys
        from fedmerge.cli import main
        from fedmerge.simulations.results import ResultsDirectory

        update, count = ResultsDirectory.update, 0

        def limited(self, *args, **kwargs):
            global count
            count += 1
            if {when}:
                resource.setrlimit(resource.RLIMIT_FSIZE, ({LIMIT}, resource.getrlimit(resource.RLIMIT_FSIZE)[1]))
            return update(self, *args, **kwargs)

        ResultsDirectory.update = limited
        sys.exit(main({argv!r}))
    """)
    return subprocess.run([sys.executable, "-c", script], cwd=cwd, capture_output=True, text=True, timeout=seconds(300))


def overrides(spec: dict) -> list[str]:
    return [arg for key, value in spec.items() for arg in ("--set", f"{key}={json.dumps(value)}")]


def one_error_line(process: subprocess.CompletedProcess) -> str:
    assert process.returncode == 2, process.stderr
    assert "Traceback" not in process.stderr, process.stderr
    (line,) = [line for line in process.stderr.splitlines() if line.startswith("fedmerge")]
    return line


def test_a_run_whose_first_results_do_not_fit_leaves_nothing(tmp_path):
    process = limited_after(
        "True",
        ["run", "quadratic", *overrides({**QUICK, "rounds": [1]}), "--out", "results", "--no-progress"],
        tmp_path,
    )
    line = one_error_line(process)
    assert line.startswith("fedmerge: error: cannot write results/quadratic-")
    assert "(File too large); it needs " in line and "free on the file system of " in line
    assert list(tmp_path.iterdir()) == []  # not even the results folder it made


def test_a_run_that_fills_the_disk_later_keeps_the_runs_that_finished(tmp_path):
    process = limited_after(
        "count == 2",
        ["run", "quadratic", *overrides({**QUICK, "rounds": [1, 2]}), "--out", "results", "--no-progress"],
        tmp_path,
    )
    line = one_error_line(process)
    (kept,) = (tmp_path / "results").iterdir()
    assert line.startswith(f"fedmerge: error: cannot write results/{kept.name}/")
    assert line.endswith(
        f'The runs that finished are kept in results/{kept.name} (its results.json says "complete": false, and why).'
    )
    results = json.loads((kept / "results.json").read_text())
    assert results["complete"] is False and results["pending"] == ["fedavg-r2"]
    assert [(run["strategy"], run["rounds"]) for run in results["runs"]] == [("fedavg", 1)]
    assert sorted(p.name for p in kept.rglob("*")) == sorted(
        ["results.json", "summary.csv", "tasks.csv", "rounds.csv", "spec.toml", "models", "fedavg-r1.safetensors"]
    )


def test_a_sweep_on_a_full_disk_keeps_its_finished_cells(tmp_path):
    (tmp_path / "grid.toml").write_text(
        textwrap.dedent(f"""
        [base]
        {chr(10).join(f"{key} = {json.dumps(value)}" for key, value in QUICK.items() if key != "training")}
        rounds = [1]
        training = {{ steps = [3, 6], lr = 0.1 }}
        [grid]
        seed = [0, 1]
    """)
    )
    process = limited_after("self.spec.seed == 1", ["sweep", "grid.toml", "--out", "sweep", "--no-progress"], tmp_path)
    line = one_error_line(process)
    assert line.startswith("fedmerge: error: sweep cell seed-1-") and "cannot write sweep/cells/seed-1-" in line
    assert line.endswith("Finished cells are kept; run the sweep again to resume.")
    (cell,) = (tmp_path / "sweep" / "cells").iterdir()
    assert cell.name.startswith("seed-0-") and is_complete(cell)
    assert json.loads((tmp_path / "sweep" / "sweep.json").read_text())["cells"][0]["complete"] is True


@pytest.mark.parametrize(
    "out, written", [("merged.safetensors", "merged.safetensors"), ("merged", "merged/model.safetensors")]
)
def test_a_merge_that_does_not_fit_says_which_file_and_how_much_and_leaves_nothing(tmp_path, out, written):
    (tmp_path / "base").mkdir()
    (tmp_path / "base" / "config.json").write_text("{}")
    for name in ("base/model", "a", "b"):
        save_file({f"w{i}": torch.randn(256, 256) for i in range(4)}, tmp_path / f"{name}.safetensors")
    inputs = sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*"))
    process = subprocess.run(
        [
            sys.executable,
            "-m",
            "fedmerge.cli",
            "merge",
            "--base",
            "base",
            "--models",
            "a.safetensors",
            "b.safetensors",
            "--out",
            out,
            "--quiet",
        ],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=seconds(300),
        preexec_fn=limit_writes,
    )
    line = one_error_line(process)
    assert line.startswith(
        f"fedmerge: error: cannot write {written}: the file is larger than this process may write "
        "(ulimit -f) or the file system allows (File too large); it needs 1.0 MB, and "
    )
    assert sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*")) == inputs
