"""One-shot federation through fedmerge (Flower's simulation runtime on Ray) against bare PyTorch loops.

Three workloads, each run three ways on the same clients, settings, seeds and θ0:

- ``mnist1d``: 8 mnist1d clients with distinct tasks (a private head each), an MLP, 4000 local SGD steps each;
- ``custom-suite``: the user-suite example, ``examples/custom-suite`` (a small torchvision ViT fine-tuned on
  image folders read lazily through a DataLoader, its patch embedding frozen), as its ``experiment.toml``
  sets it, with FedAvg only, one round and no λ selection;
- ``lora``: federated LoRA on the ``causal-lm`` suite: a small Llama (written here, random weights) and 2
  generated instruction tasks, LoRA r = 8 on q_proj and v_proj, AdamW, one round, FedAvg of the dense updates
  (fedmerge's default ``server.lora = "dense"``). Here the bare loop is a plain peft loop: ``get_peft_model``
  loaded with θ0, a hand-written AdamW loop over the same minibatches, the adapters' dense updates averaged
  and folded into the base weights by hand, the merged model's held-out loss on every task.

fedmerge runs the clients on Ray, ``engine.client_cpus`` (1) CPUs each: as many train at once as Ray has CPUs
(or GPUs, with ``--device cuda``), each single-threaded. The parallel bare loop trains them in a pool of as
many spawned worker processes, each single-threaded; the sequential one trains them one after another in this
process, single-threaded too (fedmerge's trainer always is). The mnist1d and custom-suite clients train with
fedmerge's trainer (:func:`fedmerge.clients.trainer.train`), the lora ones with the plain peft loop. Both loops
then merge as fedmerge does, shared tensors by FedAvg and each private tensor (a head) from its own client,
and evaluate the merged model on every task. fedmerge's time covers ``run`` (Ray's start, the clients' start,
the server's diagnostics and evaluation of θ0 and the clients' own models included); the parallel loop's
covers its workers' start and exit. Suite data and θ0 are built (and cached) before anything is timed. Each
workload prints the three times, the concurrency each used, the largest differences between the merged models
(the run fails if any tensor differs by more than ``RTOL`` · max|value| + ``ATOL``, or if the merge left θ0
unchanged), and the ratios fedmerge / parallel loop and fedmerge / sequential loop.

Run: ``python benchmarks/simulation.py [--workload mnist1d|custom-suite|lora|all] [--device cpu|cuda]
[--clients 8] [--steps 4000] [--hidden 256] [--lora-steps 1200] [--lora-hidden 256]``. ``--device cuda``
trains each client on a GPU of its own (``engine.client_gpus = 1``) and evaluates and merges there
(``engine.server_device = "cuda"``); the bare loops then train, merge and evaluate on the GPU too. Ray's start
and the clients' start cost about 10 s whatever the sizes; with little local training per client (the
custom-suite example trains 20 to 80 steps per client) they dominate.
"""

import argparse
import json
import math
import multiprocessing
import sys
import tempfile
import time
import warnings
from collections.abc import Callable
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import torch
from safetensors.torch import load_file

from fedmerge.clients.trainer import chunk_seeds, train
from fedmerge.merging import FedAvgRule
from fedmerge.merging.rule import iter_merged_model
from fedmerge.simulations.spec import Spec, load_toml
from fedmerge.tasks import Federation, load_suite
from fedmerge.tasks.hub import quiet
from fedmerge.tasks.loading import train_batches
from fedmerge.threads import single_threaded

EXAMPLE = Path(__file__).resolve().parent.parent / "examples" / "custom-suite"
WORKLOADS = ("mnist1d", "custom-suite", "lora")
RTOL, ATOL = 1e-5, 1e-7
"""Merged models agree when every tensor's max |difference| ≤ RTOL · its max |value| + ATOL."""

Tensors = dict[str, torch.Tensor]
ClientFn = Callable[[Spec, int, str], Tensors]


def engine(device: str) -> dict:
    """The [engine] table for ``device``: clients on a whole GPU each and the server on it, or all on the CPU."""
    return {"client_gpus": 1.0 if device == "cuda" else 0.0, "server_device": device}


