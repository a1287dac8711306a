"""The simulation's GPU path (skipped without CUDA): clients on the GPU Ray gives them (two sharing one), the server
merging, re-estimating statistics and searching λ on CUDA, against the same run on the CPU."""

import json

import pytest
import torch

from fedmerge.clients.app import client_device
from fedmerge.simulations.runner import run
from fedmerge.simulations.spec import Spec

pytestmark = pytest.mark.cuda

SPEC = {
    "name": "gpu",
    "suite": "digits",
    "clients": 3,
    "strategies": ["fedavg", "median", "ties"],
    "rounds": [1, 2],
    "suite_options": {"batch_norm": True},
    "strategy": {"ties": {"density": 0.3}},
    "training": {"optimizer": "momentum", "lr": 0.05, "steps": {"linear": [20, 60]}, "batch_size": 32},
}


def finals(run_dir) -> dict:
    results = json.loads((run_dir / "results.json").read_text())
    return {(r["strategy"], r["rounds"]): r["final"]["mean_accuracy"] for r in results["runs"]}


def test_a_client_asking_for_a_gpu_trains_on_it():
    assert client_device({"client_gpus": 0.5}) == "cuda" and client_device({"client_gpus": 0}) == "cpu"


def test_clients_sharing_a_gpu_and_the_server_on_it_give_the_cpus_numbers(tmp_path):
    on_cpu = run(
        Spec.from_dict({**SPEC, "engine": {"server_device": "cpu"}}),
        tmp_path,
        run_dir=tmp_path / "cpu",
        show_progress=False,
    )
    on_gpu = run(
        Spec.from_dict({**SPEC, "engine": {"client_gpus": 0.5, "server_device": "cuda"}}),
        tmp_path,
        run_dir=tmp_path / "gpu",
        show_progress=False,
    )
    cpu, gpu = finals(on_cpu), finals(on_gpu)
    assert cpu.keys() == gpu.keys()
    for key in cpu:  # float arithmetic differs on the GPU; the accuracies of a few hundred examples barely move
        assert gpu[key] == pytest.approx(cpu[key], abs=0.02), key
    assert torch.cuda.is_available()
