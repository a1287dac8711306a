"""Benchmark ``fedmerge merge`` against mergekit on random Llama-style checkpoints.

Writes a base and 3 fine-tunes (about 170M parameters each by default, bfloat16, two safetensors shards
with an index, as Hugging Face saves them), merges them with both tools in subprocesses, checks that the
outputs agree, and prints wall time and peak resident memory of each: Task Arithmetic (mergekit's
task_arithmetic and a plain loop), then each method of --methods, beside mergekit's merge of the same rule where
mergekit has one (TIES, DARE, Model Breadcrumbs with and without TIES, DELLA, Model Stock, SLERP of the first two
fine-tunes, the Karcher mean). The last line is the ratio mergekit time / fedmerge time for Task Arithmetic.

mergekit is not a dependency of fedmerge: it is installed into its own virtual environment,
``benchmarks/.mergekit-venv``, on first use. Both tools compute in float32 and write bfloat16
(mergekit: ``dtype: float32``, ``out_dtype: bfloat16``; its ``weight`` per model is λ, ``normalize: false``),
so they compute the same θ + λ·Σ_t τ_t. ``--device cuda`` runs both tools' arithmetic on the GPU
(fedmerge ``--device cuda``, mergekit ``--cuda``); both still read and write on the CPU. The other methods run on
the CPU. Agreement: exact methods element by element within a bfloat16 rounding step (TIES and Breadcrumbs but for
coordinates where a |τ_t| ties with a magnitude threshold); DARE and DELLA, random in both, by how far each strays
from θ + mean τ (mergekit's DELLA also rescales to each τ_t's L1 norm where fedmerge divides by the keep probability).

    python benchmarks/merge.py [--layers 8] [--hidden 1024] [--scaling 0.3] [--device cpu|cuda|auto] [--keep]
"""

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
import venv
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file

ROOT = Path(__file__).resolve().parent
MERGEKIT_VENV = ROOT / ".mergekit-venv"
MERGEKIT = MERGEKIT_VENV / "bin" / "mergekit-yaml"
NUM_MODELS = 3


def llama_tensors(layers: int, hidden: int, intermediate: int, vocab: int) -> dict[str, tuple[int, ...]]:
    """Names and shapes of a Llama model's weights (untied embeddings), in Hugging Face's naming."""
    shapes = {"model.embed_tokens.weight": (vocab, hidden)}
    for i in range(layers):
        p = f"model.layers.{i}."
        for proj in ("q", "k", "v", "o"):
            shapes[f"{p}self_attn.{proj}_proj.weight"] = (hidden, hidden)
        shapes[f"{p}mlp.gate_proj.weight"] = (intermediate, hidden)
        shapes[f"{p}mlp.up_proj.weight"] = (intermediate, hidden)
        shapes[f"{p}mlp.down_proj.weight"] = (hidden, intermediate)
        shapes[f"{p}input_layernorm.weight"] = (hidden,)
        shapes[f"{p}post_attention_layernorm.weight"] = (hidden,)
    shapes["model.norm.weight"] = (hidden,)
    shapes["lm_head.weight"] = (vocab, hidden)
    return shapes


def llama_config(layers: int, hidden: int, intermediate: int, vocab: int) -> dict:
    return {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "hidden_size": hidden,
        "intermediate_size": intermediate,
        "num_hidden_layers": layers,
        "num_attention_heads": hidden // 64,
        "num_key_value_heads": hidden // 64,
        "vocab_size": vocab,
        "max_position_embeddings": 2048,
        "rms_norm_eps": 1e-5,
        "hidden_act": "silu",
        "tie_word_embeddings": False,
        "torch_dtype": "bfloat16",
        "bos_token_id": 1,
        "eos_token_id": 2,
    }


