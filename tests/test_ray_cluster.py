"""Attach a simulation to an existing Ray cluster: a head node started with Ray's own `ray start --head`."""

import json
import subprocess
import sys
from pathlib import Path

import pytest
import ray

from fedmerge.errors import FedmergeError
from fedmerge.simulations.runner import run
from fedmerge.simulations.spec import Spec
from processes import free_port, stop, wait_for_port

RAY = Path(sys.executable).parent / "ray"


def jobs_seen(address: str) -> int:
    """Drivers the cluster has seen (this query is one of them)."""
    ray.init(address=address, logging_level="ERROR")
    try:
        return len(ray._private.state.jobs())
    finally:
        ray.shutdown()


CURRENT_CLUSTER = Path("/tmp/ray/ray_current_cluster")
"""Where `ray start` records its cluster for later bare `ray.init()` calls on this machine."""


@pytest.fixture(scope="module")
def head(tmp_path_factory):
    """A Ray head node on loopback; `--block` ties its daemons to this one process, stopped at the end."""
    port = free_port()
    log = tmp_path_factory.mktemp("ray") / "head.log"
    with open(log, "w") as out:
        process = subprocess.Popen(
            [str(RAY), "start", "--head", "--block", "--node-ip-address", "127.0.0.1", "--port", str(port),
             "--num-cpus", "2", "--include-dashboard", "false", "--disable-usage-stats"],
            stdout=out, stderr=subprocess.STDOUT,
        )
    address = f"127.0.0.1:{port}"
    try:
        wait_for_port(port, process, log)
        yield address
    finally:
        stop([process])
        if CURRENT_CLUSTER.exists() and CURRENT_CLUSTER.read_text().strip().endswith(f":{port}"):
            CURRENT_CLUSTER.unlink()  # leave no pointer to a cluster that is gone


def test_a_run_attaches_to_a_running_cluster(head, tmp_path):
    before = jobs_seen(head)
    spec = Spec.from_dict({
        "name": "on-cluster", "suite": "quadratic", "clients": 2, "strategies": ["fedavg"], "rounds": [1],
        "training": {"steps": [3, 6], "lr": 0.1}, "engine": {"ray_address": head},
    })
    run_dir = run(spec, tmp_path, run_dir=tmp_path / "run", show_progress=False)
    assert json.loads((run_dir / "results.json").read_text())["runs"][0]["strategy"] == "fedavg"
    # the resource check and the simulation's driver joined this cluster (plus this query)
    assert jobs_seen(head) == before + 3


def test_a_request_the_clusters_nodes_cannot_meet_is_refused_before_running(head, tmp_path):
    spec = Spec.from_dict({"name": "too-big", "suite": "quadratic", "clients": 2, "engine": {"ray_address": head, "client_cpus": 3}})
    with pytest.raises(FedmergeError, match=r"engine.client_cpus = 3 .* the largest node of the Ray cluster at .* \(2\)"):
        run(spec, tmp_path, run_dir=tmp_path / "run", show_progress=False)
    assert not (tmp_path / "run").exists()
