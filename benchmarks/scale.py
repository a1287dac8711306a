"""Many clients: fedmerge's cost per client call against Flower's own runtime with a trivial ClientApp.

For each N, two simulations on Flower's runtime (Ray), each in a process of its own, with the same backend
(``client_cpus`` 1: as many clients at a time as this machine has CPUs):

- ``flower``: Flower's FedAvg for R rounds over N nodes whose ClientApp sends back the arrays it received (10 floats)
  with ``num-examples`` 1: Flower's own cost per client call;
- ``flower+work``: the same, but each ClientApp does the work a fedmerge client does here, written plainly in torch
  (4 SGD steps on ½‖θ − x‖² over 32 samples of 10 dimensions, one thread) and the server scores each round's model
  on every client's val and test samples as fedmerge does: Flower's cost with the same work, so that
  fedmerge / (flower+work) is fedmerge's own overhead;
- ``fedmerge``: ``fedmerge run`` on the quadratic suite (10 dimensions, 4 local gradient steps per client), FedAvg
  over R rounds with no λ search (the one-shot round runs too: its replies feed the diagnostics).

Each prints its seconds per round (the rounds after the first, which starts the actors), the cost per client call
(round time / N: what N clients cost on this machine's cores), and the peak memory of its driver process and of the
largest Ray worker. The ratio fedmerge / Flower is per client call; flat means the cost does not grow with N.

Run: ``python benchmarks/scale.py [--clients 256 1024 4096 10000] [--rounds 3] [--batch K]`` (``--batch``: also
fedmerge with ``engine.clients_per_call = K``, several clients trained per worker call).
"""

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

FLOWER = r'''
import json, sys, time, logging, resource
import numpy as np
from flwr.app import Array, ArrayRecord, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp
from flwr.serverapp import ServerApp
from flwr.serverapp.strategy import FedAvg
from flwr.simulation import run_simulation

import torch

clients, rounds, work = int(sys.argv[1]), int(sys.argv[2]), sys.argv[3] == "work"
DIM, SAMPLES, STEPS, LR = 10, 32, 4, 0.1
torch.set_num_threads(1)
client = ClientApp()


def samples(t, split):
    """Client t's samples x_i = c_t + noise of one split (the quadratic suite's sizes, not its numbers)."""
    rng = np.random.default_rng([t, split])
    return torch.from_numpy(rng.standard_normal(DIM) + 0.1 * rng.standard_normal((SAMPLES, DIM))).float()


@client.train()
def train(message, context):
    arrays = next(iter(message.content.array_records.values()))
    if work:
        torch.set_num_threads(1)  # in the Ray worker, as fedmerge's trainer runs
        theta = torch.nn.Parameter(torch.from_numpy(arrays["theta"].numpy()))
        data, optimizer = samples(int(context.node_config["partition-id"]), 0), torch.optim.SGD([theta], lr=LR)
        for _ in range(STEPS):
            optimizer.zero_grad()
            (0.5 * (theta - data).pow(2).sum(1).mean()).backward()
            optimizer.step()
        arrays = ArrayRecord({"theta": Array(theta.detach().numpy())})
    return Message(RecordDict({"arrays": arrays, "metrics": MetricRecord({"num-examples": 1})}), reply_to=message)


held_out = [[samples(t, split) for split in (1, 2)] for t in range(clients)] if work else []


def evaluate(server_round, arrays):
    marks.append(time.perf_counter())
    theta = torch.from_numpy(arrays["theta"].numpy())
    return MetricRecord({"loss": float(np.mean([float(0.5 * (theta - x).pow(2).sum(1).mean())
                                                for splits in held_out for x in splits]))}) if work else None

server = ServerApp()
marks = []

@server.main()
def main(grid, context):
    strategy = FedAvg(fraction_evaluate=0.0, min_train_nodes=clients, min_available_nodes=clients)
    strategy.start(grid=grid, initial_arrays=ArrayRecord({"theta": Array(np.zeros(10, dtype=np.float32))}), num_rounds=rounds,
                   evaluate_fn=evaluate)

logging.getLogger("flwr").setLevel(logging.ERROR)
run_simulation(server_app=server, client_app=client, num_supernodes=clients,
               backend_config={"client_resources": {"num_cpus": 1.0, "num_gpus": 0.0},
                               "init_args": {"logging_level": logging.ERROR, "log_to_driver": False, "address": "local"}})
rounds_seconds = [b - a for a, b in zip(marks, marks[1:])]
print(json.dumps({"rounds": rounds_seconds, "driver_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}))
'''


