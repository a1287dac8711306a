"""`fedmerge evaluate`: fine-tuned checkpoints that already exist, merged with every rule and evaluated on a suite's
tasks (the one-shot protocol of a simulation, without Ray). A small suite written here: 3 tasks, a tiny MLP with
frozen heads; its fine-tunes trained with fedmerge's own trainer and saved with safetensors."""

import json
import sys
import textwrap

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file

from fedmerge.merging import METHODS
from fedmerge.merging.rules.fedgma import THRESHOLDS
from fedmerge.merging.scale import PAPER_GRID
from fedmerge.cli import main
from fedmerge.clients.trainer import TrainConfig, train
from fedmerge.simulations.presets import load_experiment
from fedmerge.simulations.spec import TOP
from fedmerge.tasks import load_suite

SUITE = '''
"""Three 3-class tasks on 8 features; a shared body with one frozen random head per task."""
import torch
from torch.utils.data import TensorDataset
from fedmerge.tasks import Federation, Task


class Net(torch.nn.Module):
    def __init__(self, tasks, width):
        super().__init__()
        self.body = torch.nn.Sequential(torch.nn.Linear(8, width), torch.nn.Tanh())
        self.heads = torch.nn.ParameterList([torch.nn.Parameter(torch.randn(3, width), requires_grad=False)
                                             for _ in range(tasks)])

    def forward(self, x, head):
        return self.body(x) @ self.heads[head].T


def build(num_clients, options, seed):
    g = torch.Generator().manual_seed(100 + seed)
    tasks = []
    for t in range(num_clients):
        w = torch.randn(8, 3, generator=g)
        x = torch.randn(160, 8, generator=g)
        y = (x @ w).argmax(1)
        data = [TensorDataset(x[a:b], y[a:b]) for a, b in ((0, 96), (96, 128), (128, 160))]
        tasks.append(Task(f"task{t}", *data, head=t))
    width = options.get("width", 16)
    return Federation(tasks=tasks, model_fn=lambda: Net(num_clients, width), eval_batch_size=64)
'''

TRAINED = ("body.0.weight", "body.0.bias")


@pytest.fixture(scope="module")
def assets(tmp_path_factory):
    """(experiment file, base, [fine-tunes], folder): θ0 and 3 fine-tunes, each trained 40 steps on its task."""
    folder = tmp_path_factory.mktemp("evaluate")
    (folder / "evaltiny.py").write_text(textwrap.dedent(SUITE))
    experiment = folder / "experiment.toml"
    experiment.write_text(
        'name = "tiny"\nsuite = "evaltiny:build"\nclients = 3\nseed = 0\n'
        'strategies = ["fedavg", "fednova", "fedgma", "median", "cclip"]\n'
    )
    load_experiment(str(experiment))  # puts the folder on sys.path
    load_suite.cache_clear()
    fed = load_suite("evaltiny:build", 3, {}, 0)
    assert fed.trained_names == list(TRAINED)  # the frozen heads never travel
    save_file(fed.pretrained, folder / "base.safetensors")
    models = []
    for t, task in enumerate(fed.tasks):
        model = fed.model_from(fed.pretrained)
        train(model, task, fed.loss, TrainConfig(optimizer="sgd", lr=0.5, steps=40, batch_size=16, seed=t))
        models.append(folder / f"model{t}.safetensors")
        save_file({k: v.detach().contiguous() for k, v in model.state_dict().items()}, models[-1])
    yield str(experiment), folder / "base.safetensors", models, folder
    load_suite.cache_clear()
    sys.modules.pop("evaltiny", None)


def evaluate(assets, out, *more, models=None, base=None):
    experiment, default_base, default_models, _ = assets
    return main(
        [
            "evaluate",
            experiment,
            "--base",
            str(base or default_base),
            "--models",
            *map(str, models or default_models),
            "--out",
            str(out),
            "--no-progress",
            "--set",
            "engine.server_device=cpu",
            *more,
        ]
    )


