"""``fedmerge run`` and ``fedmerge list``."""

import argparse
import json
from pathlib import Path

from fedmerge.errors import FedmergeError

RUN_HELP = """\
Simulate a federation: T clients each fine-tune the suite's pretrained model θ0 on their own task with
their own training settings, then every strategy merges them. rounds = 1 is one-shot merging (Task
Arithmetic: λ, and ρ for FedGMA/CCLIP, chosen on validation splits from the paper's grid); rounds = R > 1 is
federated learning, with each client's local steps split over the R rounds (same compute).

Scales: λ is Task Arithmetic's scaling (θ0 + λ·Σ τ_t); β (server.server_lr) is the server learning rate of the
mean-scale update (θ ← θ + β·Δ, Δ = Σ p_t τ_t for FedAvg); β = λ·T.

examples:
  fedmerge run                                        the default preset (under a minute on 2 CPU cores)
  fedmerge run training-heterogeneity --rounds 1 10
  fedmerge run my-study.toml --set training.lr=[0.01,0.02,0.05,0.1] --set clients=4
  fedmerge run quadratic --strategy fedavg fednova --set 'training.steps={geometric=[10,160]}'
"""


def register(subparsers) -> None:
    run = subparsers.add_parser(
        "run",
        description=RUN_HELP,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    run.add_argument(
        "experiment",
        nargs="?",
        metavar="PRESET|FILE.toml",
        help="a preset name (see `fedmerge list`) or a TOML file; default: the `default` preset",
    )
    run.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override a spec key, e.g. training.lr=0.1, clients=8, 'training.steps=[50,100,200,400]', "
        "'training.lr={geometric=[0.01,0.1]}', strategy.fedgma.threshold=0.3 (repeatable)",
    )
    run.add_argument(
        "--strategy",
        nargs="+",
        metavar="NAME",
        help="strategies to run, any of `fedmerge list` (every merging method is one), e.g. fedavg "
        "ties krum; default: the experiment's",
    )
    run.add_argument("--rounds", nargs="+", type=int, metavar="R", help="round counts to compare, e.g. 1 10")
    run.add_argument("--seed", type=int, help="the run's seed (every random choice flows from it)")
    run.add_argument(
        "--out",
        type=Path,
        default=Path("results"),
        metavar="DIR",
        help="parent directory of the run's results directory (default: results)",
    )
    run.add_argument("--no-progress", action="store_true", help="no live progress bar")
    run.add_argument(
        "--dry-run",
        action="store_true",
        help="check everything a run checks before it starts (the spec, "
        "resources, the suite's data against its model) and print the resolved spec; run nothing",
    )
    run.set_defaults(handler=run_command)

    listing = subparsers.add_parser("list", description="List the strategies, task suites and presets.")
    listing.set_defaults(handler=list_command)


def spec_from_args(args):
    """The spec of a ``fedmerge run`` command line: file or preset, then flags, then ``--set``s."""
    from fedmerge.simulations.presets import load_experiment
    from fedmerge.simulations.spec import Spec

    nested = load_experiment(args.experiment)
    flat = {}
    for item in args.overrides:
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            raise FedmergeError(f"--set {item!r}: write KEY=VALUE, e.g. --set training.lr=0.1")
        flat[key.strip()] = value.strip()
    if args.strategy:
        flat["strategies"] = args.strategy
    if args.rounds:
        flat["rounds"] = args.rounds
    if args.seed is not None:
        flat["seed"] = args.seed
    return Spec.from_flat(flat, nested)


def run_command(args) -> int:
    return run_and_show(args, lambda spec: _run(spec, args), _check)


def _run(spec, args):
    from fedmerge.simulations.runner import run  # the simulation stack: loaded once the spec is valid

    return run(spec, out=args.out, show_progress=not args.no_progress)


def _check(spec) -> None:
    """What a run checks before Ray starts: resources, the suite's data against its model, the local steps."""
    from fedmerge.simulations.runner import check_resources, check_runnable

    check_resources(spec)
    check_runnable(spec)


def run_and_show(args, make_results, check=None) -> int:
    """The spec of ``args``, checked and printed (``--dry-run``: ``check(spec)``, what a real run checks before it
    starts) or handed to ``make_results(spec) -> run_dir``, whose results are then shown: the table, what the scores
    mean, clients left out, where the files are."""
    spec = spec_from_args(args)
    console = output_console()
    if args.dry_run:
        if check is not None:
            check(spec)
        console.print_json(json.dumps(spec.to_dict()))
        return 0
    run_dir = make_results(spec)
    results = json.loads((run_dir / "results.json").read_text())
    console.print(summary_table(results))
    console.print(SCORE_NOTES[results["suite"]["metric"] == "accuracy"], highlight=False)
    for line in notes(results):
        console.print(line, highlight=False)
    for line in left_out(results):
        console.print(f"[yellow]left out:[/] {line}", highlight=False)
    files = ", ".join(p.name for p in sorted(run_dir.iterdir()) if p.suffix in (".json", ".csv"))
    console.print(f"results: {run_dir}  ({files}; `fedmerge report {run_dir}`)")
    return 0


