"""``fedmerge run`` as a user meets it: checks before Ray starts, progress, the results table and files.

One real simulation (module scope) with a client whose training diverged (it sends NaN): it is left out
of every merge, and the results say so round by round.
"""

import datetime as dt
import json
import math

import pytest
import torch
import ray
from rich.console import Console

from fedmerge.cli import main
from fedmerge.errors import FedmergeError
from fedmerge.simulations.command import left_out, summary_table
from fedmerge.simulations.progress import ProgressDisplay
from fedmerge.simulations.results import write_results
from fedmerge.simulations.runner import run
from fedmerge.simulations.spec import Spec
from processes import free_port

SPEC = Spec.from_dict(
    {
        "name": "diverged-client",
        "suite": "quadratic",
        "clients": 3,
        "strategies": ["fedavg", "cclip"],
        "rounds": [1, 3],
        "training": {"steps": [5, 10, 20], "lr": 0.1, "corruption": ["none", "none", "nan"]},
    }
)


@pytest.fixture(scope="module")
def started_and_results(tmp_path_factory):
    out = tmp_path_factory.mktemp("runs")
    before = dt.datetime.now()
    run_dir = run(SPEC, out, show_progress=False)
    strict = json.loads((run_dir / "results.json").read_text(), parse_constant=lambda c: pytest.fail(f"{c} in JSON"))
    return before, run_dir, strict


@pytest.mark.parametrize(
    "setting, message",
    [
        ("engine.client_cpus=1000", r"engine.client_cpus = 1000 asks each client for more CPUs than this machine has"),
        ("engine.client_gpus=1000", r"engine.client_gpus = 1000 asks each client for more GPUs than this machine has"),
        ("engine.ray_address=127.0.0.1:{port}", r"engine.ray_address = '127.0.0.1:\d+': nothing answers there"),
    ],
)
def test_resources_no_node_can_give_are_refused_before_ray_starts(setting, message, tmp_path, capsys):
    assert main(["run", "quadratic", "--set", setting.format(port=free_port()), "--out", str(tmp_path / "r")]) == 2
    assert __import__("re").search(message, capsys.readouterr().err)
    assert not ray.is_initialized() and not (tmp_path / "r").exists()


def test_an_output_under_a_file_is_refused_before_anything_runs(tmp_path, capsys):
    (tmp_path / "file").write_text("mine")
    assert main(["run", "quadratic", "--out", str(tmp_path / "file" / "results")]) == 2
    assert "is under" in capsys.readouterr().err and (tmp_path / "file").read_text() == "mine"
    assert not ray.is_initialized()


def test_progress_is_log_lines_off_a_terminal_and_nothing_when_disabled(capsys):
    with ProgressDisplay(3, "job") as display:
        display.advance("client 0 trained")
    with ProgressDisplay(3, "quiet", enabled=False) as display:
        display.advance("client 0 trained")
    lines = capsys.readouterr().err.splitlines()
    assert [line.split("] ")[0] for line in lines] == ["job [0/3", "job [1/3"]
    assert lines[1].endswith("client 0 trained")


def test_runs_started_in_the_same_second_get_their_own_directories(tmp_path):
    when = dt.datetime(2026, 1, 2, 3, 4, 5)
    first, second = (write_results(SPEC, {"runs": []}, tmp_path, started=when) for _ in range(2))
    assert (first.name, second.name) == ("diverged-client-20260102-030405", "diverged-client-20260102-030405-2")
    assert json.loads((second / "results.json").read_text())["started"] == "2026-01-02T03:04:05"


@pytest.mark.slow
def test_results_record_the_start_time(started_and_results):
    before, run_dir, results = started_and_results
    started = dt.datetime.fromisoformat(results["started"])
    assert abs((started - before.replace(microsecond=0)).total_seconds()) <= 1
    assert results["timings"]["total"] > 2  # the end is well after the start
    assert run_dir.name == f"diverged-client-{started:%Y%m%d-%H%M%S}"


