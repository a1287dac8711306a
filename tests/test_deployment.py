"""A real deployment: one SuperLink and two SuperNodes on loopback run one round of FedNova with `flwr run`.

The processes are Flower's own console scripts (`flower-superlink`, `flower-supernode`, `flwr`) from this
interpreter's environment, each with its own free port and everything it writes under pytest's temporary
directory. The run's merged model must equal the one the simulation runner (Ray) makes from the same spec:
deployment and simulation are the same ServerApp and ClientApp. The two run side by side (the deployment mostly
waits on its processes). Every process started here is stopped at the end, on success and on failure.

`flwr run` is pointed at a copy of the app, made from the repository root: `pyproject.toml`, `.gitignore`
and `fedmerge/`, which is all the FAB holds (`fab-include = ["fedmerge/**"]`). Flower walks and resolves
every file under the app directory before it filters them, and a checkout's `.venv/` alone has ~50,000
files (15-35 s here); the copy gives the same FAB without that walk.
"""

import dataclasses
import json
import os
import re
import shutil
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import torch
from flwr.common.config import flatten_dict
from safetensors.torch import load_file

from fedmerge.config import tomllib
from fedmerge.merging import METHODS
from fedmerge.simulations.presets import load_experiment
from processes import free_port, seconds, stop, tail, wait_for_port
from fedmerge.simulations.runner import run
from fedmerge.simulations.spec import Spec

REPO = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent  # the console scripts of the environment running the tests
CONNECTION = "deployment"
RUN_TIMEOUT = seconds(240)  # seconds for the whole `flwr run --stream` (a loaded 2-core machine needs ~60-90)

OVERRIDES = {
    "clients": 2,
    "strategies": '["fednova"]',
    "rounds": "[1]",
    "select": False,
    "training.steps": "[5, 20]",  # training heterogeneity: FedNova's normalisation matters
    # The simulation side must start its own Ray instance, never attach to a Ray cluster someone left
    # running on this machine (/tmp/ray/ray_current_cluster); the deployment does not use Ray at all.
    "engine.ray_address": "local",
}


def app_config() -> dict:
    """The run config Flower fuses the overrides into: `[tool.flwr.app.config]`, flattened."""
    pyproject = tomllib.loads((REPO / "pyproject.toml").read_text())
    return flatten_dict(pyproject["tool"]["flwr"]["app"]["config"])


def run_config_arg(overrides: dict) -> str:
    """`--run-config` text: TOML values, strings as literal strings ('["fednova"]')."""

    def toml(value):
        if isinstance(value, bool):
            return "true" if value else "false"
        if isinstance(value, str):
            assert "'" not in value
            return f"'{value}'"
        return repr(value)

    return " ".join(f"{key}={toml(value)}" for key, value in overrides.items())


