"""The examples run as a user runs them: `cd examples/custom-suite && fedmerge run experiment.toml`."""

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from processes import seconds

pytestmark = pytest.mark.slow

EXAMPLES = Path(__file__).parent.parent / "examples"


@pytest.fixture(scope="module")
def custom_suite_run(tmp_path_factory):
    folder = tmp_path_factory.mktemp("example") / "custom-suite"
    shutil.copytree(
        EXAMPLES / "custom-suite", folder, ignore=shutil.ignore_patterns("data", "results", ".fedmerge-cache")
    )
    done = subprocess.run(
        [sys.executable, "-m", "fedmerge.cli", "run", "experiment.toml"],
        cwd=folder,
        capture_output=True,
        text=True,
        timeout=seconds(600),
    )
    assert done.returncode == 0, done.stderr[-3000:]
    (run_dir,) = (folder / "results").iterdir()
    return done, run_dir


def test_the_custom_suite_example_runs_from_its_folder(custom_suite_run):
    done, run_dir = custom_suite_run
    results = json.loads((run_dir / "results.json").read_text())
    assert results["suite"]["name"] == "my_tasks:build" and len(results["clients"]) == 4
    assert [(r["strategy"], r["rounds"]) for r in results["runs"]] == [
        (s, r) for r in (1, 3) for s in ("fedavg", "fednova", "median")
    ]
    own = [c["own"]["test"]["accuracy"] for c in results["clients"]]
    assert min(own) > results["pretrained"]["mean_accuracy"]  # fine-tuning helps every client on its own task
    assert "θ0 (no merging)" in done.stdout


def test_frozen_parameters_never_leave_theta0(custom_suite_run):
    _, run_dir = custom_suite_run
    models = [load_file(path) for path in sorted((run_dir / "models").glob("*.safetensors"))]
    first = models[0]
    assert all(torch.equal(m["conv_proj.weight"], first["conv_proj.weight"]) for m in models)  # frozen: θ0's
    assert not all(torch.equal(m["heads.head.weight"], first["heads.head.weight"]) for m in models)  # trained
