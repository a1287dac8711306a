"""fedmerge sweep: grid expansion, validation of every cell, resume; one tiny real sweep on the quadratic suite."""

import json
import os
import shutil

import pytest

from fedmerge.cli import main
from fedmerge.errors import FedmergeError
from fedmerge.simulations.presets import shipped_names
from fedmerge.simulations.sweep import (
    MANIFEST,
    cell_dir,
    is_complete,
    load_sweep,
    run_sweep,
    sweep_from_dict,
)
from report_data import results

BASE = {
    "suite": "quadratic",
    "clients": 2,
    "strategies": ["fedavg"],
    "rounds": [1],
    "select": False,
    "training": {"lr": 0.1, "steps": 4, "batch_size": 1000},
    "engine": {"ray_address": "local"},
}


def sweep(grid, base=BASE, **extra):
    return sweep_from_dict({"name": "test", "base": base, "grid": grid, **extra}, source="test.toml")


def test_the_grid_is_the_product_of_its_axes_with_stable_distinct_ids():
    s = sweep({"seed": [0, 1, 2], "suite_options.zeta2": [0.5, 2.0]})
    assert len(s.cells) == 6
    assert s.cells[0].overrides == {"seed": 0, "suite_options.zeta2": 0.5}
    assert s.cells[5].spec.seed == 2 and s.cells[5].spec.suite_options["zeta2"] == 2.0
    assert len({c.id for c in s.cells}) == 6
    assert [c.id for c in s.cells] == [
        c.id for c in sweep({"seed": [0, 1, 2], "suite_options.zeta2": [0.5, 2.0]}).cells
    ]
    assert s.cells[0].id.startswith("seed-0_zeta2-0.5-")
    changed = sweep({"seed": [0, 1, 2], "suite_options.zeta2": [0.5, 2.0]}, base={**BASE, "clients": 3})
    assert not {c.id for c in s.cells} & {c.id for c in changed.cells}, "a changed base must not reuse old cells"


def test_a_named_axis_zips_its_keys_and_spread_values_are_values():
    s = sweep(
        {
            "spread": {
                "training.lr": [0.1, {"geometric": [0.05, 0.2]}],
                "training.steps": [4, [2, 8]],
                "labels": ["equal", "4x"],
            }
        }
    )
    assert [c.levels for c in s.cells] == [{"spread": "equal"}, {"spread": "4x"}]
    assert [c.id.rsplit("-", 1)[0] for c in s.cells] == ["spread-equal", "spread-4x"]  # axis-level, whatever the label
    assert [cfg.steps for cfg in s.cells[1].spec.client_configs()] == [2, 8]
    assert sweep({"training.lr": [{"geometric": [0.05, 0.2]}]}).cells[0].spec.training["lr"] == {
        "geometric": [0.05, 0.2]
    }


def test_a_preset_base_with_overrides():
    s = sweep({"seed": [0]}, base={"preset": "quadratic", "clients": 2, "training": {"steps": [5, 10]}})
    spec = s.cells[0].spec
    assert (
        spec.suite == "quadratic"
        and spec.clients == 2
        and spec.training["lr"] == 0.02
        and spec.training["steps"] == [5, 10]
    )


@pytest.mark.parametrize(
    "data, message",
    [
        ({"base": BASE, "grid": {"training.lrr": [0.1]}}, "unknown key 'training.lrr'"),
        ({"base": BASE, "grid": {"seed": [0, 1], "clients": [2, 0]}}, "cell 2 (seed=0, clients=0)"),
        ({"base": BASE, "grid": {}}, "the [grid] table is empty"),
        ({"base": BASE}, "no [grid] table"),
        ({"base": BASE, "grid": {"seed": []}}, "grid key 'seed' has no values"),
        ({"base": BASE, "grid": {"seed": [0]}, "gird": {}}, "unknown top-level key 'gird' (did you mean 'grid'?)"),
        ({"base": {**BASE, "sute": "x"}, "grid": {"seed": [0]}}, "unknown key 'sute'"),
        ({"base": BASE, "grid": {"ax": {"training.lr": [0.1, 0.2], "training.steps": [4]}}}, "the same length"),
        ({"base": BASE, "grid": {"seed": [0, 0]}}, "are the same experiment"),
        ({"base": {"preset": "nope"}, "grid": {"seed": [0]}}, "unknown preset 'nope'"),
        ({"base": {"preset": "default"}, "grid": {"name": ["ok", "../up"]}}, "cell 2 (name=../up): option 'name'"),
        (
            {"name": "../up", "base": BASE, "grid": {"seed": [0]}},
            "test.toml: option 'name' names the results directory",
        ),
    ],
)
def test_bad_sweep_files_are_refused_before_anything_runs(data, message):
    with pytest.raises(FedmergeError) as error:
        sweep_from_dict(data, source="test.toml")
    assert message in str(error.value)


def test_the_cli_refuses_a_bad_sweep_file_and_touches_nothing(tmp_path, capsys):
    path = tmp_path / "bad.toml"
    path.write_text('[base]\nsuite = "quadratic"\n[grid]\n"training.lrr" = [0.1]\n')
    out = tmp_path / "sweep"
    assert main(["sweep", str(path), "--out", str(out)]) == 2
    error = capsys.readouterr().err
    assert "training.lrr" in error and "Traceback" not in error
    assert not out.exists()
    path.write_text('[base]\nsuite = "quadratic"\n[grid]\n')
    assert main(["sweep", str(path), "--out", str(out)]) == 2
    assert "empty" in capsys.readouterr().err and not out.exists()