def mnist1d_spec(args) -> Spec:
    return Spec.from_dict(
        {
            "name": "benchmark",
            "suite": "mnist1d",
            "clients": args.clients,
            "strategies": ["fedavg"],
            "rounds": [1],
            "select": False,
            "suite_options": {"partition": "tasks", "hidden": args.hidden},
            "training": {"steps": args.steps, "lr": 0.05, "batch_size": 32},
            "engine": engine(args.device),
        }
    )


def custom_suite_spec(args) -> Spec:
    """The example's experiment.toml with FedAvg only, one round, no λ selection; my_tasks imported by path."""
    if str(EXAMPLE) not in sys.path:
        sys.path.insert(0, str(EXAMPLE))  # Flower passes sys.path on to its Ray workers, spawn to the pool's
    data = load_toml(EXAMPLE / "experiment.toml")
    data.update(
        name="benchmark-custom-suite", strategies=["fedavg"], rounds=[1], select=False, engine=engine(args.device)
    )
    return Spec.from_dict(data)


def lora_spec(args, folder: Path) -> Spec:
    """A small Llama and two tasks written under ``folder``; LoRA clients, FedAvg of the dense updates, one round."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    characters = sorted(set("0123456789+=# abcdefghijklmnopqrstuvwxyz"))
    vocab = {"<pad>": 0, "</s>": 1, "<unk>": 2, **{c: i + 3 for i, c in enumerate(characters)}}
    tokenizer = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tokenizer.pre_tokenizer = pre_tokenizers.Split("", "isolated")
    torch.manual_seed(0)
    with quiet():
        PreTrainedTokenizerFast(
            tokenizer_object=tokenizer, eos_token="</s>", pad_token="<pad>", unk_token="<unk>"
        ).save_pretrained(folder / "model")
        LlamaForCausalLM(
            LlamaConfig(
                vocab_size=len(vocab),
                hidden_size=args.lora_hidden,
                intermediate_size=2 * args.lora_hidden,
                num_hidden_layers=4,
                num_attention_heads=4,
                num_key_value_heads=4,
                max_position_embeddings=64,
                eos_token_id=1,
                pad_token_id=0,
            )
        ).save_pretrained(folder / "model")
    generator = torch.Generator().manual_seed(0)
    tasks = []
    for name, make in (("add", lambda a, b: a + b), ("mul", lambda a, b: a * b)):
        rows = []
        for _ in range(200):
            a, b = (int(x) for x in torch.randint(0, 50, (2,), generator=generator))
            rows.append(json.dumps({"prompt": f"{a} {name} {b} =", "response": f"#### {make(a, b)}"}))
        (folder / f"{name}.jsonl").write_text("\n".join(rows) + "\n")
        tasks.append(str(folder / f"{name}.jsonl"))
    return Spec.from_dict(
        {
            "name": "benchmark-lora",
            "suite": "causal-lm",
            "clients": 2,
            "strategies": ["fedavg"],
            "rounds": [1],
            "select": False,
            "engine": engine(args.device),
            "suite_options": {
                "model": str(folder / "model"),
                "tasks": tasks,
                "answer": "none",
                "max_length": 32,
                "lora_r": 8,
                "lora_alpha": 16,
            },
            "training": {"optimizer": "adamw", "lr": 3e-3, "steps": args.lora_steps, "batch_size": 16},
        }
    )


def suite(spec: Spec) -> Federation:
    return load_suite(spec.suite, spec.clients, spec.suite_options, spec.seed)


# -- the clients, as the bare loops train them (each returns the trained tensors, on the CPU) ----------------
def trainer_client(spec: Spec, t: int, device: str) -> Tensors:
    """Client ``t`` from θ0 with fedmerge's trainer, as fedmerge's ClientApp trains it."""
    fed = suite(spec)
    model = fed.model_from(fed.pretrained, device)
    train(model, fed.tasks[t], fed.loss, spec.client_configs()[t], head=fed.tasks[t].head)
    state = model.state_dict()
    return {name: state[name].cpu() for name in fed.trained_names}


def peft_client(spec: Spec, t: int, device: str) -> Tensors:
    """Client ``t`` with peft and a hand-written AdamW loop over the minibatches fedmerge's trainer draws."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    fed, options, config = suite(spec), spec.suite_options, spec.client_configs()[t]
    lora = LoraConfig(r=options["lora_r"], lora_alpha=options["lora_alpha"], target_modules=["q_proj", "v_proj"])
    with quiet(), warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)  # transformers' deprecation notices, once per client
        model = get_peft_model(AutoModelForCausalLM.from_pretrained(options["model"]), lora)
    model.load_state_dict(fed.pretrained)  # θ0: the suite's adapters (A drawn from the run's seed, B = 0)
    model.to(device).train()
    trainable = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(trainable, lr=config.lr, weight_decay=config.weight_decay)
    batches = train_batches(fed.tasks[t].train, config.batch_size, chunk_seeds(config.seed, 0)[0], device=device)
    with single_threaded():
        for _ in range(config.steps):
            inputs, labels = next(batches)
            loss = model(input_ids=inputs, labels=labels).loss
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
    return {name: p.detach().cpu() for name, p in model.named_parameters() if p.requires_grad}


