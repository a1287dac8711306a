"""The command line under interruption and failure, as real processes: Ctrl-C, SIGTERM, a Ray worker killed, a crash.

Each test starts ``fedmerge`` with its output in a file (not a terminal, so progress comes as log lines),
acts when a given line (or process, or file) appears, and checks the exit: prompt, the right code (130 for
Ctrl-C, 143 for SIGTERM), one line and no traceback or stack dump, every process it started gone, finished
work intact and nothing half-written.
"""

import json
import os
import re
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from processes import _proc_stat, descendants, seconds, stop, tail

pytestmark = pytest.mark.slow

FEDMERGE = [sys.executable, "-m", "fedmerge.cli"]
LONG_RUN = [
    "--set",
    "suite=quadratic",
    "--set",
    "clients=2",
    "--set",
    'strategies=["fedavg"]',
    "--set",
    "rounds=[1, 3000]",
    "--set",
    "same_compute=false",
    "--set",
    "training.steps=[5, 10]",
    "--set",
    "training.lr=0.1",
]


def start(args: list[str], cwd: Path) -> tuple[subprocess.Popen, Path]:
    log = cwd / "output.log"
    with open(log, "w") as out:
        process = subprocess.Popen(
            [*FEDMERGE, *args],
            cwd=cwd,
            stdout=out,
            stderr=subprocess.STDOUT,
            env={**os.environ, "PYTHONUNBUFFERED": "1"},
        )
    return process, log


def wait_for_line(process: subprocess.Popen, log: Path, pattern: str, timeout: float = 120) -> None:
    deadline = time.monotonic() + seconds(timeout)
    while not re.search(pattern, log.read_text(errors="replace"), re.MULTILINE):
        if process.poll() is not None or time.monotonic() > deadline:
            stop([process])
            raise AssertionError(f"no line matching {pattern!r}; the output ends:\n{tail(log)}")
        time.sleep(0.2)


def wait_for_exit(process: subprocess.Popen, log: Path, within: float) -> int:
    try:
        return process.wait(timeout=seconds(within))
    except subprocess.TimeoutExpired:
        stop([process])
        raise AssertionError(f"still running {seconds(within):g} s later; the output ends:\n{tail(log)}") from None


def assert_all_gone(processes: list[tuple[int, str]], within: float = 15) -> None:
    deadline = time.monotonic() + seconds(within)
    while alive := [pid for pid, started in processes if (stat := _proc_stat(pid)) and stat[1] == started]:
        if time.monotonic() > deadline:
            raise AssertionError(f"processes the run started are still alive: {alive}")
        time.sleep(0.2)


EXIT_CODES = {signal.SIGINT: 130, signal.SIGTERM: 143}
SAID = {signal.SIGINT: "fedmerge: interrupted", signal.SIGTERM: "fedmerge: terminated by SIGTERM"}


def assert_stopped_cleanly(process: subprocess.Popen, log: Path, sig: signal.Signals, within: float = 15) -> str:
    """The process exits with the signal's code within ``within`` seconds, saying so in one line: no traceback, no
    stack dump of Ray's (``*** SIGTERM received``). Returns that line."""
    assert wait_for_exit(process, log, within=within) == EXIT_CODES[sig], tail(log)
    output = log.read_text()
    assert "Traceback" not in output and "received at" not in output, tail(log)
    (line,) = [line for line in output.splitlines() if line.startswith("fedmerge: ") and "error" not in line]
    assert line.startswith(SAID[sig]) and line.endswith("nothing half-written is left behind."), line
    return line


def cmdline(pid: int) -> bytes:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:  # gone meanwhile
        return b""


def children(process: subprocess.Popen, name: bytes) -> list[int]:
    return [pid for pid, _ in descendants(process.pid) if name in cmdline(pid)]


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM], ids=["ctrl-c", "sigterm"])
def test_a_sweep_stopped_exits_promptly_keeping_finished_cells(tmp_path, sig):
    (tmp_path / "sweep.toml").write_text(
        textwrap.dedent("""
        name = "interrupted"
        [base]
        preset = "quadratic"
        clients = 2
        strategies = ["fedavg"]
        same_compute = false
        training = { steps = [5, 10], lr = 0.1 }
        [grid]
        rounds = [[1], [1, 3000]]
    """)
    )
    process, log = start(["sweep", "sweep.toml", "--out", "sweep"], tmp_path)
    wait_for_line(process, log, r"^\[2/2\]")
    wait_for_line(process, log, r"fedavg: round 3/3000")
    started = descendants(process.pid)
    assert any(b"raylet" in cmdline(pid) for pid, _ in started), "expected Ray's processes among the run's descendants"
    process.send_signal(sig)
    line = assert_stopped_cleanly(process, log, sig)
    assert "the finished cells are kept in sweep; run the sweep again to resume" in line
    assert_all_gone(started)
    cells = sorted(p.name for p in (tmp_path / "sweep" / "cells").iterdir())
    assert len(cells) == 1 and (tmp_path / "sweep" / "cells" / cells[0] / "results.json").is_file()
    manifest = json.loads((tmp_path / "sweep" / "sweep.json").read_text())
    assert [cell["complete"] for cell in manifest["cells"]] == [True, False]


