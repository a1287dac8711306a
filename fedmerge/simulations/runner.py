"""Run a spec on Flower's simulation runtime (Ray): validate, simulate with a progress display, store results."""

import contextlib
import logging
import os
import time
import warnings
from pathlib import Path

from flwr.simulation import run_simulation

from fedmerge.clients.app import client_app
from fedmerge.clients.trainer import total_steps
from fedmerge.errors import FedmergeError
from fedmerge.simulations.progress import ProgressDisplay
from fedmerge.simulations.results import write_results
from fedmerge.simulations.serverapp import server_app
from fedmerge.simulations.spec import Spec
from fedmerge.tasks import load_suite


def check_runnable(spec: Spec) -> None:
    """What needs the data: suite options, and enough local steps to split over the rounds."""
    fed = load_suite(spec.suite, spec.clients, spec.suite_options, spec.seed)
    fed.pretrained  # pretrain (or read the cache) here, once, before the clients need it
    if spec.same_compute:
        most_rounds = max(spec.rounds)
        for t, (config, task) in enumerate(zip(spec.client_configs(), fed.tasks)):
            steps = total_steps(config, len(task.train))
            if steps < most_rounds:
                raise FedmergeError(
                    f"client {t} has {steps} local steps, fewer than the {most_rounds} rounds they must be split over; "
                    "give it more steps, fewer rounds, or set same_compute = false."
                )


def backend_config(spec: Spec) -> dict:
    engine = spec.engine
    config = {"client_resources": {"num_cpus": float(engine["client_cpus"]), "num_gpus": float(engine["client_gpus"])}}
    # "local" always starts a fresh Ray: a bare ray.init() would try the cluster that `ray start` last
    # recorded on this machine (/tmp/ray/ray_current_cluster) and hang if that cluster is gone.
    init_args = {"logging_level": logging.ERROR, "log_to_driver": False, "address": engine["ray_address"] or "local"}
    config["init_args"] = init_args
    return config


def units_of_work(spec: Spec) -> int:
    """Progress steps: the one-shot training, one merge per strategy, one step per multi-round round."""
    one_shot = (1 + len(spec.strategies)) if 1 in spec.rounds else 1
    return one_shot + sum(r * len(spec.strategies) for r in spec.rounds if r > 1)


@contextlib.contextmanager
def quiet_flower():
    """Keep Flower's and Ray's per-round logging (and run_simulation's deprecation notice) off the display.

    Errors still show; fedmerge's own warnings (clients left out of a round) too.
    """
    loggers = [logging.getLogger(name) for name in ("flwr", "ray")]
    levels = [logger.level for logger in loggers]
    os.environ.setdefault("RAY_DEDUP_LOGS", "1")
    os.environ.setdefault("RAY_ACCEL_ENV_VAR_OVERRIDE_ON_ZERO", "0")
    for logger in loggers:
        logger.setLevel(logging.ERROR)
    try:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", category=FutureWarning, module="ray")
            yield
    finally:
        for logger, level in zip(loggers, levels):
            logger.setLevel(level)


def run(spec: Spec, out: Path = Path("results"), run_dir: Path | None = None, show_progress: bool = True) -> Path:
    """Run ``spec`` and return its results directory (``run_dir``, or a new one under ``out``)."""
    if run_dir is not None and Path(run_dir).exists():
        raise FedmergeError(f"results directory {run_dir} exists already; choose another --out or remove it.")
    started = time.perf_counter()
    check_runnable(spec)
    collected: dict = {}
    flat = spec.to_flat()
    with ProgressDisplay(units_of_work(spec), f"{spec.name}: {spec.clients} clients on {spec.suite}", show_progress) as display:
        with quiet_flower():
            run_simulation(
                server_app=server_app(flat, on_results=lambda _, results: collected.update(results), progress=display.advance),
                client_app=client_app(flat),
                num_supernodes=spec.clients,
                backend_config=backend_config(spec),
            )
    if not collected:
        raise FedmergeError("the simulation ended without results; the log above says why.")
    collected.setdefault("timings", {})["total"] = round(time.perf_counter() - started, 3)
    return write_results(spec, collected, out, run_dir=run_dir)
