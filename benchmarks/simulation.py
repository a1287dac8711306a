"""One-shot federation through fedmerge (Flower's simulation runtime on Ray) against a bare PyTorch loop.

Both fine-tune the same 8 mnist1d clients from the same θ0 with the same settings, merge by FedAvg and
evaluate the merged model on every task; the bare loop trains the clients one after another in this
process. Suite data and θ0 are built (and cached) before either is timed. The last line is the ratio
fedmerge / bare loop, Ray's start included.

Run: ``python benchmarks/simulation.py [--clients 8] [--steps 4000] [--hidden 256]``. Ray's start and the
clients' start cost about 10 s whatever the sizes; with little local training per client they dominate.
"""

import argparse
import tempfile
import time
from pathlib import Path

from fedmerge.clients.trainer import train
from fedmerge.merging import FedAvgRule, merged_model
from fedmerge.simulations.runner import run
from fedmerge.simulations.spec import Spec
from fedmerge.tasks import load_suite


def bare_loop(spec: Spec) -> float:
    """The same federation with no framework: train each client in turn, average, evaluate."""
    start = time.perf_counter()
    fed = load_suite(spec.suite, spec.clients, spec.suite_options, spec.seed)
    finetuned = []
    for config, task in zip(spec.client_configs(), fed.tasks):
        model = fed.model_from(fed.pretrained)
        train(model, task, fed.loss, config, head=task.head)
        finetuned.append(model.state_dict())
    merged = merged_model(FedAvgRule(), fed.pretrained, finetuned)
    for task in fed.tasks:
        fed.evaluate(merged, task)
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--clients", type=int, default=8)
    parser.add_argument("--steps", type=int, default=4000, help="local steps per client")
    parser.add_argument("--hidden", type=int, default=256, help="width of the MLP's hidden layers")
    args = parser.parse_args()
    spec = Spec.from_dict({
        "name": "benchmark", "suite": "mnist1d", "clients": args.clients, "strategies": ["fedavg"], "rounds": [1],
        "select": False, "suite_options": {"partition": "tasks", "hidden": args.hidden},
        "training": {"steps": args.steps, "lr": 0.05, "batch_size": 32},
    })
    fed = load_suite(spec.suite, spec.clients, spec.suite_options, spec.seed)
    fed.pretrained  # build data and θ0 (or read the cache) outside both timings

    bare = bare_loop(spec)
    with tempfile.TemporaryDirectory() as out:
        start = time.perf_counter()
        run_dir = run(spec, Path(out), show_progress=False)
        framework = time.perf_counter() - start
        timings = __import__("json").loads((run_dir / "results.json").read_text())["timings"]

    print(f"{args.clients} clients x {args.steps} local steps, mnist1d MLP (hidden {args.hidden}), one-shot FedAvg")
    print(f"bare PyTorch loop (sequential, one process): {bare:8.2f} s")
    print(f"fedmerge on Flower + Ray (start included):   {framework:8.2f} s   "
          f"(clients' round {timings['client_training']:.2f} s)")
    print(f"fedmerge / bare loop: {framework / bare:.2f}")


if __name__ == "__main__":
    main()
