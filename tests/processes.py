"""Start and stop real processes on loopback for tests: free ports, waiting for a listener, clean stops; and the
one multiplier of every time limit in the tests."""

import math
import os
import signal
import socket
import subprocess
import time
from pathlib import Path

TIME_SCALE = "FEDMERGE_TEST_TIME_SCALE"
"""The environment variable multiplying every time limit of the tests (1 when unset or empty): raise it on a loaded
machine."""


def time_scale() -> float:
    """The value of :data:`TIME_SCALE`; ``ValueError`` naming it unless it is a positive number."""
    text = os.environ.get(TIME_SCALE) or "1"
    try:
        scale = float(text)
    except ValueError:
        scale = math.nan
    if not (math.isfinite(scale) and scale > 0):
        raise ValueError(
            f"{TIME_SCALE}={text!r}: give a positive number of times the tests' time limits, e.g. 3 on a loaded machine"
        )
    return scale


def seconds(limit: float) -> float:
    """A test's time limit of ``limit`` seconds on a quiet machine, times :data:`TIME_SCALE`."""
    return limit * time_scale()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_for_port(port: int, process: subprocess.Popen, log: Path, timeout: float = 60) -> None:
    deadline = time.monotonic() + seconds(timeout)
    while True:
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=1):
                return
        except OSError:
            if process.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"{process.args[0]} did not start listening on {port}:\n{tail(log)}")
            time.sleep(0.2)


def tail(path: Path, lines: int = 40) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return f"({path} not written)"


# -- processes ------------------------------------------------------------------------------------------
def _proc_stat(pid: int) -> tuple[int, str] | None:
    """(parent pid, start time) of a live process, from /proc (None where gone or not Linux)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    fields = stat[stat.rindex(")") + 2 :].split()
    return int(fields[1]), fields[19]


def descendants(pid: int) -> list[tuple[int, str]]:
    """(pid, start time) of every live descendant of ``pid``: Flower's SuperExec, ServerApp, ClientApps."""
    children: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir() if Path("/proc").is_dir() else []:
        if entry.name.isdigit() and (stat := _proc_stat(int(entry.name))):
            children.setdefault(stat[0], []).append(int(entry.name))
    found, todo = [], list(children.get(pid, []))
    while todo:
        child = todo.pop()
        if stat := _proc_stat(child):
            found.append((child, stat[1]))
            todo.extend(children.get(child, []))
    return found


def stop(processes: list[subprocess.Popen]) -> None:
    """Terminate the processes (SuperNodes before the SuperLink), then any descendant they left behind."""
    leftovers = [d for p in processes if p.poll() is None for d in descendants(p.pid)]
    for process in processes:
        if process.poll() is None:
            process.terminate()
    for process in processes:
        try:
            process.wait(timeout=seconds(20))
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(timeout=seconds(10))
    for sig in (signal.SIGTERM, signal.SIGKILL):
        alive = [(pid, start) for pid, start in leftovers if (stat := _proc_stat(pid)) and stat[1] == start]
        for pid, _ in alive:
            try:
                os.kill(pid, sig)
            except ProcessLookupError:
                pass
        deadline = time.monotonic() + seconds(10)
        while alive and time.monotonic() < deadline:
            alive = [(pid, start) for pid, start in alive if (stat := _proc_stat(pid)) and stat[1] == start]
            time.sleep(0.2)
        if not alive:
            return