LR_SUMS = ("20", "20", "20")  # each fine-tune's 40 steps at the constant learning rate 0.5


@pytest.fixture(scope="module")
def run_dir(assets, tmp_path_factory):
    out = tmp_path_factory.mktemp("results")
    assert evaluate(assets, out, "--lr-sums", *LR_SUMS) == 0
    (run_dir,) = out.iterdir()
    return run_dir


DEFAULT_STRATEGIES = TOP["strategies"].default


def test_every_strategy_is_merged_and_written(run_dir):
    results = json.loads((run_dir / "results.json").read_text())
    assert [(r["strategy"], r["rounds"]) for r in results["runs"]] == [(name, 1) for name in DEFAULT_STRATEGIES]
    assert results["spec"]["rounds"] == [1] and results["suite"]["tasks"] == ["task0", "task1", "task2"]
    assert [c["reply"]["num-examples"] for c in results["clients"]] == [96, 96, 96]
    assert results["checkpoints"]["models"][2].endswith("model2.safetensors")
    assert {p.name for p in (run_dir / "models").iterdir()} == {f"{name}-r1.safetensors" for name in DEFAULT_STRATEGIES}
    for run in results["runs"]:
        λ, β = run["selected"]["scaling"], run["selected"]["server_lr"]
        method = METHODS[run["strategy"]]
        if method.no_lambda:  # median, cclip: β alone
            assert λ is None
        else:
            assert β == pytest.approx(3 * λ if method.scale == "sum" else λ)  # each method's own λ
        assert run["history"][0]["aggregation"]["server_lr"] == β  # the record says the β applied
        assert len(run["final"]["tasks"]) == 3 and 0 < run["final"]["mean_normalized_accuracy"]
    assert len(results["diagnostics"]["task_vector_norms"]) == 3
    assert (run_dir / "summary.csv").read_text().count("\n") == 1 + len(DEFAULT_STRATEGIES)


def test_the_choice_is_the_argmax_of_the_recorded_mean(run_dir):
    results = json.loads((run_dir / "results.json").read_text())
    for run in results["runs"]:
        best = max(run["selection"], key=lambda entry: entry["val_score"])  # the first of the best
        chosen = {k: v for k, v in run["selected"].items() if k not in ("scale", "tuned")}
        assert chosen == best, run["strategy"]
    fedgma = next(r for r in results["runs"] if r["strategy"] == "fedgma")
    assert len(fedgma["selection"]) == len(PAPER_GRID) * len(THRESHOLDS)
    assert fedgma["searched"]["scaling"] == list(PAPER_GRID) and fedgma["searched"]["threshold"] == list(THRESHOLDS)
    assert fedgma["searched"]["server_lr"] == pytest.approx([3 * s for s in PAPER_GRID])


def test_lambda_maximises_the_mean_validation_normalized_accuracy_over_all_tasks(assets, run_dir):
    """Recomputed here from the checkpoints: for every λ of the grid, θ0 + λ·Σ τ_t, each task's val accuracy over its
    own fine-tune's, averaged over all the tasks (never a running sum inside a loop over tasks, the paper code's bug)."""
    _, base, models, _ = assets
    fed = load_suite("evaltiny:build", 3, {}, 0)
    theta0, finetuned = load_file(base), [load_file(m) for m in models]
    own = [
        fed.evaluate(fed.complete({n: f[n] for n in TRAINED}), task, "val")["accuracy"]
        for f, task in zip(finetuned, fed.tasks)
    ]
    means = []
    for scaling in PAPER_GRID:
        merged = {n: theta0[n] + scaling * sum(f[n] - theta0[n] for f in finetuned) for n in TRAINED}
        per_task = [
            fed.evaluate(fed.complete(merged), task, "val")["accuracy"] / own[t] for t, task in enumerate(fed.tasks)
        ]
        means.append(float(np.mean(per_task)))
    results = json.loads((run_dir / "results.json").read_text())
    fedavg = next(r for r in results["runs"] if r["strategy"] == "fedavg")
    np.testing.assert_allclose([e["val_score"] for e in fedavg["selection"]], means, atol=1e-6)
    chosen = PAPER_GRID.index(fedavg["selected"]["scaling"])
    assert means[chosen] == pytest.approx(max(means)) and len(set(np.round(means, 6))) > 1


