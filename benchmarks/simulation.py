"""One-shot federation through fedmerge (Flower's simulation runtime on Ray) against a bare PyTorch loop.

Three workloads, each timed both ways on the same clients, settings and θ0:

- ``mnist1d``: 8 mnist1d clients with distinct tasks (a head each), an MLP, 4000 local SGD steps each;
- ``custom-suite``: the user-suite example, ``examples/custom-suite`` (a small torchvision ViT fine-tuned on
  image folders read lazily through a DataLoader, its patch embedding frozen), as its ``experiment.toml``
  sets it, with FedAvg only, one round and no λ selection;
- ``lora``: federated LoRA on the ``causal-lm`` suite: a small Llama (written here, random weights) and 2
  generated instruction tasks, LoRA r = 8 on q_proj and v_proj, AdamW, one round, FedAvg of the adapters.
  Here the bare loop is a plain peft loop: ``get_peft_model``, a hand-written AdamW loop over the same
  examples, the adapters averaged by hand, the merged model's held-out loss on every task.

The bare loop trains the clients one after another in this process with fedmerge's trainer, merges them by
FedAvg and evaluates the merged model on every task. fedmerge does the same through ``run`` (Ray's start,
the clients' start, the server's diagnostics and evaluation of θ0 and the clients' own models included).
Suite data and θ0 are built (and cached) before either is timed. Each workload prints both times and the
ratio fedmerge / bare loop.

Run: ``python benchmarks/simulation.py [--workload mnist1d|custom-suite|lora|all] [--device cpu|cuda]
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
WORKLOADS = ("mnist1d", "custom-suite", "lora")


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


def lora_spec(args, folder: Path) -> Spec:
    """A small Llama and two tasks written under ``folder``; LoRA clients, FedAvg of the factors, one round."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    characters = sorted(set("0123456789+=# abcdefghijklmnopqrstuvwxyz"))
    vocab = {"<pad>": 0, "</s>": 1, "<unk>": 2, **{c: i + 3 for i, c in enumerate(characters)}}
    tokenizer = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tokenizer.pre_tokenizer = pre_tokenizers.Split("", "isolated")
    PreTrainedTokenizerFast(tokenizer_object=tokenizer, eos_token="</s>", pad_token="<pad>", unk_token="<unk>"
                            ).save_pretrained(folder / "model")
    torch.manual_seed(0)
    LlamaForCausalLM(LlamaConfig(vocab_size=len(vocab), hidden_size=args.lora_hidden, intermediate_size=2 * args.lora_hidden,
                                 num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=4,
                                 max_position_embeddings=64, eos_token_id=1, pad_token_id=0)).save_pretrained(folder / "model")
    generator = torch.Generator().manual_seed(0)
    tasks = []
    for name, make in (("add", lambda a, b: a + b), ("mul", lambda a, b: a * b)):
        rows = []
        for _ in range(200):
            a, b = (int(x) for x in torch.randint(0, 50, (2,), generator=generator))
            rows.append(json.dumps({"prompt": f"{a} {name} {b} =", "response": f"#### {make(a, b)}"}))
        (folder / f"{name}.jsonl").write_text("\n".join(rows) + "\n")
        tasks.append(str(folder / f"{name}.jsonl"))
    return Spec.from_dict({
        "name": "benchmark-lora", "suite": "causal-lm", "clients": 2, "strategies": ["fedavg"], "rounds": [1],
        "select": False, "engine": engine(args.device),
        "suite_options": {"model": str(folder / "model"), "tasks": tasks, "answer": "none", "max_length": 32,
                          "lora_r": 8, "lora_alpha": 16},
        "training": {"optimizer": "adamw", "lr": 3e-3, "steps": args.lora_steps, "batch_size": 16},
    })


def plain_peft_loop(spec: Spec, device: str) -> float:
    """The same clients with peft and a hand-written loop: train each adapter, average the factors, evaluate."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    start = time.perf_counter()
    fed = load_suite(spec.suite, spec.clients, spec.suite_options, spec.seed)  # the same examples
    options, config = spec.suite_options, spec.client_configs()[0]
    lora = LoraConfig(r=options["lora_r"], lora_alpha=options["lora_alpha"], target_modules=["q_proj", "v_proj"])
    adapters = []
    for t, task in enumerate(fed.tasks):
        torch.manual_seed(spec.seed)
        model = get_peft_model(AutoModelForCausalLM.from_pretrained(options["model"]), lora).to(device)
        optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=config.lr)
        inputs, labels = task.train.tensors
        order = torch.Generator().manual_seed(t)
        for _ in range(config.steps):
            batch = torch.randint(0, len(inputs), (config.batch_size,), generator=order)
            loss = model(input_ids=inputs[batch].to(device), labels=labels[batch].to(device)).loss
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
        adapters.append({n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad})
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            if parameter.requires_grad:
                parameter.copy_(sum(adapter[name] for adapter in adapters) / len(adapters))
        model.eval()
        for task in fed.tasks:
            inputs, labels = task.test.tensors
            model(input_ids=inputs.to(device), labels=labels.to(device)).loss.item()
    return time.perf_counter() - start


def measure(spec: Spec, device: str) -> tuple[float, float, dict]:
    """(bare loop seconds, fedmerge seconds, fedmerge's own timings)."""
    fed = load_suite(spec.suite, spec.clients, spec.suite_options, spec.seed)
    fed.pretrained  # build data and θ0 (or read the cache) outside both timings
    bare = (plain_peft_loop if spec.suite == "causal-lm" else bare_loop)(spec, device)
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
    parser.add_argument("--workload", choices=(*WORKLOADS, "all"), default="all")
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cpu",
                        help="cuda: clients train on the GPU (engine.client_gpus = 1), the server evaluates and merges there")
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
        report(f"mnist1d: {args.clients} clients x {args.steps} local steps, MLP (hidden {args.hidden}), "
               f"one-shot FedAvg, on {args.device}", *measure(spec, args.device))
    if "custom-suite" in workloads:
        spec = custom_suite_spec(args)
        steps = [config.steps for config in spec.client_configs()]
        report(f"custom-suite: {spec.clients} clients x {min(steps)}-{max(steps)} local steps, torchvision ViT on "
               f"image folders (examples/custom-suite), one-shot FedAvg, on {args.device}", *measure(spec, args.device))
    if "lora" in workloads:
        with tempfile.TemporaryDirectory() as folder:
            spec = lora_spec(args, Path(folder))
            report(f"lora: 2 clients x {args.lora_steps} AdamW steps, LoRA r 8 on a 4-layer Llama (width "
                   f"{args.lora_hidden}), FedAvg of the adapters, on {args.device}; the bare loop is plain peft",
                   *measure(spec, args.device))


if __name__ == "__main__":
    main()