@pytest.mark.slow
def test_a_diverged_client_is_left_out_of_every_round_and_each_record_sits_on_its_round(started_and_results):
    _, _, results = started_and_results
    norms = results["diagnostics"]["task_vector_norms"]
    assert norms[2] is None and all(math.isfinite(n) for n in norms[:2])  # NaN written as null: strict JSON
    for entry_run in results["runs"]:
        merged = entry_run["history"][1:] if entry_run["rounds"] > 1 else entry_run["history"]
        assert [entry["aggregation"]["server_round"] for entry in merged] == [entry["round"] for entry in merged]
        for entry in merged:
            assert entry["aggregation"]["client_ids"] == [0, 1]
            assert [(e["client_id"], e["reason"]) for e in entry["aggregation"]["excluded"]] == [
                (2, "non-finite values in tensor 'theta'")
            ]
    assert left_out(results) == [
        "client 2: non-finite values in tensor 'theta' (8 merges, in cclip-r1, cclip-r3, fedavg-r1, fedavg-r3)"
    ]


def table_rows(results: dict) -> list[list[str]]:
    console = Console(record=True, width=200)
    console.print(summary_table(results))
    return [
        [cell.strip() for cell in line.split("│")[1:-1]]
        for line in console.export_text().splitlines()
        if line.startswith("│")
    ]


@pytest.mark.slow
def test_the_results_table_shows_the_baselines_and_lambda_only_on_one_shot_rows(started_and_results):
    _, _, results = started_and_results
    rows = table_rows(results)
    assert [row[0] for row in rows[:2]] == ["θ0 (no merging)", "clients' own"]
    assert float(rows[0][5]) == pytest.approx(results["pretrained"]["mean_loss"], abs=1e-4)
    own = [c["own"]["test"]["loss"] for c in results["clients"][:2]]  # the diverged client's loss is null
    assert float(rows[1][5]) == pytest.approx(sum(own) / 2, abs=1e-4)
    runs = rows[2:]
    assert [(row[0].rstrip(" ✗"), row[1]) for row in runs] == [
        ("fedavg", "1"),
        ("cclip", "1"),
        ("fedavg", "3"),
        ("cclip", "3"),
    ]
    assert runs[0][2] != "" and all(row[2] == "" for row in runs[1:])  # cclip has no λ of its own: β alone
    assert all(row[3] != "" for row in runs)


@pytest.mark.slow
@pytest.mark.parametrize("shift, marked", [(-1.0, 0), (+1.0, 4)])
def test_a_model_worse_than_theta0_is_marked(started_and_results, shift, marked):
    _, _, results = started_and_results
    finals = [run["final"]["mean_loss"] for run in results["runs"]]
    baseline = (max(finals) - shift) if shift < 0 else (min(finals) - shift)  # above all, or below all
    changed = {**results, "pretrained": {**results["pretrained"], "mean_loss": baseline}}
    assert sum(row[0].endswith("✗") for row in table_rows(changed)) == marked


def test_a_run_of_the_same_name_finishing_meanwhile_keeps_its_directory_and_this_one_takes_the_next(
    tmp_path, monkeypatch
):
    import fedmerge.simulations.results as store

    when = dt.datetime(2026, 1, 2, 3, 4, 5)
    other = tmp_path / "diverged-client-20260102-030405"
    real_save = store.write_safetensors

    def save_while_another_run_lands(path, tensors):
        other.mkdir(exist_ok=True)  # the other run renames its directory into place now
        real_save(path, tensors)

    monkeypatch.setattr(store, "write_safetensors", save_while_another_run_lands)
    mine = write_results(SPEC, {"runs": [], "models": {"m": {"w": torch.zeros(2)}}}, tmp_path, started=when)
    assert mine.name == "diverged-client-20260102-030405-2" and (mine / "models" / "m.safetensors").is_file()
    assert other.is_dir() and not any(other.iterdir())
    assert sorted(p.name for p in tmp_path.iterdir()) == [other.name, mine.name]


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has CUDA")
def test_a_gpu_server_device_is_refused_without_cuda_by_a_dry_run_as_by_a_run(tmp_path, capsys):
    """--dry-run checks what a run checks before it starts: this machine's devices too."""
    assert main(["run", "quadratic", "--set", "engine.server_device=cuda", "--dry-run"]) == 2
    assert "engine.server_device cuda: CUDA is not available on this machine" in capsys.readouterr().err
    assert main(["run", "quadratic", "--set", "engine.server_device=cuda", "--out", str(tmp_path / "r")]) == 2
    assert "engine.server_device cuda: CUDA is not available on this machine" in capsys.readouterr().err
    assert not ray.is_initialized() and not (tmp_path / "r").exists()