def test_own_accuracies_are_the_fine_tunes(assets, run_dir):
    _, base, models, _ = assets
    fed = load_suite("evaltiny:build", 3, {}, 0)
    results = json.loads((run_dir / "results.json").read_text())
    for t, (client, path) in enumerate(zip(results["clients"], models)):
        state = fed.complete({n: load_file(path)[n] for n in TRAINED})
        for split in ("val", "test"):
            assert client["own"][split]["accuracy"] == pytest.approx(
                fed.evaluate(state, fed.tasks[t], split)["accuracy"]
            )
        assert client["settings"]["checkpoint"] == str(path)
    pretrained = fed.evaluate(fed.complete(load_file(base)), fed.tasks[0], "test")["accuracy"]
    assert results["pretrained"]["tasks"][0]["accuracy"] == pytest.approx(pretrained)


def test_fedmerge_report_reads_the_results(run_dir, capsys):
    assert main(["report", str(run_dir)]) == 0
    assert (run_dir / "report").is_dir() and any((run_dir / "report").iterdir())


def test_the_table_is_printed(assets, tmp_path, capsys):
    assert (
        evaluate(
            assets, tmp_path, "--strategy", "fedavg", "fednova", "--lr-sums", "1", "2", "4", "--set", "select=false"
        )
        == 0
    )
    printed = capsys.readouterr().out
    assert "tiny: 3 clients on evaltiny:build (test)" in printed and "fednova" in printed and "results:" in printed
    results = json.loads(next(tmp_path.iterdir()).joinpath("results.json").read_text())
    assert [c["reply"]["lr-sum"] for c in results["clients"]] == [1.0, 2.0, 4.0]
    assert all(r["selected"]["server_lr"] == 1.0 and len(r["selection"]) == 1 for r in results["runs"])  # β fixed


def broken(folder, name, change):
    state = load_file(folder / "model1.safetensors")
    change(state)
    save_file(state, folder / name)
    return folder / name


@pytest.mark.parametrize("case", ["missing", "shape", "dtype", "count", "steps"])
def test_bad_inputs_are_named_and_nothing_is_written(assets, tmp_path, capsys, case):
    folder, models = assets[3], list(assets[2])
    more, expected = ["--lr-sums", *LR_SUMS], []
    if case == "missing":
        models[1] = broken(folder, "lacks.safetensors", lambda s: s.pop("body.0.bias"))
        expected = ["lacks.safetensors", "'body.0.bias'", "missing"]
    elif case == "shape":
        models[2] = broken(folder, "wide.safetensors", lambda s: s.update({"body.0.weight": torch.zeros(32, 8)}))
        expected = ["wide.safetensors", "'body.0.weight'", "shape (32, 8)", "(16, 8)"]
    elif case == "dtype":
        models[0] = broken(folder, "half.safetensors", lambda s: s.update({"body.0.bias": s["body.0.bias"].half()}))
        expected = ["half.safetensors", "'body.0.bias'", "torch.float16"]
    elif case == "count":
        models = models[:2]
        expected = ["2 models given", "3 clients"]
    else:
        more = ["--steps", "10", "20"]
        expected = ["--steps gives 2 values for 3 models"]
    out = tmp_path / "out"
    assert evaluate(assets, out, *more, models=models) == 2
    error = capsys.readouterr().err
    assert all(text in error for text in expected), error
    assert "Traceback" not in error and not out.exists()


# --- FedNova's a_t: given, read from trainer_state.json, or refused; never 1 ------------------------------------------


def fednova_run(out) -> tuple[dict, dict]:
    """The results and FedNova's merged trained tensors of the one run under ``out``."""
    (run,) = out.iterdir()
    merged = load_file(run / "models" / "fednova-r1.safetensors")
    return json.loads((run / "results.json").read_text()), {n: merged[n] for n in TRAINED}


