"""``fedmerge merge``: merge fine-tuned checkpoints of one base offline, streaming, with any fedmerge rule."""

import argparse
import sys
import time
import warnings

from fedmerge.checkpoints.adapters import BaseMismatch
from fedmerge.checkpoints.merge import ModelLeftOut, merge_checkpoints
from fedmerge.checkpoints.methods import MERGE_METHODS, flags, params_from_flags
from fedmerge.checkpoints.trainer_state import SOURCES
from fedmerge.merging import Method, Param
from fedmerge.merging.rules.fednova import DEFAULT_NORMALIZE_BY, NORMALIZE_BY
from fedmerge.merging.scale import CONVENTIONS
from fedmerge.options import boolean


def _convention(name: str) -> str | None:
    """The scale of method ``name``'s --scaling λ (:data:`fedmerge.merging.scale.CONVENTIONS`); None: refused."""
    return None if MERGE_METHODS[name].no_lambda else MERGE_METHODS[name].scale


def _scale_lines() -> str:
    """--scaling's conventions and their methods, for ``--help``."""
    by = {key: ", ".join(name for name in MERGE_METHODS if _convention(name) == key) for key in ("sum", "mean", None)}
    indent = " " * 19
    return (
        f"{indent}{CONVENTIONS['sum']} (β = λ·T):\n{indent}  {by['sum']}\n"
        f"{indent}{CONVENTIONS['mean']} (β = λ; mergekit's λ too):\n{indent}  {by['mean']}\n"
        f"{indent}ambiguous, refused (give --server-lr): {by[None]}\n"
    )


DESCRIPTION = f"""\
Merge fine-tuned checkpoints θ_1..θ_T of one base θ into a new checkpoint, tensor by tensor, in a few
tensors' worth of memory. Each method computes a mean-scale update Δ from the task vectors τ_t = θ_t − θ
(for fedavg and task-arithmetic Δ = Σ_t p_t τ_t, the mean) and writes θ + β·Δ.

Scale (give at most one; neither means β = 1, θ + Δ):
  --scaling λ    the method's own λ, as its paper means it:
{_scale_lines()}  --server-lr β  the server learning rate of federated learning, on the mean-scale Δ: θ + β·Δ.
The β applied, and why, is printed on standard error and recorded in the output's metadata. Task
Arithmetic with λ = 0.3 over 3 models is --scaling 0.3, or --server-lr 0.9; TIES with λ = 1 (its paper's
and mergekit's default) is --method ties --scaling 1, or the default β = 1.

Inputs: .safetensors files, Hugging Face model directories (sharded safetensors with their index), or
PyTorch .bin/.pt files (loaded with torch.load(weights_only=True); nothing else is ever unpickled).
A model may also be a PEFT LoRA adapter directory of the base (adapter_config.json with
adapter_model.safetensors): it is merged as θ_t = θ + ΔW, ΔW = (lora_alpha/r)·B·A per adapted layer
(alpha/√r with use_rslora), computed a chunk at a time; adapters and full checkpoints mix freely, and
the output is always a full checkpoint. An adapter of another base, or one that is more than B·A (DoRA,
trained biases, modules_to_save), is refused, naming the adapter and the tensor; one that fits the base but
names another in its base_model_name_or_path is merged with a warning.
FedNova's a_t: --steps or --lr-sums; given neither, each model's trainer_state.json (written by
Hugging Face's Trainer beside it) gives them, by the normaliser --trainer-state names, else by FedNova's
default, {DEFAULT_NORMALIZE_BY} ({SOURCES[DEFAULT_NORMALIZE_BY]}). Which a_t were used, and from
where, is printed on standard error and recorded in the output's metadata.
Fisher merging and RegMean merge by statistics of each model's training data that a checkpoint does not
hold: --statistics gives one file per model (its diagonal Fisher, or its linear layers' input Gram matrices).
A model holding NaN or infinite values is refused, naming its file and tensor, and nothing is written;
--skip-nonfinite leaves such models out instead. A model of weight 0 (--weights) is left out unread.

Device: the arithmetic runs on the CPU by default. --device cuda reads tensors on the CPU, merges them on
the GPU and writes them from the CPU; the result equals the CPU's within float rounding (--device auto:
cuda when torch.cuda.is_available()).
"""