def test_an_unknown_study_is_named_with_the_shipped_ones():
    with pytest.raises(FedmergeError, match="unknown study 'robustnes'; choose one of .*robustness"):
        load_sweep("robustnes")


def test_shipped_studies_are_valid():
    assert {"quadratic", "training-heterogeneity", "data-heterogeneity", "robustness"} <= set(shipped_names("study"))
    for name in shipped_names("study"):
        assert load_sweep(name).cells
    assert main(["list"]) == 0


def fake_runner(calls):
    def runner(spec, run_dir):
        calls.append(run_dir.name)
        run_dir.mkdir(parents=True)
        (run_dir / "results.json").write_text(json.dumps(results(seed=spec.seed)))
        return run_dir

    return runner


def test_resume_skips_finished_cells_and_redoes_interrupted_ones(tmp_path):
    s = sweep({"seed": [0, 1, 2]})
    out = tmp_path / "sweep"
    calls = []
    run_sweep(s, out, runner=fake_runner(calls), log=lambda line: None)
    assert calls == [c.id for c in s.cells]
    # interrupt: cell 1's results are truncated (never happens with atomic writes, but be safe), cell 2 left a temp dir
    (cell_dir(out, s.cells[1]) / "results.json").write_text("{")
    shutil.rmtree(cell_dir(out, s.cells[2]))
    (out / "cells" / f".{s.cells[2].id}.abc123").mkdir()
    calls.clear()
    manifest = run_sweep(s, out, runner=fake_runner(calls), log=lambda line: None)
    assert calls == [s.cells[1].id, s.cells[2].id]
    assert all(c["complete"] for c in manifest["cells"])
    assert not list((out / "cells").glob(".*"))


def test_a_failing_cell_stops_the_sweep_and_keeps_the_finished_ones(tmp_path):
    s = sweep({"seed": [0, 1]})
    out = tmp_path / "sweep"
    calls = []

    def runner(spec, run_dir):
        if spec.seed == 1:
            run_dir.mkdir(parents=True)  # half-written
            raise FedmergeError("client 0 failed")
        return fake_runner(calls)(spec, run_dir)

    with pytest.raises(FedmergeError, match="run the sweep again to resume"):
        run_sweep(s, out, runner=runner, log=lambda line: None)
    assert is_complete(cell_dir(out, s.cells[0])) and not cell_dir(out, s.cells[1]).exists()
    assert [c["complete"] for c in json.loads((out / MANIFEST).read_text())["cells"]] == [True, False]


@pytest.mark.parametrize("out", ["file", "file/sweep"])
def test_an_out_path_at_or_under_a_file_is_refused_before_anything_runs(tmp_path, capsys, out):
    (tmp_path / "file").write_text("mine")
    calls = []
    with pytest.raises(FedmergeError, match="--out .* is a file|--out .* is under"):
        run_sweep(sweep({"seed": [0]}), tmp_path / out, runner=fake_runner(calls), log=lambda line: None)
    assert calls == [] and (tmp_path / "file").read_text() == "mine"
    path = tmp_path / "tiny.toml"
    path.write_text('[base]\nsuite = "quadratic"\n[grid]\nseed = [0]\n')
    assert main(["sweep", str(path), "--out", str(tmp_path / out), "--no-progress"]) == 2
    error = capsys.readouterr().err
    assert error.startswith("fedmerge: error: --out") and "Traceback" not in error


def test_the_manifest_is_written_whole_with_the_users_umask(tmp_path):
    out = tmp_path / "sweep"
    run_sweep(sweep({"seed": [0]}), out, runner=fake_runner([]), log=lambda line: None)
    assert json.loads((out / MANIFEST).read_text())["cells"][0]["complete"]
    assert (out / MANIFEST).stat().st_mode & 0o777 == 0o666 & ~current_umask()
    assert not list(out.glob(".*"))


def current_umask():
    mask = os.umask(0)
    os.umask(mask)
    return mask


def test_a_non_sweep_directory_is_not_overwritten(tmp_path):
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "keep.txt").write_text("mine")
    with pytest.raises(FedmergeError, match="not a sweep directory"):
        run_sweep(sweep({"seed": [0]}), tmp_path / "other", runner=fake_runner([]), log=lambda line: None)


@pytest.mark.slow
def test_a_tiny_real_sweep_resumes_and_reports(tmp_path, capsys):
    """Two quadratic cells: one finished before (skipped), one interrupted (temp dir left) and run for real."""
    path = tmp_path / "tiny.toml"
    path.write_text(
        'name = "tiny"\n[base]\nsuite = "quadratic"\nclients = 2\nstrategies = ["fedavg"]\nrounds = [1]\nselect = false\n'
        '[base.training]\nlr = 0.1\nsteps = 4\nbatch_size = 1000\n[base.engine]\nray_address = "local"\n[grid]\nseed = [0, 1]\n'
    )
    s = load_sweep(path)
    out = tmp_path / "sweep"
    fake_runner([])(s.cells[0].spec, cell_dir(out, s.cells[0]))
    (out / "cells" / f".{s.cells[1].id}.partial").mkdir(parents=True)
    assert main(["sweep", str(path), "--out", str(out), "--no-progress"]) == 0
    printed = capsys.readouterr().out
    assert "2 cells, 1 finished already, 1 to run" in printed
    results_file = cell_dir(out, s.cells[1]) / "results.json"
    data = json.loads(results_file.read_text())
    assert data["seed"] == 1 and data["runs"][0]["strategy"] == "fedavg"
    assert not list((out / "cells").glob(".*"))
    assert main(["report", str(out)]) == 0
    assert (out / "report" / "report.html").exists()