def fednova_merge(assets, a: list[float]) -> dict:
    """θ0 + ā · mean_t(τ_t / a_t) (β = 1, uniform p_t), from the checkpoints."""
    _, base, models, _ = assets
    theta0, finetuned = load_file(base), [load_file(m) for m in models]
    return {
        n: theta0[n] + np.mean(a) * sum((f[n] - theta0[n]) / a_t for f, a_t in zip(finetuned, a)) / len(a)
        for n in TRAINED
    }


def test_steps_alone_make_fednova_normalise_by_steps_and_say_so(assets, tmp_path, capsys):
    out = tmp_path / "out"
    assert evaluate(assets, out, "--strategy", "fednova", "--steps", "10", "20", "40", "--set", "select=false") == 0
    assert "fedmerge: fednova: a_t by steps (only --steps given) from --steps: 10, 20, 40\n" in capsys.readouterr().err
    results, merged = fednova_run(out)
    assert results["spec"]["strategy"]["fednova"]["normalize_by"] == "steps"
    assert results["checkpoints"]["fednova"] == {
        "normalize_by": "steps",
        "normalize_by_reason": "only --steps given",
        "effective_steps_from": "--steps",
    }
    assert results["runs"][0]["history"][0]["aggregation"]["rule"]["effective_steps"] == [10.0, 20.0, 40.0]
    assert [c["reply"].get("num-steps") for c in results["clients"]] == [10, 20, 40]
    assert all("lr-sum" not in c["reply"] and c["settings"]["lr_sum"] is None for c in results["clients"])
    for name, value in fednova_merge(assets, [10.0, 20.0, 40.0]).items():
        torch.testing.assert_close(merged[name], value, rtol=1e-5, atol=1e-6)