def one_thread() -> None:
    """A pool worker's initializer: torch single-threaded, as a Ray client of ``client_cpus = 1`` is."""
    torch.set_num_threads(1)


def train_clients(client: ClientFn, spec: Spec, device: str, workers: int) -> list[Tensors]:
    """Every client's trained tensors: one after another in this process (``workers`` 1), else in a pool of
    ``workers`` spawned processes."""
    if workers == 1:
        with single_threaded():
            return [client(spec, t, device) for t in range(spec.clients)]
    context = multiprocessing.get_context("spawn")  # no fork of a process holding torch's threads
    with ProcessPoolExecutor(workers, mp_context=context, initializer=one_thread) as pool:
        return list(pool.map(client, [spec] * spec.clients, range(spec.clients), [device] * spec.clients))


# -- merging and evaluation, after the clients ---------------------------------------------------------------
def fedavg(fed: Federation, finetuned: list[Tensors], device: str) -> Tensors:
    """The merged model: shared tensors by FedAvg (fedmerge's merging core), each private tensor from its own
    client, the frozen rest θ0's."""
    if fed.statistics_names:
        raise SystemExit("the bare loops do not re-estimate normalisation statistics; use a suite without BatchNorm.")
    base = {name: fed.pretrained[name].to(device) for name in fed.trained_names}
    models = [{name: tensor.to(device) for name, tensor in m.items()} for m in finetuned]
    merged = dict(iter_merged_model(FedAvgRule(), base, models, names=fed.shared_names))
    merged.update({name: finetuned[owner][name].to(device) for name, owner in fed.private_names.items()})
    return fed.complete(merged)


def dense_fedavg(fed: Federation, finetuned: list[Tensors], scaling: float, device: str) -> Tensors:
    """FedAvg of the LoRA clients' dense updates s·B_t A_t (B starts at 0), folded into each base weight; A kept,
    B back to 0."""
    merged = {name: tensor.to(device) for name, tensor in fed.pretrained.items()}
    for a in [name for name in merged if ".lora_A." in name]:
        b, weight = a.replace(".lora_A.", ".lora_B."), a.split(".lora_A.")[0] + ".base_layer.weight"
        update = sum(m[b].to(device) @ m[a].to(device) for m in finetuned) / len(finetuned)
        merged[weight] = merged[weight] + scaling * update
        merged[b] = torch.zeros_like(merged[b])
    return merged


def evaluate_tasks(fed: Federation, merged: Tensors, device: str) -> None:
    """The merged model on every task's test split, as fedmerge's server scores it."""
    model = fed.model_from(merged, device)
    for task in fed.tasks:
        fed.evaluate(model, task)