def test_sigterm_during_a_run_exits_143_keeping_the_finished_runs(tmp_path):
    process, log = start(["run", "quadratic", *LONG_RUN, "--out", "results"], tmp_path)
    wait_for_line(process, log, r"fedavg: round 3/3000")
    started = descendants(process.pid)
    process.send_signal(signal.SIGTERM)
    line = assert_stopped_cleanly(process, log, signal.SIGTERM)
    assert_all_gone(started)
    (kept,) = (tmp_path / "results").iterdir()
    assert f"the runs that finished are kept in results/{kept.name}" in line
    results = json.loads((kept / "results.json").read_text())
    assert results["complete"] is False and results["error"] == "Terminated: terminated by SIGTERM"
    assert [run["rounds"] for run in results["runs"]] == [1] and not list(kept.rglob(".*"))


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM], ids=["ctrl-c", "sigterm"])
@pytest.mark.parametrize("moment, within", [(b"gcs_server", 8), (b"ClientAppActor", 8)], ids=["ray-init", "actors"])
def test_a_run_stopped_while_it_starts_exits_promptly_leaving_nothing(tmp_path, sig, moment, within):
    """While ray.init runs (its first daemon is up), and while Flower starts its actors (the ServerApp thread is
    waiting for replies): both used to take 10 s or more, or to end in Ray's stack dump."""
    process, log = start(["run", "quadratic", *LONG_RUN, "--out", "results"], tmp_path)
    deadline = time.monotonic() + seconds(120)
    while not children(process, moment):
        assert process.poll() is None and time.monotonic() < deadline, tail(log)
        time.sleep(0.01)
    started = descendants(process.pid)
    process.send_signal(sig)
    assert_stopped_cleanly(process, log, sig, within=within)
    assert_all_gone(started)
    assert not (tmp_path / "results").exists()


def checkpoints(folder: Path, tensors: int) -> list[str]:
    """A base and two fine-tunes, each of ``tensors`` tensors of 1024 × 1024 floats; the command line naming them."""
    from safetensors.torch import save_file
    import torch

    for name in ("base", "a", "b"):
        save_file({f"w{i}": torch.randn(1024, 1024) for i in range(tensors)}, folder / f"{name}.safetensors")
    return ["--base", "base.safetensors", "--models", "a.safetensors", "b.safetensors"]


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM], ids=["ctrl-c", "sigterm"])
def test_a_command_stopped_while_it_loads_exits_quietly(tmp_path, sig):
    """Stopped while torch is still being imported (seconds, before the command runs): as during the run."""
    process, log = start(["merge", *checkpoints(tmp_path, 1), "--out", "merged.safetensors"], tmp_path)
    deadline = time.monotonic() + seconds(60)
    while b"libtorch" not in Path(f"/proc/{process.pid}/maps").read_bytes():  # torch's import has begun
        assert process.poll() is None and time.monotonic() < deadline, tail(log)
        time.sleep(0.005)
    process.send_signal(sig)
    assert_stopped_cleanly(process, log, sig, within=10)
    assert not (tmp_path / "merged.safetensors").exists()


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM], ids=["ctrl-c", "sigterm"])
def test_a_merge_stopped_while_it_writes_leaves_nothing(tmp_path, sig):
    inputs = checkpoints(tmp_path, 32)  # 128 MB each: seconds of writing
    process, log = start(["merge", *inputs, "--method", "median", "--out", "merged.safetensors"], tmp_path)
    deadline = time.monotonic() + seconds(120)
    while not list(tmp_path.glob(".merged.safetensors.*")):  # the output is being written
        assert process.poll() is None and time.monotonic() < deadline, tail(log)
        time.sleep(0.005)
    process.send_signal(sig)
    assert_stopped_cleanly(process, log, sig, within=10)
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        "a.safetensors",
        "b.safetensors",
        "base.safetensors",
        "output.log",
    ]
