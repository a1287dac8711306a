"""``fedmerge evaluate``: merge fine-tuned checkpoints that already exist with every rule and evaluate them."""

import argparse
import sys
from pathlib import Path

from fedmerge.merging.rules.fednova import DEFAULT_NORMALIZE_BY
from fedmerge.merging.scale import CONVENTIONS, PAPER_GRID

DESCRIPTION = f"""\
Merge fine-tuned checkpoints that already exist with every strategy and evaluate the merges on a suite's
tasks: the one-shot protocol of `fedmerge run`, with your checkpoints in place of the simulated clients.

EXPERIMENT is a preset or a TOML file, as `fedmerge run` takes it. Its suite (and suite options) defines the
tasks, one per model, in order (MODEL 1 was fine-tuned on task 1, ...), so `clients` must equal the number
of models. BASE is θ0, each MODEL a θ_t fine-tuned from it: .safetensors files, Hugging Face model
directories (sharded or not), or PEFT LoRA adapter directories of BASE (θ_t = θ0 + s·B·A). From each, exactly the tensors the suite's model trains are taken, by name
(anything else, e.g. a CLIPModel's text tower, is ignored; the clip suite's frozen zero-shot heads stay the
suite's); a missing tensor, or one of another shape or dtype, is an error naming the file and the tensor.

A checkpoint holding NaN or infinite values is refused, naming its file and tensor, before anything is
evaluated (as `fedmerge merge` refuses it): its accuracy would be its task's reference.

Then, as in a simulation: each fine-tune's own val/test accuracy; task-vector norms, cosines and ζ²; and for
every strategy the merge of the same T task vectors, with the method's own λ chosen on the validation splits
from {PAPER_GRID[0]:.2f}, {PAPER_GRID[1]:.2f}, ..., {PAPER_GRID[-1]:.2f} (the same values as β too where that grid misses β = 1),
and the parameter the method tunes (fedgma's and cclip's ρ, the density of ties and dare) unless the
experiment sets it, by the mean over all tasks of the normalized accuracy (a task's accuracy divided by its
own fine-tune's), then tested at the choice.

Scales: β (the server learning rate) is the mean-scale one, θ0 + β·Δ (Δ = Σ_t p_t τ_t for FedAvg,
τ_t = θ_t − θ0). Each method's own λ is in one of two conventions, as its record says (`fedmerge merge
--help` lists them): {CONVENTIONS["sum"]} (β = λ·T), or {CONVENTIONS["mean"]}
(β = λ). The results give λ, β and the convention.

FedNova's a_t: by strategy.fednova.normalize_by when the experiment sets it, else by the one of --steps
and --lr-sums given, else by its default ({DEFAULT_NORMALIZE_BY}); given neither, they are read from each model
directory's trainer_state.json (Hugging Face Trainer). When they cannot be had, fednova is refused before
any work; the a_t used and their source are printed and recorded (results.json: checkpoints.fednova).

Everything runs in this process on engine.server_device (auto: a GPU when there is one; --set
engine.server_device=cpu to force the CPU). Ray and Flower's simulation runtime are not used: the
checkpoints become Flower training replies that the strategies merge directly. Results are written like a
run's (results.json, summary.csv, tasks.csv, models/), for `fedmerge report`.
"""

EPILOG = """\
examples:
  fedmerge evaluate clip-vit-b32-8task --set suite_options.root=/data/clip --base clip-vit-b32 \\
      --models ft/cars ft/dtd ft/eurosat ft/gtsrb ft/mnist ft/resisc45 ft/sun397 ft/svhn
                      (Hugging Face model directories, e.g. written by `hf download NAME --local-dir DIR`)
  fedmerge evaluate my-study.toml --base base.safetensors --models a.safetensors b.safetensors --strategy fedavg median
  fedmerge evaluate my-study.toml --base B --models M1 M2 M3 --strategy fednova --lr-sums 0.5 1.0 2.0
  fedmerge evaluate my-study.toml --base B --models M1 M2 --set select=false --set server.server_lr=0.6   (β fixed: λ = 0.3 for fedavg)
"""


def register(subparsers) -> None:
    parser = subparsers.add_parser(
        "evaluate",
        description=DESCRIPTION,
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument(
        "experiment",
        metavar="PRESET|FILE.toml",
        help="a preset name (see `fedmerge list`) or a TOML file; its suite defines the tasks",
    )
    parser.add_argument(
        "--base", required=True, metavar="BASE", help="the pretrained checkpoint θ0 (file or model directory)"
    )
    parser.add_argument(
        "--models",
        required=True,
        nargs="+",
        metavar="MODEL",
        help="the fine-tuned checkpoints θ_t, one per task of the suite, in the suite's task order",
    )
    parser.add_argument(
        "--strategy",
        nargs="+",
        metavar="NAME",
        help="strategies to merge with, any of `fedmerge list` (every merging method is one); "
        "default: the experiment's",
    )
    parser.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override a spec key, e.g. suite_options.root=/data, engine.server_device=cpu, "
        "strategy.fednova.normalize_by=steps (repeatable)",
    )
    parser.add_argument("--seed", type=int, help="the seed of the suite's splits (and every other random choice)")
    parser.add_argument(
        "--steps",
        type=int,
        nargs="+",
        metavar="K",
        help="each model's local step count (its reply's num-steps; FedNova's a_t when it is the only one "
        "of --steps and --lr-sums given, or strategy.fednova.normalize_by=steps); default: each model "
        "directory's trainer_state.json global_step when every model has one",
    )
    parser.add_argument(
        "--lr-sums",
        type=float,
        nargs="+",
        metavar="S",
        help="each model's sum of learning rates Σ_k η_t^(k) (its reply's lr-sum; FedNova's a_t when it is "
        "the only one given, or strategy.fednova.normalize_by=lr-sum); default: the learning rates logged "
        "in each trainer_state.json, summed, when every model has them",
    )
    parser.add_argument(
        "--out",
        type=Path,
        default=Path("results"),
        metavar="DIR",
        help="parent directory of the results directory (default: results)",
    )
    parser.add_argument("--no-progress", action="store_true", help="no live progress bar")
    parser.add_argument("--dry-run", action="store_true", help="validate and print the resolved spec, read nothing")
    parser.set_defaults(handler=evaluate_command, rounds=None)


def evaluate_command(args) -> int:
    from fedmerge.simulations.command import run_and_show
    from fedmerge.simulations.evaluate import evaluate_checkpoints
    from fedmerge.simulations.progress import ProgressDisplay

    def evaluate(spec):
        title = f"{spec.name}: {len(args.models)} checkpoints on {spec.suite}"
        with ProgressDisplay(len(spec.strategies), title, not args.no_progress) as display:
            return evaluate_checkpoints(
                spec,
                args.base,
                args.models,
                args.out,
                steps=args.steps,
                lr_sums=args.lr_sums,
                progress=display.advance,
                note=lambda line: print(f"fedmerge: {line}", file=sys.stderr),
            )

    return run_and_show(args, evaluate)
