"""Run a spec on Flower's simulation runtime (Ray): validate, simulate with a progress display, store results.

Everything that can be checked is checked before Ray is imported or started (the spec, the output path, the
resources each client asks for, the suite's data). Ray is started with Flower's own code, again while its GCS does
not answer (a heavily loaded machine), for a bounded time. While the simulation runs, a Ctrl-C, a SIGTERM or a
failure of the runtime stops the ServerApp thread too, so the process ends promptly with Ray shut down; the
loggers, environment variables and SIGTERM handler the run changed are restored on every way out.
"""

import contextlib
import datetime as dt
import logging
import math
import os
import signal
import socket
import sys
import threading
import time
import warnings
from pathlib import Path

from fedmerge.clients.app import client_app
from fedmerge.clients.trainer import check_warmup, total_steps
from fedmerge.devices import resolve_device
from fedmerge.errors import FedmergeError
from fedmerge.files import check_output_dir
from fedmerge.simulations.experiment import travelling
from fedmerge.simulations.progress import ProgressDisplay
from fedmerge.simulations.results import ResultsDirectory
from fedmerge.simulations.serverapp import server_app
from fedmerge.simulations.spec import Spec
from fedmerge.tasks import load_suite


def check_runnable(spec: Spec) -> None:
    """What needs the data: the suite builds, its data fits its model, and every client has enough local
    steps to split over the rounds."""
    fed = load_suite(spec.suite, spec.clients, spec.suite_options, spec.seed)
    try:
        fed.check_fits()  # also pretrains θ0 (or reads the cache) here, once, before the clients need it
    except FedmergeError as error:
        raise FedmergeError(f"suite {spec.suite!r}: {error}") from None
    travelling(fed, spec)  # LoRA adapters that server.lora cannot merge are refused here
    if spec.same_compute:
        most_rounds = max(spec.rounds)
        for t, (config, task) in enumerate(zip(spec.client_configs(), fed.tasks)):
            steps = total_steps(config, len(task.train))
            try:
                check_warmup(config, steps)  # with epochs, the steps are known only now
            except FedmergeError as error:
                raise FedmergeError(f"client {t}: {error}") from None
            if steps < most_rounds:
                raise FedmergeError(
                    f"client {t} has {steps} local steps, fewer than the {most_rounds} rounds they must be split over; "
                    "give it more steps, fewer rounds, or set same_compute = false."
                )


def available_resources(ray_address: str) -> tuple[float, float, str]:
    """(CPUs, GPUs) of the largest node a client could be placed on, and where that was read."""
    if not ray_address:
        import torch

        cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
        return float(cpus or 1), float(torch.cuda.device_count()), "this machine"
    import ray

    check_reachable(ray_address)
    try:
        with sigterm_kept():
            ray.init(address=ray_address, logging_level=logging.ERROR, log_to_driver=False)
    except Exception as error:  # Ray raises ConnectionError, ValueError, RuntimeError... for a bad address
        raise FedmergeError(
            f"engine.ray_address = {ray_address!r}: cannot attach to a Ray cluster there ({error}); "
            "start one with `ray start --head` or leave ray_address empty for a local Ray."
        ) from None
    try:
        nodes = [node["Resources"] for node in ray.nodes() if node.get("Alive")]
    finally:
        ray.shutdown()
    largest = max(nodes, key=lambda r: (r.get("GPU", 0.0), r.get("CPU", 0.0)), default={})
    return (
        float(largest.get("CPU", 0.0)),
        float(largest.get("GPU", 0.0)),
        f"the largest node of the Ray cluster at {ray_address}",
    )


def check_reachable(ray_address: str, seconds: float = 5.0) -> None:
    """A ``host:port`` address must answer (Ray itself would retry a dead one for minutes)."""
    host, sep, port = ray_address.removeprefix("ray://").rpartition(":")
    if not sep or not port.isdigit():
        return  # "auto" and the like: Ray resolves and reports those itself
    try:
        socket.create_connection((host.strip("[]"), int(port)), timeout=seconds).close()
    except OSError as error:
        raise FedmergeError(
            f"engine.ray_address = {ray_address!r}: nothing answers there ({error.strerror or error}); "
            "start the cluster's head with `ray start --head`, or leave ray_address empty for a local Ray."
        ) from None


