"""Whole runs on Flower's simulation runtime (real Ray, real ClientApps) against the quadratic closed form.

One module, two identical runs (the second checks that the same seed gives the same numbers).
"""

import json

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from fedmerge.simulations.runner import run
from fedmerge.simulations.spec import Spec
from fedmerge.tasks import load_suite

pytestmark = pytest.mark.slow

LR, STEPS, ROUNDS = 0.02, [5, 10, 20, 40], 30
SPEC = Spec.from_dict(
    {
        "name": "simulation-test",
        "suite": "quadratic",
        "clients": 4,
        "strategies": ["fedavg", "fednova", "dare-ties"],  # dare-ties: its random drops, seeded, through real Ray
        "rounds": [1, ROUNDS],
        "same_compute": False,
        "training": {"lr": LR, "steps": STEPS, "batch_size": 1000},  # full batch: gradient descent
        "strategy": {"fednova": {"normalize_by": "steps"}},
    }
)


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    out = tmp_path_factory.mktemp("runs")
    return [run(SPEC, out, run_dir=out / name, show_progress=False) for name in ("first", "second")]


@pytest.fixture(scope="module")
def results(runs):
    return json.loads((runs[0] / "results.json").read_text())


@pytest.fixture(scope="module")
def quadratic():
    fed = load_suite("quadratic", 4, SPEC.suite_options, SPEC.seed)
    optimum = fed.optimum()
    return fed.pretrained["theta"].double(), [c.double() for c in optimum["tasks"]], optimum["theta"].double()


def model(run_dir, name):
    return load_file(run_dir / "models" / f"{name}.safetensors")["theta"].double()


def test_a_run_directory_holds_every_result_file(runs, results):
    files = {p.name for p in runs[0].iterdir()}
    assert {"results.json", "summary.csv", "tasks.csv", "rounds.csv", "spec.toml", "models"} <= files
    assert {p.name for p in (runs[0] / "models").iterdir()} == {
        f"{s}-r{r}.safetensors" for s in SPEC.strategies for r in SPEC.rounds
    }
    assert Spec.from_dict(results["spec"]) == SPEC
    assert set(results["versions"]) >= {"flwr", "ray", "torch"}
    assert [(r["strategy"], r["rounds"]) for r in results["runs"]] == [
        (s, r) for r in SPEC.rounds for s in SPEC.strategies
    ]
    assert all(
        len(r["history"]) == ROUNDS + 1 for r in results["runs"] if r["rounds"] == ROUNDS
    )  # θ0, then every round


def without_run_identity(document):
    """Drop what is not a number of the run: timings (a round's seconds too), start time, and Flower's node ids."""
    if isinstance(document, dict):
        return {
            k: without_run_identity(v)
            for k, v in document.items()
            if k not in ("timings", "started", "node_ids", "seconds")
        }
    if isinstance(document, list):
        return [without_run_identity(v) for v in document]
    return document


def test_the_same_seed_gives_the_same_numbers(runs):
    first, second = (without_run_identity(json.loads((d / "results.json").read_text())) for d in runs)
    assert first == second
    for name in ("fedavg-r1", f"fednova-r{ROUNDS}", "dare-ties-r1", f"dare-ties-r{ROUNDS}"):
        assert torch.equal(model(runs[0], name), model(runs[1], name))


def test_clients_report_the_contract_and_their_heterogeneity(results):
    replies = [c["reply"] for c in results["clients"]]
    assert [r["num-steps"] for r in replies] == STEPS
    assert [r["lr-sum"] for r in replies] == pytest.approx([LR * k for k in STEPS])
    aggregation = results["runs"][0]["history"][-1]["aggregation"]
    assert aggregation["effective_weights"] == pytest.approx(np.array(STEPS) / sum(STEPS))
    assert aggregation["chi_square"] > 0.2


def test_one_shot_fedavg_is_task_arithmetic_on_the_clients_gradient_descent(runs, results, quadratic):
    theta0, centers, _ = quadratic
    scaling = results["runs"][0]["selected"]["scaling"]
    task_vectors = [(1 - (1 - LR) ** k) * (c - theta0) for c, k in zip(centers, STEPS)]  # DESIGN.md's closed form
    expected = theta0 + scaling * sum(task_vectors)
    assert torch.allclose(model(runs[0], "fedavg-r1"), expected, atol=1e-5)


def test_multi_round_fedavg_converges_to_the_weighted_optimum_and_fednova_closer_to_the_true_one(runs, quadratic):
    _, centers, optimum = quadratic
    a = [1 - (1 - LR) ** k for k in STEPS]
    weighted_optimum = sum(at * c for at, c in zip(a, centers)) / sum(a)  # FedAvg's fixed point
    fedavg, fednova = model(runs[0], f"fedavg-r{ROUNDS}"), model(runs[0], f"fednova-r{ROUNDS}")
    assert torch.dist(fedavg, weighted_optimum) < 1e-3 * torch.dist(weighted_optimum, optimum)
    assert torch.dist(fednova, optimum) < 0.5 * torch.dist(fedavg, optimum)
