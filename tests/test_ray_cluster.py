"""Attach a simulation to an existing Ray cluster: a head node started with Ray's own `ray start --head`."""

import json
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import ray

from fedmerge.simulations.runner import run
from fedmerge.simulations.spec import Spec

RAY = Path(sys.executable).parent / "ray"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def jobs_seen(address: str) -> int:
    """Drivers the cluster has seen (this query is one of them)."""
    ray.init(address=address, logging_level="ERROR")
    try:
        return len(ray._private.state.jobs())
    finally:
        ray.shutdown()


@pytest.fixture(scope="module")
def head(tmp_path_factory):
    """A Ray head node on loopback; `--block` ties its daemons to this one process, stopped at the end."""
    port = free_port()
    log = open(tmp_path_factory.mktemp("ray") / "head.log", "w")
    process = subprocess.Popen(
        [str(RAY), "start", "--head", "--block", "--node-ip-address", "127.0.0.1", "--port", str(port),
         "--num-cpus", "2", "--include-dashboard", "false", "--disable-usage-stats"],
        stdout=log, stderr=subprocess.STDOUT,
    )
    address = f"127.0.0.1:{port}"
    try:
        deadline = time.time() + 60
        while True:
            try:
                with socket.create_connection(("127.0.0.1", port), timeout=1):
                    break
            except OSError:
                if process.poll() is not None or time.time() > deadline:
                    raise RuntimeError(f"ray head did not start: {log.name}")
                time.sleep(0.5)
        yield address
    finally:
        process.terminate()
        try:
            process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            process.kill()
        log.close()


def test_a_run_attaches_to_a_running_cluster(head, tmp_path):
    before = jobs_seen(head)
    spec = Spec.from_dict({
        "name": "on-cluster", "suite": "quadratic", "clients": 2, "strategies": ["fedavg"], "rounds": [1],
        "training": {"steps": [3, 6], "lr": 0.1}, "engine": {"ray_address": head},
    })
    run_dir = run(spec, tmp_path, run_dir=tmp_path / "run", show_progress=False)
    assert json.loads((run_dir / "results.json").read_text())["runs"][0]["strategy"] == "fedavg"
    assert jobs_seen(head) == before + 2  # the simulation's driver joined this cluster (plus this query)