def worker_peak_mib() -> float:
    """The largest peak resident memory among this user's Ray worker processes still alive (MiB), else 0."""
    peak = 0.0
    for status in Path("/proc").glob("[0-9]*/status"):
        try:
            text = status.read_text()
            cmdline = (status.parent / "cmdline").read_bytes()
        except OSError:
            continue
        if b"ray::" in cmdline or b"default_worker.py" in cmdline:
            for line in text.splitlines():
                if line.startswith("VmHWM:"):
                    peak = max(peak, int(line.split()[1]) / 1024)
    return peak


def measured(argv: list[str], what: str) -> dict:
    """Run a side in a process of its own, sampling the Ray workers' peak memory while it runs."""
    process = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    workers = 0.0
    while process.poll() is None:
        workers = max(workers, worker_peak_mib())
        time.sleep(1.0)
    out, err = process.communicate()
    if process.returncode:
        raise SystemExit(f"{what} failed:\n{err[-3000:]}")
    return {**json.loads(out.strip().splitlines()[-1]), "worker_mib": workers}


def flower(clients: int, rounds: int, work: bool = False) -> dict:
    return measured(
        [sys.executable, "-c", FLOWER, str(clients), str(rounds), "work" if work else "trivial"],
        f"Flower{' with work' if work else ''} at N = {clients}",
    )


FEDMERGE = r"""
import json, sys, resource
from pathlib import Path
from fedmerge.simulations.runner import run
from fedmerge.simulations.spec import Spec

clients, rounds, batch, out = int(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3]), Path(sys.argv[4])
spec = Spec.from_dict({
    "name": "scale", "suite": "quadratic", "clients": clients, "strategies": ["fedavg"], "rounds": [1, rounds],
    "select": False, "same_compute": False, "suite_options": {"dim": 10},
    "training": {"lr": 0.1, "steps": 4, "batch_size": 1000},
    **({"engine": {"clients_per_call": batch}} if batch > 1 else {}),
})
run_dir = run(spec, out, run_dir=out / "run", show_progress=False)
results = json.loads((run_dir / "results.json").read_text())
history = next(r for r in results["runs"] if r["rounds"] == rounds)["history"]
print(json.dumps({"rounds": [entry["seconds"] for entry in history[1:]],
                  "driver_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}))
"""


def fedmerge(clients: int, rounds: int, batch: int = 1) -> dict:
    with tempfile.TemporaryDirectory() as out:
        return measured(
            [sys.executable, "-c", FEDMERGE, str(clients), str(rounds), str(batch), out], f"fedmerge at N = {clients}"
        )


def per_call_ms(result: dict, clients: int) -> float:
    """Milliseconds per client call: the median round after the first, over N."""
    later = sorted(result["rounds"][1:]) or result["rounds"]
    return 1000 * later[len(later) // 2] / clients


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--clients", type=int, nargs="+", default=[256, 1024, 4096, 10_000])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--batch", type=int, default=0, help="also fedmerge with this many clients per worker call")
    args = parser.parse_args()
    cores = len(os.sched_getaffinity(0))
    print(
        f"{cores} cores; Ray runs {cores} clients at a time on both sides (client_cpus 1); {args.rounds} rounds; "
        f"cost per call = median round (after the first) / N"
    )
    print(
        f"{'N':>7} {'Flower':>8} {'F+work':>8} {'fedmerge':>9} {'f/F':>5} {'f/(F+work)':>10}"
        + (f" {'batched':>8} {'F/batched':>9}" if args.batch else "")
        + f" {'driver MiB F/f':>15} {'worker MiB F/f':>15}   (ms per client call)"
    )
    for clients in args.clients:
        started = time.perf_counter()
        theirs, working, ours = (
            flower(clients, args.rounds),
            flower(clients, args.rounds, True),
            fedmerge(clients, args.rounds),
        )
        flower_ms, working_ms, ours_ms = (per_call_ms(r, clients) for r in (theirs, working, ours))
        line = (
            f"{clients:>7} {flower_ms:>8.2f} {working_ms:>8.2f} {ours_ms:>9.2f} {ours_ms / flower_ms:>5.2f} "
            f"{ours_ms / working_ms:>10.2f}"
        )
        if args.batch:
            batched = fedmerge(clients, args.rounds, args.batch)
            line += f" {per_call_ms(batched, clients):>8.2f} {flower_ms / per_call_ms(batched, clients):>9.1f}"
        line += f" {theirs['driver_mib']:>7.0f}/{ours['driver_mib']:<7.0f} {theirs['worker_mib']:>7.0f}/{ours['worker_mib']:<7.0f}"
        print(line + f"   ({time.perf_counter() - started:.0f} s)", flush=True)


if __name__ == "__main__":
    main()
