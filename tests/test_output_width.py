"""Output off a terminal is never wrapped: cell ids, paths and table rows stay whole through a pipe.

rich wraps at 80 columns (or ``$COLUMNS``) when stdout is not a terminal, which cut cell ids in two in
``fedmerge sweep --dry-run | cat``. Each command runs here as a subprocess whose stdout is a pipe, with
``COLUMNS=80`` exported, as some shells do.
"""

import os
import subprocess
import sys

from fedmerge.simulations.presets import shipped_names, shipped_path
from fedmerge.simulations.spec import load_toml
from fedmerge.simulations.sweep import load_sweep
from processes import seconds


def piped(*argv: str, cwd=None) -> str:
    """``fedmerge argv``'s standard output through a pipe; the command must succeed."""
    env = {k: v for k, v in os.environ.items() if k not in ("FORCE_COLOR", "TTY_COMPATIBLE")}
    done = subprocess.run(
        [sys.executable, "-m", "fedmerge.cli", *argv],
        cwd=cwd,
        env={**env, "COLUMNS": "80"},
        capture_output=True,
        text=True,
        timeout=seconds(120),
    )
    assert done.returncode == 0, done.stderr
    return done.stdout


def test_a_sweeps_cell_ids_and_its_output_path_stay_whole(tmp_path):
    (tmp_path / "wide.toml").write_text(
        'name = "wide"\n[base]\nsuite = "quadratic"\nclients = 2\n'
        '[grid.spread]\n"training.lr" = [0.01, 0.1]\nlabels = ["a-rather-long-label-for-the-low-learning-rate", '
        '"a-rather-long-label-for-the-high-learning-rate"]\n[grid]\nseed = [0, 1]\n'
    )
    out = tmp_path / ("a-folder-whose-name-alone-is-wider-than-a-terminal-of-eighty-columns-" * 2) / "sweep"
    lines = piped("sweep", "wide.toml", "--dry-run", "--out", str(out), cwd=tmp_path).splitlines()
    ids = [cell.id for cell in load_sweep(str(tmp_path / "wide.toml")).cells]
    rows = [line for line in lines if any(cell_id in line for cell_id in ids)]
    assert len(rows) == len(ids) and min(map(len, rows)) > 80, "\n".join(lines)
    assert any(str(out) in line for line in lines)


def test_the_listing_keeps_each_row_on_one_line():
    lines = piped("list").splitlines()
    descriptions = [load_toml(shipped_path(name)).get("description", "") for name in shipped_names()]
    assert max(map(len, descriptions)) > 80
    assert all(any(d in line for line in lines) for d in descriptions)