def test_fednova_reads_trainer_state_by_the_one_default(assets, tmp_path, capsys):
    """Model directories with the trainer_state.json Hugging Face's Trainer writes: no flag needed, and FedNova uses
    its one default normaliser, as the strategies and `fedmerge merge` do."""
    from fedmerge.merging.rules.fednova import DEFAULT_NORMALIZE_BY

    folder, files = assets[3], assets[2]
    steps, rate = [10, 20, 40], 0.05
    models = []
    for t, (file, k) in enumerate(zip(files, steps)):
        models.append(folder / f"trainer-{t}")
        models[-1].mkdir(exist_ok=True)
        save_file(load_file(file), models[-1] / "model.safetensors")
        history = [{"step": s, "learning_rate": rate} for s in range(1, k + 1, 5)]
        (models[-1] / "trainer_state.json").write_text(json.dumps({"global_step": k, "log_history": history}))
    a = {"steps": [10.0, 20.0, 40.0], "lr-sum": [rate * k for k in steps]}[DEFAULT_NORMALIZE_BY]
    out = tmp_path / "out"
    assert evaluate(assets, out, "--strategy", "fednova", "--set", "select=false", models=models) == 0
    assert (
        f"fedmerge: fednova: a_t by {DEFAULT_NORMALIZE_BY} (FedNova's default) from trainer_state.json"
        in capsys.readouterr().err
    )
    results, merged = fednova_run(out)
    assert results["checkpoints"]["fednova"]["normalize_by"] == DEFAULT_NORMALIZE_BY
    assert results["runs"][0]["history"][0]["aggregation"]["rule"]["effective_steps"] == pytest.approx(a)
    assert [c["reply"]["num-steps"] for c in results["clients"]] == steps  # both read; FedNova uses its default's
    assert [c["reply"]["lr-sum"] for c in results["clients"]] == pytest.approx([rate * k for k in steps])
    for name, value in fednova_merge(assets, a).items():
        torch.testing.assert_close(merged[name], value, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize(
    "more, expected",
    [
        (
            [],
            [
                "FedNova needs each model's effective steps a_t: give --steps (local step counts) or --lr-sums",
                "or leave fednova out (--strategy)",
                "model0.safetensors has none (3 of 3 models lack one)",
            ],
        ),
        (
            ["--set", "strategy.fednova.normalize_by=lr-sum", "--steps", "10", "20", "40"],
            ["FedNova's a_t by lr-sum (strategy.fednova.normalize_by) needs --lr-sums, but --steps was given instead"],
        ),
    ],
)
def test_fednova_without_its_a_t_is_refused_before_any_work(assets, tmp_path, capsys, monkeypatch, more, expected):
    import fedmerge.simulations.evaluate as evaluate_module

    monkeypatch.setattr(evaluate_module, "load_suite", lambda *args: pytest.fail("the suite was loaded"))
    out = tmp_path / "out"
    assert evaluate(assets, out, "--strategy", "fedavg", "fednova", *more) == 2
    error = capsys.readouterr().err
    assert all(text in error for text in expected), error
    assert "Traceback" not in error and not out.exists()


def test_step_counts_are_whole_numbers(assets, tmp_path):
    """A reply's num-steps is an integer: a fractional step count is refused, not truncated under FedNova."""
    from fedmerge.errors import FedmergeError
    from fedmerge.simulations.evaluate import evaluate_checkpoints
    from fedmerge.simulations.spec import Spec

    experiment, base, models, _ = assets
    with pytest.raises(FedmergeError, match="--steps values must be positive whole numbers, got 20.5"):
        evaluate_checkpoints(Spec.from_dict(load_experiment(experiment)), base, models, tmp_path, steps=[10, 20.5, 40])


def test_without_fednova_unknown_steps_are_left_out_not_made_up(assets, tmp_path):
    out = tmp_path / "out"
    assert evaluate(assets, out, "--strategy", "fedavg", "--set", "select=false") == 0
    results = json.loads(next(out.iterdir()).joinpath("results.json").read_text())
    assert "fednova" not in results["checkpoints"]
    assert all("num-steps" not in c["reply"] and "lr-sum" not in c["reply"] for c in results["clients"])
    assert results["runs"][0]["history"][0]["aggregation"]["chi_square"] is None  # no a_t, no χ² of made-up ones


# --- a checkpoint holding NaN or ±inf --------------------------------------------------------------------------------


@pytest.mark.parametrize("role", ["model", "base"])
def test_a_nonfinite_checkpoint_is_refused_before_any_evaluation(assets, tmp_path, capsys, monkeypatch, role):
    """As `fedmerge merge` refuses it: the broken fine-tune's accuracy must never become its task's reference."""
    from fedmerge.simulations.experiment import Experiment

    folder, models = assets[3], list(assets[2])
    bad = broken(folder, f"nan-{role}.safetensors", lambda s: s["body.0.weight"].view(-1).__setitem__(3, float("nan")))
    monkeypatch.setattr(Experiment, "merge_one_shot", lambda *args: pytest.fail("evaluated"))
    if role == "model":
        models[1] = bad
    out = tmp_path / "out"
    assert evaluate(assets, out, "--lr-sums", *LR_SUMS, models=models, base=bad if role == "base" else None) == 2
    error = capsys.readouterr().err
    of = " of the base" if role == "base" else ""
    assert (
        f"nan-{role}.safetensors: tensor 'body.0.weight'{of} holds NaN or infinite values; nothing was evaluated"
        in error
    )
    assert "Traceback" not in error and not out.exists()


def test_a_base_of_another_model_is_named(assets, tmp_path, capsys):
    folder = assets[3]
    other = broken(folder, "other-base.safetensors", lambda s: s.update({"body.0.weight": torch.zeros(16, 9)}))
    assert evaluate(assets, tmp_path / "out", "--lr-sums", *LR_SUMS, base=other) == 2
    assert "other-base.safetensors: tensor 'body.0.weight' has shape (16, 9)" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


def test_ray_is_not_loaded():
    import os
    import subprocess
    from pathlib import Path

    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])}  # this checkout's fedmerge
    code = (
        "import sys, fedmerge.simulations.evaluate, fedmerge.simulations.evaluate_command; "
        "print(sorted(m for m in ('ray', 'flwr.simulation') if m in sys.modules))"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, env=env)
    assert done.stdout.strip() == "[]"


