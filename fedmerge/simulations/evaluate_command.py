"""``fedmerge evaluate``: merge fine-tuned checkpoints that already exist with every rule and evaluate them."""

import argparse
from pathlib import Path

DESCRIPTION = """\
Merge fine-tuned checkpoints that already exist with every strategy and evaluate the merges on a suite's
tasks: the one-shot protocol of `fedmerge run`, with your checkpoints in place of the simulated clients.

EXPERIMENT is a preset or a TOML file, as `fedmerge run` takes it. Its suite (and suite options) defines the
tasks, one per model, in order (MODEL 1 was fine-tuned on task 1, ...), so `clients` must equal the number
of models. BASE is θ0, each MODEL a θ_t fine-tuned from it: .safetensors files, Hugging Face model
directories (sharded or not), or PEFT LoRA adapter directories of BASE (θ_t = θ0 + s·B·A). From each, exactly the tensors the suite's model trains are taken, by name
(anything else, e.g. a CLIPModel's text tower, is ignored; the clip suite's frozen zero-shot heads stay the
suite's); a missing tensor, or one of another shape or dtype, is an error naming the file and the tensor.

Then, as in a simulation: each fine-tune's own val/test accuracy; task-vector norms, cosines and ζ²; and for
every strategy the merge of the same T task vectors, with Task Arithmetic's λ chosen from 0.05, 0.10, ...,
2.00 (and ρ for fedgma and cclip) on the validation splits by the mean over all tasks of the normalized
accuracy (a task's accuracy divided by its own fine-tune's), then tested at the choice.

Scales: λ is Task Arithmetic's scaling (θ0 + λ·Σ_t τ_t, τ_t = θ_t − θ0); β (server learning rate) the
mean-scale one (θ0 + β·Δ, Δ = Σ_t p_t τ_t for FedAvg); β = λ·T. The table and results give both.

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
  fedmerge evaluate my-study.toml --base B --models M1 M2 --set select=false --set server.server_lr=0.6   (β fixed, λ = 0.3)
"""


def register(subparsers) -> None:
    parser = subparsers.add_parser(
        "evaluate", description=DESCRIPTION, epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("experiment", metavar="PRESET|FILE.toml",
                        help="a preset name (see `fedmerge list`) or a TOML file; its suite defines the tasks")
    parser.add_argument("--base", required=True, metavar="BASE", help="the pretrained checkpoint θ0 (file or model directory)")
    parser.add_argument("--models", required=True, nargs="+", metavar="MODEL",
                        help="the fine-tuned checkpoints θ_t, one per task of the suite, in the suite's task order")
    parser.add_argument("--strategy", nargs="+", metavar="NAME", help="strategies to merge with (fedavg fednova fedgma median cclip); default: the experiment's")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="override a spec key, e.g. suite_options.root=/data, engine.server_device=cpu, "
                             "strategy.fednova.normalize_by=steps (repeatable)")
    parser.add_argument("--seed", type=int, help="the seed of the suite's splits (and every other random choice)")
    parser.add_argument("--steps", type=int, nargs="+", metavar="K",
                        help="each model's local step count (the num-steps of its reply; FedNova with normalize_by=steps); default: "
                        "each model directory's trainer_state.json global_step when every model has one, else 1 each")
    parser.add_argument("--lr-sums", type=float, nargs="+", metavar="S",
                        help="each model's sum of learning rates Σ_k η_t^(k) (FedNova's default a_t); default: the learning rates "
                        "logged in each trainer_state.json, summed, when every model has them, else 1 each")
    parser.add_argument("--out", type=Path, default=Path("results"), metavar="DIR",
                        help="parent directory of the results directory (default: results)")
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
            return evaluate_checkpoints(spec, args.base, args.models, args.out, steps=args.steps, lr_sums=args.lr_sums,
                                        progress=display.advance)

    return run_and_show(args, evaluate)