UNWRAPPED = 1_000_000
"""The width of a command's output off a terminal: wider than anything printed, so nothing wraps."""


def output_console():
    """The rich Console of a command's standard output. On a terminal it wraps at the terminal's width; off one (a
    pipe, a file, a batch job's log), where rich would wrap at 80 columns (or ``$COLUMNS``), it wraps nothing, so that
    cell ids, paths and table rows stay whole for grep and copying. Colour follows rich's rules (``FORCE_COLOR``)."""
    from rich.console import Console

    console = Console()
    if not console.file.isatty():
        console.width = UNWRAPPED
    return console


SCORE_NOTES = (
    "mean loss: each task's test loss, averaged over tasks; distance to optimum: ‖θ − θ*‖ to the minimiser of the "
    "average loss. ✗ marks a model worse than θ0, the pretrained model before any merging.",
    "normalized accuracy: a model's test accuracy on task t divided by client t's own fine-tuned accuracy on t, "
    "averaged over tasks (1 = every client's own model on its own task). ✗ marks a model worse than θ0, the "
    "pretrained model before any merging.",
)
"""The line under the results table, for suites scored by loss and by accuracy."""


TUNED_SYMBOLS = {"threshold": "ρ", "radius": "ρ", "density": "k"}
"""How the table names each method's tuned parameter."""


def summary_table(results: dict):
    """The closing table: θ0 and the clients' own models as baselines, then one row per strategy and round count."""
    from rich.table import Table

    by_accuracy = results["suite"]["metric"] == "accuracy"
    keys = ("mean_accuracy", "mean_normalized_accuracy") if by_accuracy else ("mean_loss", "distance_to_optimum")
    table = Table(
        title=f"{results['spec']['name']}: {len(results['clients'])} clients on {results['suite']['name']} (test)"
    )
    for column in (
        "model",
        "rounds",
        "λ (its own)",
        "β (server lr)",
        "tuned",
        *(("mean accuracy", "normalized accuracy") if by_accuracy else ("mean loss", "distance to optimum")),
    ):
        table.add_column(column, justify="left" if column == "model" else "right")

    def scores(summary: dict) -> list[str]:
        if summary.get("diverged"):
            return ["diverged", "non-finite outputs"]
        return ["" if summary.get(k) is None else f"{summary[k]:.4f}" for k in keys]

    pretrained = results["pretrained"]
    baseline = pretrained.get(keys[1 if by_accuracy else 0])
    own = [client["own"]["test"].get("accuracy" if by_accuracy else "loss") for client in results["clients"]]
    own = [value for value in own if value is not None]
    own_summary = {keys[0]: sum(own) / len(own) if own else None, **({keys[1]: 1.0} if by_accuracy else {})}
    table.add_row("θ0 (no merging)", "", "", "", "", *scores(pretrained), style="dim")
    table.add_row("clients' own", "", "", "", "", *scores(own_summary), style="dim", end_section=True)
    for run in results["runs"]:
        selected, final = run["selected"], run["final"]
        value = final.get(keys[1 if by_accuracy else 0])
        worse = final.get("diverged") or (
            baseline is not None and value is not None and (value < baseline if by_accuracy else value > baseline)
        )
        lam = selected.get("scaling")
        table.add_row(
            run["strategy"] + (" ✗" if worse else ""),
            str(run["rounds"]),
            "" if lam is None else f"{lam:.3g} ({'Σ' if selected.get('scale') == 'sum' else 'Δ'})",
            f"{selected['server_lr']:.3g}",
            _tuned(run),
            *scores(final),
            style="red" if worse else None,
        )
    return table


def _tuned(run: dict) -> str:
    """The tuned parameter's value, starred when the validation search chose it."""
    selected = run["selected"]
    name = selected.get("tuned")
    if name is None or selected.get(name) is None:
        return ""
    return f"{TUNED_SYMBOLS.get(name, name)}={selected[name]:.3g}" + ("*" if name in run.get("searched", {}) else "")