def test_the_checkpoints_become_flower_replies():
    from flwr.app import ArrayRecord

    from fedmerge import contract
    from fedmerge.simulations.evaluate import checkpoint_reply

    reply = checkpoint_reply(2, ArrayRecord({"w": torch.ones(2)}), 50, 7, 0.35)
    metrics = reply.content[contract.METRICS]
    assert dict(metrics) == {"num-examples": 50, "num-steps": 7, "lr-sum": 0.35, "client-id": 2}
    assert reply.metadata.message_type == "train" and not reply.has_error()
    unknown = checkpoint_reply(1, ArrayRecord({"w": torch.ones(2)}), 50, lr_sum=0.35).content[contract.METRICS]
    assert dict(unknown) == {"num-examples": 50, "lr-sum": 0.35, "client-id": 1}  # never a made-up num-steps


def test_hugging_face_clip_directories_map_by_name(tmp_path, monkeypatch, capsys):
    """A tiny CLIP (tests/test_clip_suite.py's) as base, and two fine-tunes of its image encoder saved as CLIPModel
    directories with save_pretrained (one sharded): the clip suite's trained tensors are CLIPModel's own names."""
    from test_clip_suite import EUROSAT, tiny_clip, write_folder
    from test_vision_suite import write_mnist
    from transformers import CLIPModel

    monkeypatch.setenv("FEDMERGE_CACHE", str(tmp_path / "cache"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    base, root = tmp_path / "clip", tmp_path / "data"
    tiny_clip(base)
    write_mnist(root, 60, 40)
    write_folder(root / "eurosat" / "2750", EUROSAT, 4)
    options = {"model": str(base), "root": str(root), "datasets": ["MNIST", "EuroSAT"]}
    load_suite.cache_clear()
    fed = load_suite("clip", 2, options, 0)
    models = []
    for t, task in enumerate(fed.tasks):
        model = fed.model_from(fed.pretrained)
        train(model, task, fed.loss, TrainConfig(optimizer="adamw", lr=1e-3, steps=3, batch_size=8, seed=t))
        clip = CLIPModel.from_pretrained(base)
        trained = {n: v for n, v in model.state_dict().items() if n in fed.trained_names}
        assert not clip.load_state_dict(trained, strict=False).unexpected_keys  # CLIPModel's own names
        models.append(tmp_path / f"finetuned-{task.name}")
        clip.save_pretrained(models[-1], **({"max_shard_size": 50_000} if t else {}))
    assert list(models[1].glob("*.index.json"))  # sharded
    experiment = tmp_path / "clip.toml"
    experiment.write_text(
        f'name = "clip-eval"\nsuite = "clip"\nclients = 2\nstrategies = ["fedavg", "median"]\n'
        f'[suite_options]\nmodel = "{base}"\nroot = "{root}"\ndatasets = ["MNIST", "EuroSAT"]\n'
    )
    out = tmp_path / "results"
    assert (
        main(
            [
                "evaluate",
                str(experiment),
                "--base",
                str(base),
                "--models",
                *map(str, models),
                "--out",
                str(out),
                "--no-progress",
            ]
        )
        == 0
    )
    results = json.loads(next(out.iterdir()).joinpath("results.json").read_text())
    assert [r["strategy"] for r in results["runs"]] == ["fedavg", "median"]
    own = [
        fed.evaluate(fed.complete({n: v for n, v in load_file_dir(m).items() if n in fed.trained_names}), task, "test")
        for m, task in zip(models, fed.tasks)
    ]
    assert [c["own"]["test"]["accuracy"] for c in results["clients"]] == pytest.approx([o["accuracy"] for o in own])
    load_suite.cache_clear()


def load_file_dir(directory):
    state = {}
    for file in sorted(directory.glob("*.safetensors")):
        state.update(load_file(file))
    return state