def test_results_files_hold_every_rows_fields_whatever_the_first_row_lacks():
    """A task scored 0 by its own client has no normalized accuracy; a later one has: both land in tasks.csv."""
    from fedmerge.simulations.results import _csv

    text = _csv(
        [
            {"task": "a", "accuracy": 0.0},
            {"task": "b", "accuracy": 0.5, "normalized_accuracy": 0.8},
            {"task": "c", "loss": float("nan")},
        ]
    )
    assert text.splitlines() == ["task,accuracy,normalized_accuracy,loss", "a,0.0,,", "b,0.5,0.8,", "c,,,"]


@pytest.mark.slow
def test_a_failure_after_some_runs_finished_keeps_them(tmp_path, monkeypatch):
    """The one-shot merges and the first multi-round run are written when they finish; a later failure records why
    and takes nothing along."""
    from fedmerge.simulations.experiment import Experiment
    from fedmerge.simulations.runner import run
    from fedmerge.simulations.sweep import is_complete

    real = Experiment._multi_round

    def second_fails(self, fed, name, *args):
        if name == "cclip":
            raise FedmergeError("the disk caught fire")
        return real(self, fed, name, *args)

    monkeypatch.setattr(Experiment, "_multi_round", second_fails)
    spec = Spec.from_dict(
        {
            "name": "partial",
            "suite": "quadratic",
            "clients": 2,
            "strategies": ["fedavg", "cclip"],
            "rounds": [1, 2],
            "training": {"steps": 4, "lr": 0.1},
        }
    )
    with pytest.raises(FedmergeError, match=r"the disk caught fire The runs that finished are kept in .*partial"):
        run(spec, tmp_path, run_dir=tmp_path / "partial", show_progress=False)
    results = json.loads((tmp_path / "partial" / "results.json").read_text())
    assert results["complete"] is False and results["error"] == "the disk caught fire"
    assert [(r["strategy"], r["rounds"]) for r in results["runs"]] == [("fedavg", 1), ("cclip", 1), ("fedavg", 2)]
    assert results["pending"] == ["cclip-r2"]
    assert sorted(p.name for p in (tmp_path / "partial" / "models").iterdir()) == [
        "cclip-r1.safetensors",
        "fedavg-r1.safetensors",
        "fedavg-r2.safetensors",
    ]
    assert not is_complete(tmp_path / "partial")  # a sweep runs such a cell again


@pytest.mark.slow
def test_several_clients_per_call_give_the_same_numbers_and_diagnostics_sample_above_their_cap(tmp_path):
    """engine.clients_per_call packs clients into fewer Flower calls; every client's numbers are those of its own
    call. diagnostics_clients caps the pairwise diagnostics (a seeded sample), never the norms."""

    def numbers(run_dir):
        results = json.loads((run_dir / "results.json").read_text())
        drop = ("seconds", "node_ids")  # a round's time and Flower's node ids are not numbers of the run

        def kept(value):
            if isinstance(value, dict):
                return {k: kept(v) for k, v in value.items() if k not in drop}
            return [kept(v) for v in value] if isinstance(value, list) else value

        return kept(results["runs"]), results

    base = {
        "name": "packed",
        "suite": "quadratic",
        "clients": 5,
        "strategies": ["fedavg", "median"],
        "rounds": [1, 2],
        "diagnostics_clients": 3,
        "training": {"steps": [2, 3, 4, 5, 6], "lr": 0.1},
    }
    one, results = numbers(run(Spec.from_dict(base), tmp_path, run_dir=tmp_path / "one", show_progress=False))
    packed, _ = numbers(
        run(
            Spec.from_dict({**base, "engine": {"clients_per_call": 2}}),
            tmp_path,
            run_dir=tmp_path / "packed",
            show_progress=False,
        )
    )
    assert packed == one
    diagnostics = results["diagnostics"]
    assert len(diagnostics["task_vector_norms"]) == 5 and len(diagnostics["sample"]) == 3
    assert len(diagnostics["cosine_similarity"]) == 3 and diagnostics["sample"] == sorted(diagnostics["sample"])


@pytest.mark.parametrize(
    "setting, message",
    [
        ("suite=vision", "the vision suite needs option 'root'"),
        ("training.warmup_steps=5000", "training option 'warmup_steps' (5000) must be smaller than the client's total"),
        ("training.corruption=nan", None),  # the documented corruption passes a dry run and a run alike
    ],
)
def test_a_dry_run_checks_what_a_run_checks_before_it_starts(setting, message, capsys):
    assert main(["run", "quadratic", "--set", setting, "--dry-run"]) == (2 if message else 0)
    err = capsys.readouterr().err
    assert (message in err) if message else err == ""
    assert not ray.is_initialized()