# -- the two runs -------------------------------------------------------------------------------------
def deploy(work: Path, cache: Path, abort: threading.Event) -> tuple[str, Path, str]:
    """Run the experiment on a SuperLink with two SuperNodes: (run status, results directory, logs)."""
    app = work / "app"
    app.mkdir()
    shutil.copy2(REPO / "pyproject.toml", app / "pyproject.toml")
    if (REPO / ".gitignore").exists():
        shutil.copy2(REPO / ".gitignore", app / ".gitignore")
    shutil.copytree(REPO / "fedmerge", app / "fedmerge", ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))

    link_port, node_ports = free_port(), (free_port(), free_port())
    home, results, logs = work / "flwr-home", work / "results", work / "logs"
    for folder in (home, results, logs):
        folder.mkdir()
    (home / "config.toml").write_text(
        f'[superlink]\ndefault = "{CONNECTION}"\n\n'
        f'[superlink.{CONNECTION}]\naddress = "127.0.0.1:{link_port}"\ninsecure = true\n'
    )
    env = {
        **os.environ,
        "PATH": f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}",  # Flower starts flower-superexec by name
        "FEDMERGE_RESULTS": str(results),
        "FEDMERGE_CACHE": str(cache),
        "FLWR_HOME": str(home),
        "FLWR_TELEMETRY_ENABLED": "0",
        "FLWR_DISABLE_UPDATE_CHECK": "1",
        "FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION": "1",
    }

    processes: list[subprocess.Popen] = []

    def start(name: str, *args: str) -> subprocess.Popen:
        with open(logs / f"{name}.log", "w") as log:
            process = subprocess.Popen(
                [str(BIN / args[0]), *args[1:]], env=env, cwd=work, stdout=log, stderr=subprocess.STDOUT
            )
        processes.insert(0, process)  # stopped in reverse order: SuperNodes first, flwr before them
        return process

    def logs_text() -> str:
        return "\n\n".join(f"== {p.name}\n{tail(p)}" for p in sorted(logs.iterdir()))

    try:
        superlink = start(
            "superlink",
            "flower-superlink",
            "--insecure",
            "--isolation",
            "subprocess",
            "--host",
            "127.0.0.1",
            "--port",
            str(link_port),
            "--database",
            str(work / "superlink.db"),
            "--disable-runtime-dependency-installation",
        )
        for partition, port in enumerate(node_ports):
            start(
                f"supernode-{partition}",
                "flower-supernode",
                "--insecure",
                "--superlink",
                f"127.0.0.1:{link_port}",
                "--host",
                "127.0.0.1",
                "--port",
                str(port),
                "--node-config",
                f"partition-id={partition} num-partitions={OVERRIDES['clients']}",
            )
        wait_for_port(link_port, superlink, logs / "superlink.log")

        # `--stream` prints the run's log and returns when the run has ended.
        flwr_run = start(
            "flwr-run", "flwr", "run", str(app), CONNECTION, "--run-config", run_config_arg(OVERRIDES), "--stream"
        )
        deadline = time.monotonic() + RUN_TIMEOUT
        while flwr_run.poll() is None and not abort.is_set() and time.monotonic() < deadline:
            time.sleep(0.5)
        if flwr_run.poll() is None:
            raise RuntimeError(f"`flwr run` did not return within {RUN_TIMEOUT} s (or was aborted):\n{logs_text()}")
        match = re.search(r"Successfully started run (\d+)", (logs / "flwr-run.log").read_text())
        assert flwr_run.returncode == 0 and match, f"flwr run failed:\n{logs_text()}"
        listed = subprocess.run(
            [str(BIN / "flwr"), "list", CONNECTION, "--run-id", match.group(1), "--format", "json"],
            env=env,
            cwd=work,
            capture_output=True,
            text=True,
            timeout=seconds(60),
        )
        status = json.loads(listed.stdout)["runs"][0]["status"]
        return status, results, logs_text()
    finally:
        stop(processes)


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """The deployment (in a thread: it mostly waits on its processes) and the simulation runner (Ray, here).

    Both use one pretrained-base cache: whichever side needs the base first builds it (writes are atomic).
    """
    work = tmp_path_factory.mktemp("deployment")
    cache = work / "cache"
    abort = threading.Event()
    with ThreadPoolExecutor(max_workers=1) as pool:
        deployment = pool.submit(deploy, work, cache, abort)
        try:
            with pytest.MonkeyPatch.context() as patch:
                patch.setenv("FEDMERGE_CACHE", str(cache))
                spec = Spec.from_flat({**app_config(), **OVERRIDES})
                simulated = run(spec, work / "simulation", run_dir=work / "simulation" / "run", show_progress=False)
        except BaseException:
            abort.set()  # the deployment stops its processes and returns
            raise
        status, results, log = deployment.result()
    return {"status": status, "results": results, "log": log, "simulated": simulated}


# -- tests ----------------------------------------------------------------------------------------------
def test_the_app_config_is_the_default_preset():
    app, preset = Spec.from_flat(app_config()), Spec.from_dict(load_experiment("default"))
    assert dataclasses.replace(app, strategy={}) == dataclasses.replace(preset, strategy={})
    assert all(app.strategy_options(name) == preset.strategy_options(name) for name in METHODS)  # the defaults
    assert not any(METHODS[name].tuned in app.strategy.get(name, {}) for name in METHODS)  # searched one-shot


@pytest.mark.slow
def test_a_round_of_fednova_on_a_superlink_and_two_supernodes_completes(runs):
    assert runs["status"] == "finished:completed", runs["log"]
    (run_dir,) = runs["results"].iterdir()
    report = json.loads((run_dir / "results.json").read_text())
    assert Spec.from_dict(report["spec"]) == Spec.from_flat({**app_config(), **OVERRIDES})
    assert [c["reply"]["num-steps"] for c in report["clients"]] == [5, 20]
    assert (run_dir / "models" / "fednova-r1.safetensors").is_file()


@pytest.mark.slow
def test_deployment_and_simulation_merge_the_same_model(runs):
    assert runs["status"] == "finished:completed", runs["log"]
    (run_dir,) = runs["results"].iterdir()
    on_superlink = load_file(run_dir / "models" / "fednova-r1.safetensors")
    in_simulation = load_file(runs["simulated"] / "models" / "fednova-r1.safetensors")
    assert on_superlink.keys() == in_simulation.keys()
    for name, tensor in on_superlink.items():
        assert torch.allclose(tensor, in_simulation[name], rtol=1e-6, atol=1e-7), name