def evaluate_losses(fed: Federation, merged: Tensors, device: str) -> None:
    """The merged peft model's held-out loss on every task, by hand."""
    model = fed.model_from(merged, device).eval()
    with torch.no_grad():
        for task in fed.tasks:
            inputs, labels = task.test.tensors
            model(input_ids=inputs.to(device), labels=labels.to(device)).loss.item()


def bare_loop(spec: Spec, device: str, workers: int) -> tuple[float, Tensors]:
    """(seconds, merged model) of the federation with no framework, the clients trained by ``workers`` at once."""
    start = time.perf_counter()
    fed = suite(spec)
    if spec.suite == "causal-lm":
        finetuned = train_clients(peft_client, spec, device, workers)
        merged = dense_fedavg(fed, finetuned, spec.suite_options["lora_alpha"] / spec.suite_options["lora_r"], device)
        evaluate_losses(fed, merged, device)
    else:
        finetuned = train_clients(trainer_client, spec, device, workers)
        merged = fedavg(fed, finetuned, device)
        evaluate_tasks(fed, merged, device)
    if device == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter() - start, merged


def fedmerge_run(spec: Spec) -> tuple[float, float, Tensors]:
    """(seconds, seconds of the clients' round, merged model) of ``run``."""
    from fedmerge.simulations.runner import run  # not at the top: the pool's workers import this file, not Flower

    with tempfile.TemporaryDirectory() as out:
        start = time.perf_counter()
        run_dir = run(spec, Path(out), show_progress=False)
        seconds = time.perf_counter() - start
        timings = json.loads((run_dir / "results.json").read_text())["timings"]
        merged = load_file(run_dir / "models" / "fedavg-r1.safetensors")
    return seconds, timings["client_training"], merged


# -- how many clients train at once ---------------------------------------------------------------------------
def ray_cpus() -> int:
    """The CPUs a fresh local Ray gives its node (what it reads when ``ray.init`` is given no ``num_cpus``)."""
    from ray._private.utils import get_num_cpus

    return int(get_num_cpus())


def concurrent_clients(spec: Spec) -> int:
    """How many clients Ray runs at once: its CPUs over ``client_cpus``, and its GPUs over ``client_gpus``."""
    engine = spec.engine
    slots = math.floor(ray_cpus() / engine["client_cpus"])
    if engine["client_gpus"] > 0:
        slots = min(slots, math.floor(torch.cuda.device_count() / engine["client_gpus"]))
    return max(1, min(spec.clients, slots))


# -- agreement -------------------------------------------------------------------------------------------------
def largest_difference(a: Tensors, b: Tensors, what: str) -> float:
    """max |a − b| over every tensor; SystemExit naming the tensor where the two disagree beyond tolerance."""
    if a.keys() != b.keys():
        raise SystemExit(f"{what}: the merged models hold different tensors: {sorted(a.keys() ^ b.keys())[:5]}")
    largest = 0.0
    for name in a:
        x, y = a[name].detach().cpu().double(), b[name].detach().cpu().double()
        if x.shape != y.shape:
            raise SystemExit(f"{what}: tensor {name!r} has shape {tuple(x.shape)} against {tuple(y.shape)}")
        if x.numel() == 0:
            continue
        difference, bound = float((x - y).abs().max()), RTOL * float(y.abs().max()) + ATOL
        if not difference <= bound:
            raise SystemExit(
                f"{what}: the merged models differ at {name!r}: max |difference| {difference:.3e} > "
                f"{bound:.3e} (rtol {RTOL:g}, atol {ATOL:g}); they did not compute the same federation"
            )
        largest = max(largest, difference)
    return largest


def largest_change(merged: Tensors, base: Tensors) -> float:
    """max |merged − θ0| over every tensor; SystemExit when the merge left θ0 as it was (agreement would be empty)."""
    change = max(float((merged[n].cpu().double() - t.double()).abs().max()) for n, t in base.items() if t.numel())
    if change == 0:
        raise SystemExit("the merged model is θ0 itself: the clients did not train, so agreement would prove nothing")
    return change


