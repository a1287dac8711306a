"""One-shot federation through fedmerge (Flower's simulation runtime on Ray) against a bare PyTorch loop.

Two workloads, each timed both ways on the same clients, settings and θ0:

- ``mnist1d``: 8 mnist1d clients with distinct tasks (a head each), an MLP, 4000 local SGD steps each;
- ``custom-suite``: the user-suite example, ``examples/custom-suite`` (a small torchvision ViT fine-tuned on
  image folders read lazily through a DataLoader, its patch embedding frozen), as its ``experiment.toml``
  sets it, with FedAvg only, one round and no λ selection.

The bare loop trains the clients one after another in this process with fedmerge's trainer, merges them by
FedAvg and evaluates the merged model on every task. fedmerge does the same through ``run`` (Ray's start,
the clients' start, the server's diagnostics and evaluation of θ0 and the clients' own models included).
Suite data and θ0 are built (and cached) before either is timed. Each workload prints both times and the
ratio fedmerge / bare loop.

Run: ``python benchmarks/simulation.py [--workload mnist1d|custom-suite|both] [--device cpu|cuda]
[--clients 8] [--steps 4000] [--hidden 256]`` (the last three size the mnist1d workload). ``--device cuda``
trains each client on the GPU (``engine.client_gpus = 1``) and evaluates and merges there
(``engine.server_device = "cuda"``); the bare loop then trains, merges and evaluates on the GPU too. Ray's
start and the clients' start cost about 10 s whatever the sizes; with little local training per client
(the custom-suite example trains 20 to 80 steps per client) they dominate.
"""

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import torch

from fedmerge.clients.trainer import train
from fedmerge.merging import FedAvgRule
from fedmerge.merging.rule import iter_merged_model
from fedmerge.simulations.runner import run
from fedmerge.simulations.spec import Spec, load_toml
from fedmerge.tasks import load_suite

EXAMPLE = Path(__file__).resolve().parent.parent / "examples" / "custom-suite"
WORKLOADS = ("mnist1d", "custom-suite")


def engine(device: str) -> dict:
    """The [engine] table for ``device``: clients on a whole GPU each and the server on it, or all on the CPU."""
    return {"client_gpus": 1.0 if device == "cuda" else 0.0, "server_device": device}


def mnist1d_spec(args) -> Spec:
    return Spec.from_dict({
        "name": "benchmark", "suite": "mnist1d", "clients": args.clients, "strategies": ["fedavg"], "rounds": [1],
        "select": False, "suite_options": {"partition": "tasks", "hidden": args.hidden},
        "training": {"steps": args.steps, "lr": 0.05, "batch_size": 32}, "engine": engine(args.device),
    })


def custom_suite_spec(args) -> Spec:
    """The example's experiment.toml with FedAvg only, one round, no λ selection; my_tasks imported by path."""
    if str(EXAMPLE) not in sys.path:
        sys.path.insert(0, str(EXAMPLE))  # Flower passes sys.path on to its Ray workers
    data = load_toml(EXAMPLE / "experiment.toml")
    data.update(name="benchmark-custom-suite", strategies=["fedavg"], rounds=[1], select=False, engine=engine(args.device))
    return Spec.from_dict(data)


def bare_loop(spec: Spec, device: str) -> float:
    """The same federation with no framework: train each client in turn, average, evaluate, all on ``device``."""
    start = time.perf_counter()
    fed = load_suite(spec.suite, spec.clients, spec.suite_options, spec.seed)
    base = {name: tensor.to(device) for name, tensor in fed.pretrained.items()}
    finetuned = []
    for config, task in zip(spec.client_configs(), fed.tasks):
        model = fed.model_from(fed.pretrained, device)
        train(model, task, fed.loss, config, head=task.head)
        finetuned.append(model.state_dict())
        del model
    merged = dict(iter_merged_model(FedAvgRule(), base, finetuned, names=fed.trained_names))  # what the clients train
    model = fed.model_from(merged, device)
    for task in fed.tasks:
        fed.evaluate(model, task)
    if device == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter() - start


def measure(spec: Spec, device: str) -> tuple[float, float, dict]:
    """(bare loop seconds, fedmerge seconds, fedmerge's own timings)."""
    fed = load_suite(spec.suite, spec.clients, spec.suite_options, spec.seed)
    fed.pretrained  # build data and θ0 (or read the cache) outside both timings
    bare = bare_loop(spec, device)
    with tempfile.TemporaryDirectory() as out:
        start = time.perf_counter()
        run_dir = run(spec, Path(out), show_progress=False)
        framework = time.perf_counter() - start
        timings = json.loads((run_dir / "results.json").read_text())["timings"]
    return bare, framework, timings


def report(title: str, bare: float, framework: float, timings: dict) -> None:
    print(title)
    print(f"bare PyTorch loop (sequential, one process): {bare:8.2f} s")
    print(f"fedmerge on Flower + Ray (start included):   {framework:8.2f} s   "
          f"(clients' round {timings['client_training']:.2f} s)")
    print(f"fedmerge / bare loop: {framework / bare:.2f}", flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workload", choices=(*WORKLOADS, "both"), default="both")
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cpu",
                        help="cuda: clients train on the GPU (engine.client_gpus = 1), the server evaluates and merges there")
    parser.add_argument("--clients", type=int, default=8, help="mnist1d clients")
    parser.add_argument("--steps", type=int, default=4000, help="mnist1d local steps per client")
    parser.add_argument("--hidden", type=int, default=256, help="width of the mnist1d MLP's hidden layers")
    args = parser.parse_args()
    if args.device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda: CUDA is not available on this machine; use --device cpu.")
    workloads = WORKLOADS if args.workload == "both" else (args.workload,)

    if "mnist1d" in workloads:
        spec = mnist1d_spec(args)
        report(f"mnist1d: {args.clients} clients x {args.steps} local steps, MLP (hidden {args.hidden}), "
               f"one-shot FedAvg, on {args.device}", *measure(spec, args.device))
    if "custom-suite" in workloads:
        spec = custom_suite_spec(args)
        steps = [config.steps for config in spec.client_configs()]
        report(f"custom-suite: {spec.clients} clients x {min(steps)}-{max(steps)} local steps, torchvision ViT on "
               f"image folders (examples/custom-suite), one-shot FedAvg, on {args.device}", *measure(spec, args.device))


if __name__ == "__main__":
    main()