def notes(results: dict) -> list[str]:
    """What the table's numbers rest on: λ's conventions, what was merged, statistics, LoRA, suspicious baselines."""
    lines = []
    one_shot = [run for run in results["runs"] if run["rounds"] == 1]
    if one_shot:
        without = sorted({run["strategy"] for run in one_shot if run["selected"].get("scaling") is None})
        lines.append(
            "λ is each method's own: (Σ) θ0 + λ·Σ_t τ_t, Task Arithmetic's convention, β = λ·T; (Δ) θ0 + λ·Δ, "
            "TIES's convention, β = λ"
            + (f"; none for {', '.join(without)}, scaled by β alone" if without else "")
            + ". One-shot λ (β) and the starred tuned values were chosen on validation."
        )
    tensors = results.get("tensors")
    if tensors and (tensors["private"] or tensors["statistics"]):
        lines.append(
            f"the rules merged the {tensors['shared']} shared tensors; the {tensors['private']} private tensors "
            "(each client's own head) stay as their client trained them"
            + (
                f"; {tensors['statistics']} BatchNorm statistics: {STATISTICS_NOTES[results['statistics']]}"
                if tensors["statistics"]
                else ""
            )
            + "."
        )
    edges = [
        f"{run['strategy']} (β = {run['selected']['server_lr']:g}, the {edge} tried)"
        for run in results["runs"]
        for grid in [run.get("searched", {}).get("server_lr")]
        if grid and len(grid) > 1
        for edge in [
            "smallest"
            if run["selected"]["server_lr"] == min(grid)
            else "largest"
            if run["selected"]["server_lr"] == max(grid)
            else None
        ]
        if edge
    ]
    if edges:
        lines.append(
            "chosen at the edge of the searched grid: " + ", ".join(edges) + "; the best may lie beyond it "
            "(select = false with server.server_lr = β tries any β)."
        )
    if results.get("lora"):
        lines.append(f"LoRA adapters aggregated as {results['lora']!r} (server.lora).")
    for client in results["clients"]:
        if client.get("own_above_theta0") is False:
            lines.append(
                f"client {client['id']}'s own model is no better than θ0 on its task {client['task']!r}: "
                "normalized accuracy there divides by a model that did not learn it (too little training, "
                "or models given in another order than the tasks?)."
            )
    return lines


STATISTICS_NOTES = {
    "reestimate": "re-estimated by the clients on their training data for every merged model scored",
    "average": "the clients' own, averaged",
    "theta0": "θ0's, kept",
}


def left_out(results: dict) -> list[str]:
    """One line per client some merge left out: who, why, and in how many of the merges."""
    merges: dict[tuple, list[str]] = {}
    for run in results["runs"]:
        for entry in run["history"]:
            for exclusion in entry.get("aggregation", {}).get("excluded", []):
                who = exclusion.get("client_id")
                key = (f"client {who}" if who is not None else f"node {exclusion['node_id']}", exclusion["reason"])
                merges.setdefault(key, []).append(f"{run['strategy']}-r{run['rounds']}")
    return [
        f"{who}: {reason} ({len(runs)} merges, in {', '.join(sorted(set(runs)))})"
        for (who, reason), runs in merges.items()
    ]


def list_command(args) -> int:
    from rich.table import Table

    from fedmerge.simulations.presets import shipped_names, shipped_path
    from fedmerge.simulations.spec import load_toml
    from fedmerge.merging import METHODS
    from fedmerge.tasks import find_suite, installed

    console = output_console()
    strategies = Table(title="strategies (fedmerge.strategies, --strategy; options under \\[strategy.NAME])")
    for column in ("name", "rule", "options (default)"):
        strategies.add_column(column)
    for name, method in METHODS.items():
        options = ", ".join(f"{p.name}={p.option.default!r}" for p in method.scoped("strategy").values())
        strategies.add_row(name, method.summary, options)
    suites = Table(title="task suites (suite = NAME or 'module:function'; options under \\[suite_options])")
    for column in ("name", "from", "description", "options (default)"):
        suites.add_column(column)
    for name, path in installed().items():
        origin = "built-in" if path.startswith("fedmerge.") else f"plugin {path}"
        try:
            suite = find_suite(name)
        except FedmergeError as error:
            suites.add_row(name, origin, f"[red]cannot be loaded:[/] {error}", "")
            continue
        options = (
            "its own" if suite.options is None else ", ".join(f"{k}={v.default!r}" for k, v in suite.options.items())
        )
        suites.add_row(name, origin, suite.description, options)
    presets = Table(title="presets (fedmerge run PRESET)")
    presets.add_column("name")
    presets.add_column("description")
    for name in shipped_names():
        presets.add_row(name, load_toml(shipped_path(name)).get("description", ""))
    for table in (strategies, suites, presets):
        console.print(table)
    return 0