def check_resources(spec: Spec) -> None:
    """Refuse per-client CPU/GPU requests that no node can ever meet (Ray would wait for them forever),
    and a server device this machine does not have."""
    engine = spec.engine
    resolve_device(engine["server_device"], "engine.server_device")
    cpus, gpus, where = available_resources(engine["ray_address"])
    for key, asked, have, unit in (
        ("client_cpus", engine["client_cpus"], cpus, "CPUs"),
        ("client_gpus", engine["client_gpus"], gpus, "GPUs"),
    ):
        if float(asked) > have:
            raise FedmergeError(
                f"engine.{key} = {asked:g} asks each client for more {unit} than {where} has ({have:g}); "
                f"set engine.{key} to at most {have:g}" + (" (0 trains on the CPU)." if unit == "GPUs" else ".")
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
    """Progress steps: each client's reply (the one-shot round always runs: its task vectors feed the
    diagnostics), each one-shot merge, and per multi-round round every sampled client's reply plus the round."""
    strategies = len(spec.strategies)
    one_shot = spec.clients + (strategies if 1 in spec.rounds else 0)
    per_round = spec.server["clients_per_round"] or spec.clients
    return one_shot + sum(r * strategies * (per_round + 1) for r in spec.rounds if r > 1)


MANY_CLIENTS = 500
"""From this many clients a run with one client per call says up front what that costs."""


def scale_note(spec: Spec) -> str | None:
    """What a run of many clients, one per Flower call, should know before it starts."""
    if spec.clients < MANY_CLIENTS or spec.engine["clients_per_call"] > 1:
        return None
    calls = units_of_work(spec) - len(spec.strategies) * (1 if 1 in spec.rounds else 0)
    return (
        f"{spec.name}: {calls:,} client calls, each paying Flower's runtime some milliseconds whatever it trains; "
        f"engine.clients_per_call = k trains k clients per call with the same numbers (docs/simulations.md, "
        "'Many clients'). The progress display says how long is left once clients reply."
    )


RAY_ENVIRONMENT = {"RAY_DEDUP_LOGS": "1", "RAY_ACCEL_ENV_VAR_OVERRIDE_ON_ZERO": "0"}
"""Set for a run unless the user set them: one copy of repeated worker lines; Ray leaves CUDA_VISIBLE_DEVICES alone
for a client given no GPU."""


@contextlib.contextmanager
def quiet_flower():
    """Keep Flower's, Ray's and the strategies' logging (per-round chatter, tracebacks of failed clients, a
    warning per merge that leaves a client out) off the display: every failure reaches fedmerge as a failed
    reply or an exception and is reported once, as a :class:`FedmergeError`; clients left out are recorded
    in the results and listed under ``fedmerge run``'s table.

    On every way out (success, failure, Ctrl-C) the loggers' levels and the environment (:data:`RAY_ENVIRONMENT`, and
    the PYTHONPATH Flower sets for Ray's workers) are restored.
    """
    loggers = [logging.getLogger(name) for name in ("flwr", "ray", "fedmerge")]
    levels = [logger.level for logger in loggers]
    environment = {key: os.environ.get(key) for key in (*RAY_ENVIRONMENT, "PYTHONPATH")}
    try:
        for key, value in RAY_ENVIRONMENT.items():
            os.environ.setdefault(key, value)
        for logger in loggers:
            logger.setLevel(logging.CRITICAL + 1)
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", category=FutureWarning, module="ray")
            yield
    finally:
        for logger, level in zip(loggers, levels):
            logger.setLevel(level)
        for key, value in environment.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


@contextlib.contextmanager
def sigterm_kept():
    """Keep this process's SIGTERM handler through a ``ray.init`` (which installs one that exits and a native one
    that prints a stack dump): SIGTERM then stops a run as the caller decided (``fedmerge``: like Ctrl-C, exit
    143). A SIGTERM that Ray's handler caught meanwhile is delivered again, to the restored handler."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    handler = signal.getsignal(signal.SIGTERM)
    handler = signal.SIG_DFL if handler is None else handler
    try:
        yield
    except SystemExit as stopped:  # Ray's handler: sys.exit(SIGTERM)
        if stopped.code != signal.SIGTERM:
            raise
        signal.signal(signal.SIGTERM, handler)
        signal.raise_signal(signal.SIGTERM)
        raise
    finally:
        signal.signal(signal.SIGTERM, handler)


RAY_START_SECONDS = 120.0
"""How long fedmerge keeps starting Ray while its GCS does not answer (a machine at a load of 10 to 20 on 2 cores)."""

RAY_RETRY_PAUSE = 2.0


def start_ray(config: dict) -> None:
    """Start Ray with Flower's own code for ``config`` (``run_simulation`` then finds it running and uses it), again
    while the failure is Ray's GCS not answering, for :data:`RAY_START_SECONDS` at most; then fail with a
    :class:`FedmergeError`."""
    import ray
    from flwr.server.superlink.fleet.vce.backend.raybackend import RayBackend

    started, attempts = time.monotonic(), 0
    while True:
        attempts += 1
        try:
            with sigterm_kept():
                RayBackend(config)  # ray.init with config's init_args, as run_simulation would call it
            return
        except Exception as error:
            ray.shutdown()
            elapsed = time.monotonic() - started
            cause = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
            if "GCS" not in str(error):
                raise FedmergeError(f"Ray did not start: {cause}") from None
            if elapsed + RAY_RETRY_PAUSE >= RAY_START_SECONDS:
                raise FedmergeError(
                    f"Ray did not start: {cause} ({attempts} attempts in {elapsed:.0f} s; its GCS does not answer, as "
                    "happens on a heavily loaded machine). Try again when the machine is less busy."
                ) from None
            time.sleep(RAY_RETRY_PAUSE)


FLOWER_CRASHES = ("An error was encountered. Ending simulation.", "Simulation Runtime crashed.")
"""How run_simulation words a failure of its runtime (the cause is chained beneath)."""


def root_cause(error: BaseException) -> BaseException:
    while error.__cause__ is not None:
        error = error.__cause__
    return error


WIND_DOWN_SECONDS = 5.0
"""After a failure or an interrupt, how long the ServerApp thread gets to stop (it checks every 0.1 s for replies)."""


def run(spec: Spec, out: Path = Path("results"), run_dir: Path | None = None, show_progress: bool = True) -> Path:
    """Run ``spec`` and return its results directory (``run_dir``, or a new one under ``out``).

    Results are written as each run finishes: if a later one fails, or the run is interrupted, the directory keeps
    the finished ones (results.json says ``"complete": false`` and why) and the error says where it is."""
    results = ResultsDirectory(spec, out, dt.datetime.now(), run_dir)
    check_output_dir(Path(run_dir).parent if run_dir is not None else Path(out), "--out")
    started = time.perf_counter()
    check_resources(spec)
    check_runnable(spec)
    if show_progress and (note := scale_note(spec)):
        print(f"fedmerge: {note}", file=sys.stderr)
    flat = spec.to_flat()
    stop = threading.Event()
    serving: list[threading.Thread] = []  # the ServerApp's thread, once it asks for the results store

    def store(_: Spec) -> ResultsDirectory:
        serving.append(threading.current_thread())
        return results

    title = f"{spec.name}: {spec.clients} clients on {spec.suite}"
    try:
        with ProgressDisplay(units_of_work(spec), title, show_progress) as display, quiet_flower():
            try:
                simulate(spec, server_app(flat, store=store, progress=display.advance, stop=stop), client_app(flat))
            finally:  # its last lines stay quiet and its last writes land before the run's own record
                stop.set()
                for thread in serving:
                    thread.join(WIND_DOWN_SECONDS)
    except FedmergeError as error:
        kept = results.fail(str(error))
        raise FedmergeError(str(error) if kept is None else f"{error} The {_kept(kept)}.") from None
    except BaseException as error:  # Ctrl-C, SIGTERM, a bug: the command line says where the finished runs are
        if (kept := results.fail(_why(error))) is not None:
            error.__notes__ = [*getattr(error, "__notes__", []), f"the {_kept(kept)}"]
        raise
    if results.document.get("complete") is not True:
        raise FedmergeError("the simulation ended without results and without an error; please report this.")
    return results.amend(
        timings={**results.document.get("timings", {}), "total": round(time.perf_counter() - started, 3)}
    )


def simulate(spec: Spec, server, client) -> None:
    """Start Ray and run the simulation; on any way out, Ray is shut down."""
    import ray
    from flwr.simulation import run_simulation  # Ray's import: only once everything is checked

    config = backend_config(spec)
    try:
        start_ray(config)
        nodes = math.ceil(spec.clients / spec.engine["clients_per_call"])  # several clients per call: fewer nodes
        run_simulation(server_app=server, client_app=client, num_supernodes=nodes, backend_config=config)
    except RuntimeError as error:
        if not str(error).startswith(FLOWER_CRASHES):
            raise  # not Flower's runtime: an error of the server's own work, with its traceback
        raise FedmergeError(f"Flower's simulation runtime failed: {root_cause(error)}") from None
    finally:
        ray.shutdown()


def _why(error: BaseException) -> str:
    """What results.json records of an exception that is no user's mistake (Ctrl-C, SIGTERM, a bug)."""
    return f"{type(error).__name__}: {error}" if str(error) else type(error).__name__


def _kept(path: Path) -> str:
    return f'runs that finished are kept in {path} (its results.json says "complete": false, and why)'