def write_model(directory: Path, shapes: dict, config: dict, base: dict | None, seed: int) -> dict:
    """Write one checkpoint as two safetensors shards with an index; returns its tensors."""
    generator = torch.Generator().manual_seed(seed)
    tensors = {}
    for name, shape in shapes.items():
        if base is None:
            tensors[name] = (torch.randn(shape, generator=generator) * 0.02).to(torch.bfloat16)
        else:
            noise = torch.randn(shape, generator=generator) * 0.002
            tensors[name] = (base[name].float() + noise).to(torch.bfloat16)
    directory.mkdir(parents=True)
    names = list(shapes)
    halves = [names[: len(names) // 2], names[len(names) // 2 :]]
    weight_map = {}
    for i, half in enumerate(halves, start=1):
        filename = f"model-{i:05d}-of-00002.safetensors"
        save_file({n: tensors[n] for n in half}, directory / filename, metadata={"format": "pt"})
        weight_map.update({n: filename for n in half})
    total = sum(t.numel() * t.element_size() for t in tensors.values())
    index = {"metadata": {"total_size": total}, "weight_map": weight_map}
    (directory / "model.safetensors.index.json").write_text(json.dumps(index, indent=2))
    (directory / "config.json").write_text(json.dumps(config, indent=2))
    return tensors


def ensure_mergekit() -> str | None:
    """Install mergekit into its own venv if needed; returns None when ready, else why not."""
    if MERGEKIT.exists():
        return None
    print(f"installing mergekit into {MERGEKIT_VENV} (once) ...", flush=True)
    try:
        venv.create(MERGEKIT_VENV, with_pip=True, clear=True)
        subprocess.run(
            [str(MERGEKIT_VENV / "bin" / "python"), "-m", "pip", "install", "-q", "mergekit"],
            check=True,
            capture_output=True,
            text=True,
        )
    except (subprocess.CalledProcessError, OSError) as error:
        detail = getattr(error, "stderr", "") or str(error)
        return f"pip install mergekit failed: {detail.strip().splitlines()[-1] if detail.strip() else error}"
    return None if MERGEKIT.exists() else "mergekit installed but mergekit-yaml is missing"


# The yardstick: what anyone would write in 25 lines. Each shard whole in memory, float32 torch ops on every
# core (or the GPU), save_file per shard.
PLAIN_LOOP = """
import json, os, shutil, sys, torch
from pathlib import Path
from safetensors import safe_open
from safetensors.torch import save_file
base, out, scaling, device = Path(sys.argv[1]), Path(sys.argv[2]), float(sys.argv[3]), sys.argv[4]
models = [Path(p) for p in sys.argv[5:]]
torch.set_num_threads(len(os.sched_getaffinity(0)))
out.mkdir()
index = json.loads((base / "model.safetensors.index.json").read_text())
for shard in sorted(set(index["weight_map"].values())):
    files = [safe_open(d / shard, "pt") for d in [base, *models]]
    merged = {}
    for name in files[0].keys():
        theta = files[0].get_tensor(name).to(device, torch.float32)
        total = torch.zeros_like(theta)
        for f in files[1:]:
            total += f.get_tensor(name).to(device, torch.float32) - theta
        merged[name] = (theta + scaling * total).to(torch.bfloat16).cpu()
    save_file(merged, out / shard, metadata={"format": "pt"})
for name in ("model.safetensors.index.json", "config.json"):
    shutil.copy(base / name, out / name)
"""

# Runs the command from a small process and reports its peak RSS: a child forked straight from this
# (large) process would inherit this process's resident size as its ru_maxrss.
LAUNCHER = """
import resource, subprocess, sys
result = subprocess.run(sys.argv[1:], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
maxrss = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
print(maxrss, result.returncode, file=sys.stderr)
sys.stderr.write(result.stderr[-4000:] if result.returncode else "")
"""


def measure(command: list[str], out: Path) -> tuple[float, float]:
    """Run a command that writes ``out``; returns its wall time (s) and peak resident memory (MiB).

    Dirty pages are flushed first (untimed), so no run pays for writing back a previous one's files.
    """
    shutil.rmtree(out, ignore_errors=True)
    os.sync()
    start = time.perf_counter()
    result = subprocess.run([sys.executable, "-c", LAUNCHER, *command], capture_output=True, text=True)
    elapsed = time.perf_counter() - start
    first, _, rest = result.stderr.partition("\n")
    maxrss, returncode = (int(x) for x in first.split())
    if returncode != 0:
        sys.stdout.write(rest)
        raise SystemExit(f"command failed with exit code {returncode}: {' '.join(command)}")
    return elapsed, maxrss / 1024


def read_merged(directory: Path) -> dict[str, torch.Tensor]:
    """Every tensor of the safetensors files in ``directory``, read with the safetensors package."""
    tensors = {}
    for file in sorted(directory.glob("*.safetensors")):
        with safe_open(file, "pt") as f:
            tensors.update({name: f.get_tensor(name).float() for name in f.keys()})
    return tensors


def agreement(ours: dict[str, torch.Tensor], theirs: dict[str, torch.Tensor]) -> tuple[float, float, bool]:
    """Share of equal elements, max |difference|, and whether every element is within one bfloat16
    rounding step (or 1e-6, for sums that cancel to about zero)."""
    if set(ours) != set(theirs):
        raise SystemExit(f"outputs hold different tensors: {sorted(set(ours) ^ set(theirs))[:5]}")
    equal = total = 0
    worst, close = 0.0, True
    eps = torch.finfo(torch.bfloat16).eps
    for name, a in ours.items():
        b = theirs[name]
        difference = (a - b).abs()
        equal += int((difference == 0).sum())
        total += a.numel()
        worst = max(worst, float(difference.max()))
        close &= bool((difference <= eps * torch.maximum(a.abs(), b.abs()) + 1e-6).all())
    return equal / total, worst, close


def mergekit_config(
    work: Path, name: str, method: str, models: list[Path], base: Path | None, per_model: dict, shared: dict
) -> Path:
    """A mergekit config of ``method`` over ``models``, ``base`` its base_model (None: none), with ``per_model``
    parameters for each model and ``shared`` ones; arithmetic in float32, written in bfloat16."""
    config = {
        "merge_method": method,
        **({"base_model": str(base)} if base is not None else {}),
        "models": [{"model": str(m), **({"parameters": per_model} if per_model else {})} for m in models],
        **({"parameters": shared} if shared else {}),
        "dtype": "float32",
        "out_dtype": "bfloat16",
    }
    path = work / f"mergekit-{name}.yml"
    path.write_text(json.dumps(config))  # JSON is YAML
    return path


def deviation(merged: dict[str, torch.Tensor], reference: dict[str, torch.Tensor]) -> tuple[float, float]:
    """Mean and root-mean-square of merged − reference over every element."""
    total = squares = count = 0.0
    for name, value in merged.items():
        difference = (value - reference[name]).double()
        total += float(difference.sum())
        squares += float((difference**2).sum())
        count += difference.numel()
    return total / count, (squares / count) ** 0.5


@dataclass(frozen=True)
class Twin:
    """mergekit's merge of a fedmerge method's rule: its merge_method, how the outputs are compared (``exact``: element
    by element; ``thresholds``: so too, but for coordinates where a model's |τ_t| ties with a magnitude threshold;
    ``estimate``: random in both, by what they estimate), fedmerge's flags, mergekit's per-model and shared parameters,
    how many of the fine-tunes both merge (None: all) and mergekit's base_model (``base``, ``first``: the first
    fine-tune, as SLERP's θ_1, or ``none``)."""

    method: str
    check: str
    flags: tuple = ()
    per_model: dict = field(default_factory=dict)
    shared: dict = field(default_factory=dict)
    models: int | None = None
    base: str = "base"


def twins(args: argparse.Namespace) -> dict[str, Twin]:
    """fedmerge's methods that mergekit implements, each with mergekit's merge of the same rule. Both give θ + Δ with
    fedmerge's default β = 1 (mergekit: λ = 1, and normalize: true where Δ is a mean), but Breadcrumbs, given
    --scaling λ, is θ + λ·Σ_t m_t ⊙ τ_t (mergekit's weight λ, normalize: false)."""
    k, gamma, epsilon, t = args.density, args.gamma, args.epsilon, args.t
    mean = {"normalize": True}
    return {
        "ties": Twin("ties", "thresholds", ("--density", k), {"weight": 1.0, "density": k}, mean),
        "dare-linear": Twin("dare_linear", "estimate", ("--density", k), {"weight": 1.0, "density": k}, mean),
        "dare-ties": Twin("dare_ties", "estimate", ("--density", k), {"weight": 1.0, "density": k}, mean),
        "breadcrumbs": Twin(
            "breadcrumbs",
            "thresholds",
            ("--density", k, "--gamma", gamma, "--scaling", args.scaling),
            {"weight": args.scaling, "density": k, "gamma": gamma},
            {"normalize": False},
        ),
        "breadcrumbs-ties": Twin(
            "breadcrumbs_ties",
            "thresholds",
            ("--density", k, "--gamma", gamma),
            {"weight": 1.0, "density": k, "gamma": gamma},
            mean,
        ),
        "della": Twin(
            "della",
            "estimate",
            ("--density", k, "--epsilon", epsilon),
            {"weight": 1.0, "density": k, "epsilon": epsilon},
            mean,
        ),
        "model-stock": Twin("model_stock", "exact"),
        "slerp": Twin("slerp", "exact", ("--t", t), shared={"t": t}, models=2, base="first"),
        "karcher": Twin("karcher", "exact", base="none"),
    }


def top_counts(method: str, args: argparse.Namespace, n: int) -> list[int]:
    """How many of a tensor's n largest |τ_t| sit above each magnitude threshold of the method: TIES keeps the top
    ⌊k·n⌋; Breadcrumbs the top ⌊γ·n⌋ + ⌊k·n⌋ but the top ⌊γ·n⌋."""
    keep = max(1, int(args.density * n))
    if method == "ties":
        return [keep]
    outliers = min(int(args.gamma * n), n - keep)
    return [count for count in (outliers + keep, outliers) if count]


def compare_methods(work: Path, args: argparse.Namespace, mean: dict[str, torch.Tensor]) -> None:
    """Each method against mergekit's: exact ones element by element, TIES and Breadcrumbs so too but for ties at their
    thresholds, DARE and DELLA, random in both, by what they estimate (θ + mean τ)."""
    for method, twin in twins(args).items():
        if method not in args.methods:
            continue
        ours, other = read_merged(work / method), read_merged(work / f"mergekit-{method}")
        label = f"fedmerge {method} vs mergekit {twin.method}"
        if twin.check == "exact":
            equal, worst, close = agreement(ours, other)
            print(
                f"{label}: {equal:.2%} equal, max |diff| {worst:.1e}, "
                f"{'within' if close else 'NOT within'} one bfloat16 rounding step"
            )
            if not close:
                raise SystemExit(f"fedmerge's {method} and mergekit's {twin.method} disagree")
        elif twin.check == "thresholds":
            differ, unexplained, total = threshold_disagreements(
                work, ours, other, lambda n: top_counts(method, args, n)
            )
            print(
                f"{label} (density {args.density}{f', gamma {args.gamma}' if 'breadcrumbs' in method else ''}): "
                f"{1 - differ / total:.4%} of elements within one bfloat16 rounding step; every other one "
                f"({differ - unexplained} of {total}) at a coordinate where a model's |τ_t| ties with a magnitude "
                "threshold (mergekit's unstable sort keeps arbitrary ones of those, fedmerge the first by position)"
                + (f"; {unexplained} elsewhere" if unexplained else "")
            )
            if unexplained:
                raise SystemExit(f"fedmerge's {method} and mergekit's disagree beyond ties at the thresholds")
        else:
            (bias, rms), (their_bias, their_rms) = deviation(ours, mean), deviation(other, mean)
            print(
                f"{label} (density {args.density}{f', epsilon {args.epsilon}' if method == 'della' else ''}), each "
                f"against θ + mean τ: bias {bias:.1e} vs {their_bias:.1e}, RMS {rms:.2e} vs {their_rms:.2e} (ratio "
                f"{rms / their_rms:.2f})"
            )
            if method == "dare-linear" and not 0.8 < rms / their_rms < 1.25:
                raise SystemExit("fedmerge's DARE and mergekit's differ in how far they stray from the mean")


def threshold_disagreements(work: Path, ours: dict, theirs: dict, counts) -> tuple[int, int, int]:
    """How many elements of two merges differ by more than one bfloat16 rounding step, how many of those lie where no
    model's |τ_t| equals one of its magnitude thresholds (unexplained), and the element count. ``counts(n)``: the
    sizes of the top sets whose smallest magnitude is a threshold, in a tensor of n entries."""
    eps = torch.finfo(torch.bfloat16).eps
    base, models = read_merged(work / "base"), [read_merged(work / f"ft{i}") for i in range(NUM_MODELS)]
    differ = unexplained = total = 0
    for name, a in ours.items():
        b = theirs[name]
        off = (a - b).abs() > eps * torch.maximum(a.abs(), b.abs()) + 1e-6
        total += a.numel()
        if not off.any():
            continue
        tied = torch.zeros_like(off)
        for model in models:
            magnitude = (model[name] - base[name]).abs()
            for count in counts(magnitude.numel()):
                tied |= magnitude == torch.kthvalue(magnitude.view(-1), magnitude.numel() - count + 1).values
        differ += int(off.sum())
        unexplained += int((off & ~tied).sum())
    return differ, unexplained, total


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--layers", type=int, default=8)
    parser.add_argument("--hidden", type=int, default=1024)
    parser.add_argument("--intermediate", type=int, default=2816)
    parser.add_argument("--vocab", type=int, default=32000)
    parser.add_argument("--scaling", type=float, default=0.3, help="Task Arithmetic's λ (mergekit's weight)")
    parser.add_argument("--repeat", type=int, default=3, help="runs of each merge; the best time is kept")
    parser.add_argument(
        "--methods",
        nargs="*",
        default=[
            "median",
            "cclip",
            "ties",
            "dare-linear",
            "dare-ties",
            "breadcrumbs",
            "breadcrumbs-ties",
            "della",
            "model-stock",
            "slerp",
            "karcher",
        ],
        help="other fedmerge methods to time (those mergekit implements beside mergekit's)",
    )
    parser.add_argument("--density", type=float, default=0.2, help="TIES's, DARE's, Breadcrumbs' and DELLA's density k")
    parser.add_argument("--gamma", type=float, default=0.01, help="Breadcrumbs' γ, the share of outliers dropped")
    parser.add_argument("--epsilon", type=float, default=0.15, help="DELLA's ε (mergekit's half-width)")
    parser.add_argument("--t", type=float, default=0.5, help="SLERP's t, between the first two fine-tunes")
    parser.add_argument("--keep", action="store_true", help="keep the checkpoints and outputs")
    args = parser.parse_args()
    gpu = torch.cuda.is_available()

    why_not = ensure_mergekit()
    work = Path(tempfile.mkdtemp(prefix="fedmerge-bench-"))
    try:
        shapes = llama_tensors(args.layers, args.hidden, args.intermediate, args.vocab)
        config = llama_config(args.layers, args.hidden, args.intermediate, args.vocab)
        params = sum(torch.Size(s).numel() for s in shapes.values())
        largest = max(torch.Size(s).numel() for s in shapes.values())
        print(
            f"writing a base and {NUM_MODELS} fine-tunes of {params / 1e6:.0f}M parameters (bfloat16) in {work}; "
            f"{os.cpu_count()} cores, {'a GPU: ' + torch.cuda.get_device_name() if gpu else 'no GPU'}"
        )
        base = write_model(work / "base", shapes, config, None, seed=0)
        models = [work / f"ft{i}" for i in range(NUM_MODELS)]
        expected = {name: t.float() for name, t in base.items()}
        mean = {name: t.float() for name, t in base.items()}  # θ + (1/T)·Σ_t τ_t: what DARE estimates
        for i, path in enumerate(models, start=1):
            tuned = write_model(path, shapes, config, base, seed=i)
            for name in expected:
                expected[name] += args.scaling * (tuned[name].float() - base[name].float())
                mean[name] += (tuned[name].float() - base[name].float()) / NUM_MODELS
            del tuned
        del base
        expected = {name: t.to(torch.bfloat16).float() for name, t in expected.items()}

        devices = ["cpu", "cuda"] if gpu else ["cpu"]
        runs = {}
        for device in devices:
            out = work / f"plain-{device}"
            runs[f"plain loop ({device})"] = (
                [
                    sys.executable,
                    "-c",
                    PLAIN_LOOP,
                    str(work / "base"),
                    str(out),
                    str(args.scaling),
                    device,
                    *map(str, models),
                ],
                out,
            )

        def fedmerge(used: list[Path]) -> list[str]:
            return [
                sys.executable,
                "-m",
                "fedmerge.cli",
                "merge",
                "--base",
                str(work / "base"),
                "--models",
                *map(str, used),
                "--quiet",
            ]

        for device in devices:
            out = work / f"fedmerge-{device}"
            runs[f"fedmerge ({device})"] = (
                [*fedmerge(models), "--device", device, "--scaling", str(args.scaling), "--out", str(out)],
                out,
            )
        if why_not is None:
            for device in devices:
                out = work / f"mergekit-{device}"
                config_file = mergekit_config(
                    work,
                    "task_arithmetic",
                    "task_arithmetic",
                    models,
                    work / "base",
                    {"weight": args.scaling},
                    {"normalize": False},
                )
                runs[f"mergekit ({device})"] = (
                    [str(MERGEKIT), str(config_file), str(out), "--quiet", *(["--cuda"] if device == "cuda" else [])],
                    out,
                )
        for method, twin in [(m, twins(args).get(m)) for m in args.methods]:
            used = models[: twin.models] if twin else models
            flags = [str(flag) for flag in twin.flags] if twin else []
            out = work / method
            runs[f"fedmerge {method} (cpu)"] = ([*fedmerge(used), "--method", method, *flags, "--out", str(out)], out)
            if twin and why_not is None:
                out = work / f"mergekit-{method}"
                base_model = {"base": work / "base", "first": used[0], "none": None}[twin.base]
                config_file = mergekit_config(work, method, twin.method, used, base_model, twin.per_model, twin.shared)
                runs[f"mergekit {twin.method} (cpu)"] = ([str(MERGEKIT), str(config_file), str(out), "--quiet"], out)
        rows = {label: (float("inf"), 0.0) for label in runs}
        for _ in range(args.repeat):  # rounds over all merges, so a busy moment hits them alike
            for label, (command, out) in runs.items():
                elapsed, rss = measure(command, out)
                rows[label] = (min(rows[label][0], elapsed), max(rows[label][1], rss))

        print(
            f"\n{'task arithmetic, λ = ' + str(args.scaling) + ' (best of ' + str(args.repeat) + ')':<36}"
            f"{'time (s)':>10}{'peak RSS (MiB)':>16}"
        )
        for label, (elapsed, rss) in rows.items():
            print(f"{label:<36}{elapsed:>10.2f}{rss:>16.0f}")
        print(
            f"({params / 1e6:.0f}M parameters, {params * 2 / 2**20:.0f} MiB per checkpoint; largest tensor "
            f"{largest * 2 / 2**20:.0f} MiB in bfloat16, {largest * 4 / 2**20:.0f} MiB in float32; "
            f"peak RSS includes about 750 MiB of the torch import)"
        )

        print()
        for device in devices:
            ours = read_merged(work / f"fedmerge-{device}")
            equal, worst, close = agreement(ours, expected)
            print(
                f"fedmerge ({device}) vs θ + λ·Σ_t τ_t computed here in float32, rounded: {equal:.2%} equal, "
                f"max |diff| {worst:.1e}"
            )
            if not close:
                raise SystemExit(f"fedmerge's output on {device} is not θ + λ·Σ_t τ_t")
            if why_not is None:
                equal, worst, close = agreement(ours, read_merged(work / f"mergekit-{device}"))
                print(
                    f"fedmerge vs mergekit ({device}): {equal:.2%} equal, max |diff| {worst:.1e}, "
                    f"{'within' if close else 'NOT within'} one bfloat16 rounding step"
                )
                if not close:
                    raise SystemExit("fedmerge and mergekit disagree")
        if why_not is None:
            compare_methods(work, args, mean)
        print()
        for device in devices:
            ours = rows[f"fedmerge ({device})"][0]
            print(f"fedmerge/plain time ratio ({device}): {ours / rows[f'plain loop ({device})'][0]:.2f}")
        if why_not is not None:
            print(f"mergekit is unavailable here ({why_not}); mergekit/fedmerge time ratio: n/a")
            return
        for device in devices:
            ours = rows[f"fedmerge ({device})"][0]
            print(f"mergekit/fedmerge time ratio ({device}): {rows[f'mergekit ({device})'][0] / ours:.2f}")
    finally:
        if args.keep:
            print(f"kept {work}")
        else:
            shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