EPILOG = """\
examples:
  fedmerge merge --base llama-2-7b --models math code chat --scaling 0.3 --out merged
  fedmerge merge --base base.safetensors --models a.safetensors b.safetensors --method median --out m.safetensors
  fedmerge merge --base B --models A1 A2 A3 --method fednova --lr-sums 0.5 1.0 2.0 --out merged
  fedmerge merge --base llama --models lora-math lora-code --scaling 0.5 --out merged
  fedmerge merge --base B --models run1/checkpoint-500 run2/checkpoint-900 --method fednova --trainer-state steps --out merged
  fedmerge merge --base B --models A1 A2 A3 --method cclip --rho 12.5 --out merged
  fedmerge merge --base B --models A1 A2 A3 --method median --device cuda --out merged
  fedmerge merge --base B --models A1 A2 A3 --method ties --density 0.2 --scaling 1 --out merged
  fedmerge merge --base B --models A1 A2 A3 --method dare-ties --density 0.3 --seed 1 --out merged
  fedmerge merge --base B --models A1 A2 A3 --method tsv-m --scaling 1 --out merged
  fedmerge merge --base B --models A1 A2 --method fisher --statistics F1.safetensors F2.safetensors --out merged
"""


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add ``fedmerge merge`` to the command line."""
    parser = subparsers.add_parser(
        "merge",
        description=DESCRIPTION,
        epilog=_methods() + EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    io = parser.add_argument_group("inputs and output")
    io.add_argument("--base", required=True, metavar="BASE", help="the pretrained checkpoint θ (file or directory)")
    io.add_argument("--models", required=True, nargs="+", metavar="MODEL", help="the fine-tuned checkpoints θ_t")
    io.add_argument(
        "--out",
        required=True,
        metavar="OUT",
        help="output directory (the base's layout, config and tokenizer files copied), or a single file if it "
        "ends in .safetensors",
    )
    io.add_argument("--force", action="store_true", help="replace OUT if it exists")
    io.add_argument(
        "--skip-nonfinite",
        action="store_true",
        help="leave out the models holding NaN or infinite values (named on standard error) instead of refusing them",
    )
    io.add_argument(
        "--max-shard-size",
        metavar="SIZE",
        help="re-shard the output, e.g. 5GB (10^9 bytes) or 2GiB; default: the base's sharding",
    )
    io.add_argument("--quiet", action="store_true", help="no progress bars")
    io.add_argument(
        "--device",
        default="cpu",
        metavar="{cpu,cuda,auto}",
        help="where the arithmetic runs: cpu (default), cuda or cuda:N (read and written on the CPU, merged on "
        "the GPU), or auto (cuda when available)",
    )

    rule = parser.add_argument_group("method")
    rule.add_argument(
        "--method",
        choices=MERGE_METHODS,
        default="task-arithmetic",
        metavar="METHOD",
        help="the merging rule, one of the methods listed below (default: %(default)s)",
    )
    scale = rule.add_mutually_exclusive_group()
    scale.add_argument(
        "--scaling",
        type=float,
        metavar="λ",
        help="the method's own λ (above, and in the list of methods): θ + λ·Σ_t τ_t (β = λ·T) or θ + λ·Δ "
        f"(β = λ); refused where it is ambiguous ({', '.join(n for n, m in MERGE_METHODS.items() if m.no_lambda)})",
    )
    scale.add_argument("--server-lr", type=float, metavar="β", help="server learning rate β: θ + β·Δ, Δ mean-scale")
    rule.add_argument(
        "--weights",
        type=float,
        nargs="+",
        metavar="W",
        help="per-model weights p_t, normalised to sum 1, e.g. example counts (every method but task-arithmetic and "
        "median; default uniform)",
    )
    for flag, users in flags().items():
        rule.add_argument(flag, dest=_dest(flag), help=_flag_help(users), **_kind(users[0][1]))
    rule.add_argument(
        "--trainer-state",
        choices=NORMALIZE_BY,
        metavar="{" + ",".join(NORMALIZE_BY) + "}",
        help="fednova: read each a_t from the model directory's trainer_state.json (Hugging Face Trainer): its "
        "global_step (steps) or the sum of its logged learning rates, interpolated between logging steps (lr-sum); "
        f"given neither this nor --steps or --lr-sums, fednova reads {DEFAULT_NORMALIZE_BY}, its default normaliser",
    )
    rule.add_argument(
        "--statistics",
        nargs="+",
        metavar="FILE",
        help="fisher and regmean: one safetensors file per model, in the order of --models, holding that model's "
        "diagonal Fisher (fisher) or its linear layers' input Gram matrices (regmean), by the model's tensor names, as "
        "fedmerge.clients.merging_statistics makes them on its training data",
    )
    parser.set_defaults(handler=run)


def _methods() -> str:
    """The methods, one line each with what its --scaling λ multiplies, for the end of ``--help``."""
    width = max(map(len, MERGE_METHODS)) + 2
    labels = {"sum": "λ·Σ_t τ_t", "mean": "λ·Δ", None: "--server-lr only"}
    tags = {name: f"[{labels[_convention(name)]}]" for name in MERGE_METHODS}
    room = max(map(len, tags.values())) + 1
    return (
        "methods, [what --scaling λ multiplies]:\n"
        + "".join(f"  {name:<{width}}{tags[name]:<{room}}{m.summary}\n" for name, m in MERGE_METHODS.items())
        + "\n"
    )


def _dest(flag: str) -> str:
    return "param_" + flag.lstrip("-").replace("-", "_")


def _metavar(param: Param) -> str:
    return {"threshold": "ρ", "radius": "ρ", "iterations": "L", "density": "K", "steps": "A", "lr_sums": "A"}.get(
        param.name, param.name.upper()
    )


def _kind(param: Param) -> dict:
    """How argparse reads the flag: one value per model, a switch (a parameter checked as a boolean), or one
    value of its default's type (a flag shared by methods has one type)."""
    if param.per_model:
        return {"type": float, "nargs": "+", "metavar": _metavar(param)}
    if param.option.check is boolean:
        return {"action": "store_const", "const": True}
    default = param.option.default
    kind = (
        int
        if isinstance(default, int) and not isinstance(default, bool)
        else float
        if isinstance(default, float)
        else str
    )
    return {"type": kind, "metavar": _metavar(param)}


