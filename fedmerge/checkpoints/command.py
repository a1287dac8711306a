"""``fedmerge merge``: merge fine-tuned checkpoints of one base offline, streaming, with any fedmerge rule."""

import argparse
import sys
import time
import warnings

from fedmerge.checkpoints.merge import ModelLeftOut, merge_checkpoints
from fedmerge.checkpoints.methods import FEDGMA_DEFAULT_RHO, METHODS

DESCRIPTION = """\
Merge fine-tuned checkpoints θ_1..θ_T of one base θ into a new checkpoint, tensor by tensor, in a few
tensors' worth of memory. Each method computes a mean-scale update Δ from the task vectors τ_t = θ_t − θ
(for fedavg and task-arithmetic Δ = Σ_t p_t τ_t, the mean) and writes θ + β·Δ.

Scale conventions (give at most one; neither means β = 1, the plain mean of the task vectors):
  --scaling λ    Task Arithmetic's λ: θ + λ·Σ_t τ_t. Converted as β = λ·T.
  --server-lr β  the server learning rate of federated learning, on the mean-scale Δ.
So Task Arithmetic with λ = 0.3 over 3 models is --scaling 0.3, or equally --server-lr 0.9.

Inputs: .safetensors files, Hugging Face model directories (sharded safetensors with their index), or
PyTorch .bin/.pt files (loaded with torch.load(weights_only=True); nothing else is ever unpickled).
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
  fedmerge merge --base B --models A1 A2 A3 --method cclip --rho 12.5 --out merged
  fedmerge merge --base B --models A1 A2 A3 --method median --device cuda --out merged
"""


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add ``fedmerge merge`` to the command line."""
    parser = subparsers.add_parser(
        "merge",
        description=DESCRIPTION, epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    io = parser.add_argument_group("inputs and output")
    io.add_argument("--base", required=True, metavar="BASE", help="the pretrained checkpoint θ (file or directory)")
    io.add_argument("--models", required=True, nargs="+", metavar="MODEL", help="the fine-tuned checkpoints θ_t")
    io.add_argument(
        "--out", required=True, metavar="OUT",
        help="output directory (the base's layout, config and tokenizer files copied), or a single file if it "
        "ends in .safetensors",
    )
    io.add_argument("--force", action="store_true", help="replace OUT if it exists")
    io.add_argument(
        "--skip-nonfinite", action="store_true",
        help="leave out the models holding NaN or infinite values (named on standard error) instead of refusing them",
    )
    io.add_argument(
        "--max-shard-size", metavar="SIZE",
        help="re-shard the output, e.g. 5GB (10^9 bytes) or 2GiB; default: the base's sharding",
    )
    io.add_argument("--quiet", action="store_true", help="no progress bars")
    io.add_argument(
        "--device", default="cpu", metavar="{cpu,cuda,auto}",
        help="where the arithmetic runs: cpu (default), cuda or cuda:N (read and written on the CPU, merged on "
        "the GPU), or auto (cuda when available)",
    )

    rule = parser.add_argument_group("method")
    rule.add_argument("--method", choices=METHODS, default="task-arithmetic", help="the merging rule (default: %(default)s)")
    scale = rule.add_mutually_exclusive_group()
    scale.add_argument("--scaling", type=float, metavar="λ", help="Task Arithmetic's λ: θ + λ·Σ_t τ_t (β = λ·T)")
    scale.add_argument("--server-lr", type=float, metavar="β", help="server learning rate β: θ + β·Δ, Δ mean-scale")
    rule.add_argument(
        "--weights", type=float, nargs="+", metavar="W",
        help="per-model weights p_t, normalised to sum 1, e.g. example counts (fedavg, fednova, fedgma, cclip; "
        "default uniform)",
    )
    rule.add_argument("--steps", type=float, nargs="+", metavar="K", help="fednova: each model's local step count a_t")
    rule.add_argument(
        "--lr-sums", type=float, nargs="+", metavar="S",
        help="fednova: each model's sum of learning rates Σ_k η_t^(k) as a_t (instead of --steps)",
    )
    rule.add_argument(
        "--rho", type=float, metavar="ρ",
        help=f"fedgma: sign-agreement threshold, at most 1 (default {FEDGMA_DEFAULT_RHO}; ≤ 0 gives fedavg); cclip: clipping radius "
        "in the L2 norm over the whole task vector (default, or 0: the median of the task-vector norms)",
    )
    rule.add_argument("--iterations", type=int, metavar="L", help="cclip: clipping iterations (default 1)")
    rule.add_argument(
        "--even", choices=("mean", "lower"),
        help="median with an even number of models: average the two middle values (mean, default) or take the lower",
    )
    parser.set_defaults(handler=run)


def run(args: argparse.Namespace) -> int:
    """Run ``fedmerge merge`` from parsed arguments; returns the exit code."""
    start = time.perf_counter()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", ModelLeftOut)
        out = merge_checkpoints(
            args.base, args.models, args.out,
            method=args.method, scaling=args.scaling, server_lr=args.server_lr, weights=args.weights,
            steps=args.steps, lr_sums=args.lr_sums, rho=args.rho, iterations=args.iterations, even=args.even,
            max_shard_size=args.max_shard_size, skip_nonfinite=args.skip_nonfinite, force=args.force,
            progress=not args.quiet, device=args.device,
        )
    left_out = 0
    for warning in caught:
        if issubclass(warning.category, ModelLeftOut):
            print(f"fedmerge: {warning.message}", file=sys.stderr)
            left_out += 1
        else:
            warnings.showwarning(warning.message, warning.category, warning.filename, warning.lineno)
    if not args.quiet:
        total = len(args.models)
        merged = f"{total - left_out} of {total} models" if left_out else f"{total} model{'s' if total > 1 else ''}"
        print(f"fedmerge: merged {merged} into {out} in {time.perf_counter() - start:.1f} s", file=sys.stderr)
    return 0
