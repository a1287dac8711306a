"""Run on a Ray cluster of two nodes on loopback, started with Ray's own `ray start`: a head of 1 CPU and a worker
node of 2, so that clients asking for 2 CPUs can only run on the second node (client resources honoured)."""

import json
import subprocess
import sys
import time
from pathlib import Path

import pytest
import ray

from fedmerge.errors import FedmergeError
from fedmerge.simulations.runner import run
from fedmerge.simulations.spec import Spec
from processes import free_port, seconds, stop, tail, wait_for_port

pytestmark = pytest.mark.slow

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


def alive_nodes(address: str) -> list[dict]:
    ray.init(address=address, logging_level="ERROR")
    try:
        return [node["Resources"] for node in ray.nodes() if node.get("Alive")]
    finally:
        ray.shutdown()


@pytest.fixture(scope="module")
def head(tmp_path_factory):
    """A head node of 1 CPU and a worker node of 2 on loopback; `--block` ties each node's daemons to one process,
    stopped at the end."""
    port = free_port()
    logs = tmp_path_factory.mktemp("ray")
    common = ["--block", "--node-ip-address", "127.0.0.1", "--disable-usage-stats"]
    with open(logs / "head.log", "w") as out:
        head_node = subprocess.Popen(
            [
                str(RAY),
                "start",
                "--head",
                "--port",
                str(port),
                "--num-cpus",
                "1",
                "--include-dashboard",
                "false",
                *common,
            ],
            stdout=out,
            stderr=subprocess.STDOUT,
        )
    address = f"127.0.0.1:{port}"
    processes = [head_node]
    try:
        wait_for_port(port, head_node, logs / "head.log")
        with open(logs / "worker.log", "w") as out:
            processes.append(
                subprocess.Popen(
                    [str(RAY), "start", "--address", address, "--num-cpus", "2", *common],
                    stdout=out,
                    stderr=subprocess.STDOUT,
                )
            )
        deadline = time.monotonic() + seconds(120)
        while len(alive_nodes(address)) < 2:
            assert time.monotonic() < deadline, f"the worker node did not join:\n{tail(logs / 'worker.log')}"
            time.sleep(1)
        yield address
    finally:
        stop(processes[::-1])
        if CURRENT_CLUSTER.exists() and CURRENT_CLUSTER.read_text().strip().endswith(f":{port}"):
            CURRENT_CLUSTER.unlink()  # leave no pointer to a cluster that is gone


def test_a_run_attaches_to_a_running_cluster_and_its_clients_run_where_their_resources_are(head, tmp_path):
    assert sorted(node["CPU"] for node in alive_nodes(head)) == [1.0, 2.0]
    before = jobs_seen(head)
    spec = Spec.from_dict(
        {  # 2 CPUs per client: only the worker node has them, one client at a time
            "name": "on-cluster",
            "suite": "quadratic",
            "clients": 2,
            "strategies": ["fedavg"],
            "rounds": [1, 2],
            "training": {"steps": [3, 6], "lr": 0.1},
            "engine": {"ray_address": head, "client_cpus": 2},
        }
    )
    run_dir = run(spec, tmp_path, run_dir=tmp_path / "run", show_progress=False)
    assert json.loads((run_dir / "results.json").read_text())["runs"][0]["strategy"] == "fedavg"
    # the resource check and the simulation's driver joined this cluster (plus this query)
    assert jobs_seen(head) == before + 3


def test_a_request_the_clusters_nodes_cannot_meet_is_refused_before_running(head, tmp_path):
    spec = Spec.from_dict(
        {"name": "too-big", "suite": "quadratic", "clients": 2, "engine": {"ray_address": head, "client_cpus": 3}}
    )
    with pytest.raises(
        FedmergeError, match=r"engine.client_cpus = 3 .* the largest node of the Ray cluster at .* \(2\)"
    ):
        run(spec, tmp_path, run_dir=tmp_path / "run", show_progress=False)
    assert not (tmp_path / "run").exists()