def _flag_help(users: list[tuple[Method, Param]]) -> str:
    """Each method's meaning of the flag, with its default (methods sharing the parameter named together)."""
    shared: dict[int, tuple[list[str], Param]] = {}
    for method, param in users:
        shared.setdefault(id(param), ([], param))[0].append(method.name)
    return "; ".join(
        f"{', '.join(names)}: {param.option.help}"
        + ("" if param.option.default is None else f" (default {param.option.default})")
        for names, param in shared.values()
    ).replace("%", "%%")


def run(args: argparse.Namespace) -> int:
    """Run ``fedmerge merge`` from parsed arguments; returns the exit code."""
    start = time.perf_counter()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", ModelLeftOut)
        warnings.simplefilter("always", BaseMismatch)
        out = merge_checkpoints(
            args.base,
            args.models,
            args.out,
            method=args.method,
            scaling=args.scaling,
            server_lr=args.server_lr,
            weights=args.weights,
            **params_from_flags(args.method, {flag: getattr(args, _dest(flag)) for flag in flags()}),
            max_shard_size=args.max_shard_size,
            skip_nonfinite=args.skip_nonfinite,
            force=args.force,
            progress=not args.quiet,
            device=args.device,
            trainer_state=args.trainer_state,
            statistics=args.statistics,
            note=lambda line: print(f"fedmerge: {line}", file=sys.stderr),
        )
    left_out = 0
    for warning in caught:
        if issubclass(warning.category, ModelLeftOut):
            print(f"fedmerge: {warning.message}", file=sys.stderr)
            left_out += 1
        elif issubclass(warning.category, BaseMismatch):
            print(f"fedmerge: warning: {warning.message}", file=sys.stderr)
        else:
            warnings.showwarning(warning.message, warning.category, warning.filename, warning.lineno)
    if not args.quiet:
        total = len(args.models)
        merged = f"{total - left_out} of {total} models" if left_out else f"{total} model{'s' if total > 1 else ''}"
        print(f"fedmerge: merged {merged} into {out} in {time.perf_counter() - start:.1f} s", file=sys.stderr)
    return 0