def measure(title: str, spec: Spec, device: str) -> None:
    """Run ``spec`` three ways, check that the merged models agree, print the times and ratios."""
    suite(spec).pretrained  # build data and θ0 (or read the cache) outside every timing
    workers = concurrent_clients(spec)
    sequential, sequential_model = bare_loop(spec, device, 1)
    parallel, parallel_model = bare_loop(spec, device, workers)
    framework, clients_round, framework_model = fedmerge_run(spec)
    loops = largest_difference(parallel_model, sequential_model, "parallel loop against sequential loop")
    agreement = largest_difference(framework_model, parallel_model, "fedmerge against the parallel loop")
    change = largest_change(framework_model, suite(spec).pretrained)
    where = "on its GPU" if device == "cuda" else "single-threaded"
    print(title)
    print(
        f"  fedmerge on Flower + Ray (start included): {framework:8.2f} s   (clients' round {clients_round:.2f} s); "
        f"{workers} clients at a time (Ray: {ray_cpus()} CPUs, engine.client_cpus {spec.engine['client_cpus']:g}), "
        f"each {where}"
    )
    pool = (
        f"{workers} spawned worker processes, each {where} (their start and exit included)"
        if workers > 1
        else "one client at a time, as Ray runs them: the sequential loop again"
    )
    print(f"  bare loop, parallel:                       {parallel:8.2f} s   {pool}")
    print(
        f"  bare loop, sequential:                     {sequential:8.2f} s   the clients one after another in this "
        f"process, {where}"
    )
    print(
        f"  merged models agree: max |fedmerge - parallel| = {agreement:.2e}, max |parallel - sequential| = "
        f"{loops:.2e} (per tensor <= {RTOL:g} x max|value| + {ATOL:g}; the merge moved θ0 by up to {change:.2e})"
    )
    print(f"  fedmerge / parallel loop:   {framework / parallel:.2f}")
    print(f"  fedmerge / sequential loop: {framework / sequential:.2f}", flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workload", choices=(*WORKLOADS, "all"), default="all")
    parser.add_argument(
        "--device",
        choices=("cpu", "cuda"),
        default="cpu",
        help="cuda: clients train on the GPU (engine.client_gpus = 1), the server evaluates and merges there",
    )
    parser.add_argument("--clients", type=int, default=8, help="mnist1d clients")
    parser.add_argument("--steps", type=int, default=4000, help="mnist1d local steps per client")
    parser.add_argument("--hidden", type=int, default=256, help="width of the mnist1d MLP's hidden layers")
    parser.add_argument("--lora-steps", type=int, default=1200, help="local AdamW steps per LoRA client")
    parser.add_argument("--lora-hidden", type=int, default=256, help="width of the LoRA workload's Llama")
    args = parser.parse_args()
    if args.device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda: CUDA is not available on this machine; use --device cpu.")
    workloads = WORKLOADS if args.workload == "all" else (args.workload,)

    if "mnist1d" in workloads:
        spec = mnist1d_spec(args)
        fed = suite(spec)
        measure(
            f"mnist1d: {args.clients} clients x {args.steps} local steps, MLP (hidden {args.hidden}), one-shot "
            f"FedAvg of {len(fed.shared_names)} shared tensors, {len(fed.private_names)} private (each head its "
            f"client's), on {args.device}",
            spec,
            args.device,
        )
    if "custom-suite" in workloads:
        spec = custom_suite_spec(args)
        steps = [config.steps for config in spec.client_configs()]
        measure(
            f"custom-suite: {spec.clients} clients x {min(steps)}-{max(steps)} local steps, torchvision ViT on "
            f"image folders (examples/custom-suite), one-shot FedAvg, on {args.device}",
            spec,
            args.device,
        )
    if "lora" in workloads:
        with tempfile.TemporaryDirectory() as folder:
            spec = lora_spec(args, Path(folder))
            measure(
                f"lora: 2 clients x {args.lora_steps} AdamW steps, LoRA r 8 on a 4-layer Llama (width "
                f"{args.lora_hidden}), FedAvg of the dense updates, on {args.device}; the bare loops are plain peft",
                spec,
                args.device,
            )


if __name__ == "__main__":
    main()
