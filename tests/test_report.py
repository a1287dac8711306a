"""fedmerge report on small synthetic results directories (no Ray)."""

import json
import math
import os
import re
import stat

import numpy as np
import pytest
from scipy import stats

from fedmerge.cli import main
from fedmerge.errors import FedmergeError
from fedmerge.report import figures, load_runs, write_report
from fedmerge.report.findings import write_findings, write_page
from fedmerge.report.document import TASK_QUANTILES, build_report
from fedmerge.report.records import aggregate, first_round, rows
from fedmerge.report.stats import format_paired, mean_ci, paired, sign
from report_data import THETA0, OWN, results, write_grid, write_run, write_sweep


def test_mean_ci_is_the_t_interval():
    values = [0.5, 0.6, 0.7, 0.65]
    mean, half, n = mean_ci(values)
    sem = stats.sem(values)
    assert mean == pytest.approx(0.6125) and n == 4
    assert half == pytest.approx(stats.t.ppf(0.975, 3) * sem)
    assert math.isnan(mean_ci([0.4])[1])


def test_a_single_run_gives_markdown_html_and_readable_figures(tmp_path):
    run = write_run(tmp_path / "run")
    out = write_report(run)
    assert out == run / "report"
    markdown = (out / "report.md").read_text()
    html = (out / "report.html").read_text()
    figures = sorted(p.name for p in (out / "figures").glob("*.png"))
    assert {"per-round.png", "one-shot-vs-multi-round.png", "cosine-similarity.png", "effective-weights.png"} <= set(
        figures
    )
    for name in figures:
        assert f"figures/{name}" in markdown
    assert html.count("data:image/png;base64,") == len(figures)
    assert not re.search(r"src=['\"](?!data:)", html), "the HTML must not reference outside files"
    assert "| setting | model | rounds | seeds |" in markdown and "| fedavg |" in markdown


def test_a_run_of_many_clients_is_summarised_not_drawn_client_by_client(tmp_path):
    """Above DETAIL_LIMIT clients: the per-task table gives quantiles and the count not scored, the effective
    weights are one dot per client, and the heatmap of the diagnostics' sample is labelled with the sampled ids."""
    clients, sampled = 300, list(range(0, 280, 7))
    data = results(clients=clients, lrs=[0.01 * (1 + t % 7) for t in range(clients)], diverged=())
    data["runs"][0]["final"]["tasks"][5] = {"task": "mnist1d:task-5", "diverged": True}
    data["diagnostics"]["cosine_similarity"] = (0.2 + 0.8 * np.eye(len(sampled))).tolist()
    data["diagnostics"]["sample"] = sampled
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "results.json").write_text(json.dumps(data))
    table = {row["task (normalized accuracy)"]: row for row in _table(tmp_path / "run", "task (normalized accuracy)")}
    assert len(table) == len(TASK_QUANTILES) + 1 and f"median of {clients} tasks" in table
    assert table["not scored (diverged or missing)"]["fedavg r1"] == "1"
    assert table["not scored (diverged or missing)"]["median r3"] == "0"
    collection = load_runs(tmp_path / "run")
    weights = figures.effective_weights(collection).figure.axes[0]
    assert not weights.patches and len(weights.collections[0].get_offsets()) == clients
    heatmap = figures.cosine_heatmap(collection).figure.axes[0]
    assert {int(t.get_text()) for t in heatmap.get_xticklabels()} <= set(sampled)
    assert "40 sampled" in heatmap.get_xlabel()
    figures.plt.close("all")


def test_a_sweep_is_averaged_over_seeds_with_intervals(tmp_path):
    sweep = write_sweep(tmp_path / "sweep")
    collection = load_runs(sweep)
    assert len(collection.runs) == 9 and collection.axes == ["suite_options.alpha"]
    table = aggregate(rows(collection), ("group", "strategy", "rounds"), ["mean_normalized_accuracy"])
    assert {entry["n"] for entry in table} == {3}
    out = write_report(sweep, tmp_path / "out")
    markdown = (out / "report.md").read_text()
    assert "±" in markdown
    assert (out / "figures" / "normalized-accuracy-vs-alpha.png").exists()
    assert "suite_options.alpha=0.1" in markdown


def test_lr_spread_and_corrupted_clients_get_their_figures(tmp_path):
    root = tmp_path / "runs"
    write_run(root / "a", lrs=[0.05, 0.05, 0.05])
    write_run(root / "b", lrs=[0.01, 0.05, 0.1])
    write_run(root / "c", corruption=["sign-flip", "none", "none"], seed=1)
    out = write_report(root)
    names = {p.name for p in (out / "figures").glob("*.png")}
    assert "normalized-accuracy-vs-lr-spread.png" in names
    assert "accuracy-vs-corrupted.png" in names


def _table(path, column):
    """The rows, as dicts, of the table of ``path``'s report that has ``column``."""
    report = build_report(load_runs(path))
    figures.plt.close("all")
    table = next(t for section in report.sections for t in section.tables if column in t.columns)
    return [dict(zip(table.columns, row)) for row in table.rows]


def _summary(path):
    return _table(path, "model")


def _final(run_dir, strategy, rounds=1, metric="mean_normalized_accuracy"):
    data = json.loads((run_dir / "results.json").read_text())
    return next(r["final"][metric] for r in data["runs"] if r["strategy"] == strategy and r["rounds"] == rounds)


def test_runs_of_one_experiment_with_other_settings_are_never_pooled_as_seeds(tmp_path):
    root = tmp_path / "runs"
    slow = write_run(root / "a", settings={"training.lr": 0.01})
    fast = write_run(root / "b", settings={"training.lr": 0.1}, shift={"fedavg": 0.2})
    write_run(root / "c", settings={"training.lr": 0.01}, seed=1)
    collection = load_runs(root)
    assert [(g.label, g.seeds) for g in collection.groups] == [("training.lr=0.01", [0, 1]), ("training.lr=0.1", [0])]
    summary = _summary(root)
    fedavg = {row["setting"]: row for row in summary if row["model"] == "fedavg" and row["rounds"] == "1"}
    assert fedavg["training.lr=0.1"]["seeds"] == "1" and fedavg["training.lr=0.01"]["seeds"] == "2"
    assert fedavg["training.lr=0.1"]["normalized accuracy"] == f"{_final(fast, 'fedavg'):.3f}"  # its own number, no ±
    assert "±" in fedavg["training.lr=0.01"]["normalized accuracy"]
    assert fedavg["training.lr=0.01"]["normalized accuracy"].startswith(
        f"{(_final(slow, 'fedavg') + _final(root / 'c', 'fedavg')) / 2:.3f} ±"
    )
    assert _table(root, "training.lr") == [
        {"setting": "training.lr=0.01", "training.lr": "0.01"},
        {"setting": "training.lr=0.1", "training.lr": "0.1"},
    ]


def test_experiments_with_other_names_are_other_settings_and_one_setting_is_named_by_its_experiment(tmp_path):
    root = tmp_path / "runs"
    write_run(root / "a")
    write_run(root / "b", settings={"name": "other"})
    assert [g.label for g in load_runs(root).groups] == ["name=synthetic", "name=other"]
    assert [g.label for g in load_runs(root / "a").groups] == ["synthetic"]


def test_a_sweep_never_pools_cells_whose_specs_differ_beyond_the_seed(tmp_path):
    sweep = write_sweep(tmp_path / "sweep", alphas=(0.1, 1.0), seeds=(0, 1, 2))
    cell = sweep / "cells" / "alpha0.1-seed2" / "results.json"
    data = json.loads(cell.read_text())
    data["spec"]["training"]["lr"] = [0.5, 0.5, 0.5]
    cell.write_text(json.dumps(data))
    groups = {g.label: g.seeds for g in load_runs(sweep).groups}
    usual = "training.lr=[0.05, 0.05, 0.05]"
    assert groups == {
        f"suite_options.alpha=0.1, {usual}": [0, 1],
        f"suite_options.alpha=1, {usual}": [0, 1, 2],
        "suite_options.alpha=0.1, training.lr=[0.5, 0.5, 0.5]": [2],
    }


@pytest.mark.parametrize("same", [True, False])
def test_a_repeated_seed_is_one_sample_the_newest_is_kept_and_the_report_says_so(tmp_path, same):
    root = tmp_path / "runs"
    old = write_run(root / "a-old", started="2026-01-01T10:00:00")
    new = write_run(root / "b-new", started="2026-01-02T10:00:00", shift=None if same else {"fedavg": 0.1})
    collection = load_runs(root)
    assert [run.path for run in collection.runs] == [new] and [(a.path, b.path) for a, b in collection.repeats] == [
        (old, new)
    ]
    fedavg = next(r for r in _summary(root) if r["model"] == "fedavg" and r["rounds"] == "1")
    assert fedavg["seeds"] == "1" and fedavg["normalized accuracy"] == f"{_final(new, 'fedavg'):.3f}"
    markdown = (write_report(root) / "report.md").read_text()
    warning = next(line for line in markdown.splitlines() if line.startswith(f"- {old} repeats {new}"))
    assert "one sample" in warning and ("differ" in warning) != same


def _errorbars(figure):
    """(panel title, series label, ys, error half-lengths) of every error-bar series of a figure."""
    out = []
    for ax in figure.figure.axes:
        for container in ax.containers:
            if hasattr(container, "has_yerr"):
                line, _, bars = container.lines
                lengths = [abs(seg[1][1] - seg[0][1]) / 2 for seg in bars[0].get_segments()] if bars else []
                out.append((ax.get_title(), container.get_label(), list(line.get_ydata()), lengths))
    return out


def test_error_bars_are_taken_over_seeds_only_never_across_another_setting(tmp_path):
    root = tmp_path / "runs"
    for alpha in (0.1, 10.0):
        for beta, shift in (("1", 0.0), ("2", 0.3)):
            write_run(
                root / f"a{alpha}-b{beta}", alpha=alpha, settings={"server.server_lr": beta}, shift={"fedavg": shift}
            )
    figure = figures.against(rows(load_runs(root)), "alpha", "mean_normalized_accuracy")
    series = _errorbars(figure)
    assert {title for title, *_ in series} == {"server.server_lr=1", "server.server_lr=2"}
    assert all(length == 0 for *_, lengths in series for length in lengths)  # one seed: no interval
    for beta in ("1", "2"):
        ys = next(
            ys for title, label, ys, _ in series if title == f"server.server_lr={beta}" and label == "fedavg, one-shot"
        )
        assert ys == pytest.approx([_final(root / f"a{a}-b{beta}", "fedavg") for a in (0.1, 10.0)])
    assert "one seed per setting: no intervals" in figure.caption

    sweep = write_sweep(tmp_path / "sweep", alphas=(0.1, 10.0), seeds=(0, 1))
    series = _errorbars(figures.against(rows(load_runs(sweep)), "alpha", "mean_normalized_accuracy"))
    assert any(length > 0 for *_, lengths in series for length in lengths)


def test_a_figure_is_not_drawn_where_the_factor_does_not_tell_settings_apart(tmp_path):
    root = tmp_path / "runs"
    write_run(root / "a", lrs=[0.01, 0.1, 0.1])
    write_run(root / "b", lrs=[0.1, 1.0, 1.0])  # another setting, the same spread
    write_run(root / "c", lrs=[0.1, 0.1, 0.1])
    assert figures.against(rows(load_runs(root)), "lr_spread", "mean_normalized_accuracy") is None


def test_baselines_are_rows_and_reference_lines_and_a_strategy_below_theta0_is_marked(tmp_path):
    run = write_run(tmp_path / "run", shift={"fedavg": -0.4})
    summary = {row["model"]: row for row in _summary(run) if row["rounds"] in ("1", "–")}
    assert summary["θ0 (pretrained)"]["normalized accuracy"] == f"{THETA0 / OWN:.3f}"
    assert summary["θ0 (pretrained)"]["accuracy"] == f"{THETA0:.3f}"
    assert summary["clients' own models"]["normalized accuracy"] == "1.000"
    assert summary["clients' own models"]["accuracy"] == f"{OWN:.3f}"
    assert "fedavg ✗" in summary and "median" in summary  # below θ0 is marked, above is not
    figure = figures.per_round(load_runs(run), "mean_normalized_accuracy")
    references = {line.get_label(): line.get_ydata()[0] for ax in figure.figure.axes for line in ax.get_lines()}
    assert references["θ0 (pretrained)"] == pytest.approx(THETA0 / OWN) and references["clients' own models"] == 1.0


def test_the_first_round_chi_square_is_one_quantity_in_the_table_and_the_figure(tmp_path):
    data = results()
    data["runs"].sort(key=lambda r: -r["rounds"])  # multi-round runs first: the one-shot round still defines it
    for number, entry in enumerate(data["runs"]):
        for point in entry["history"]:
            if point.get("aggregation"):
                point["aggregation"]["chi_square"] = 1.0 + number
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "results.json").write_text(json.dumps(data))
    entry, aggregation = first_round(data)
    assert (entry["strategy"], entry["rounds"]) == ("fedavg", 1)
    (row,) = _table(tmp_path / "run", "χ² from")
    assert row["χ²(p‖w), first round (training het.)"] == f"{aggregation['chi_square']:.3f}"
    assert row["χ² from"] == "fedavg, 1 round, a_t = lr-sum"
    title = figures.effective_weights(load_runs(tmp_path / "run")).figure.axes[0].get_title()
    assert f"χ²(p‖w) = {aggregation['chi_square']:.3g}" in title and "fedavg, 1 round" in title


def test_lambda_beta_and_tuned_parameters_say_what_they_are_and_how_they_were_set(tmp_path):
    run = write_run(
        tmp_path / "run",
        strategies=("fedavg", "fedgma", "median", "ties"),
        rounds=(1, 3),
        settings={"strategy.ties.density": 0.5},
    )
    data = json.loads((run / "results.json").read_text())
    chosen = {(r["strategy"], r["rounds"]): r["selected"] for r in data["runs"]}
    summary = {(row["model"], row["rounds"]): row for row in _summary(run)}
    assert summary[("fedavg", "1")]["λ (method's own)"] == f"{chosen['fedavg', 1]['scaling']:.3f} (sum, validation)"
    assert summary[("fedavg", "1")]["β (server lr applied)"] == f"{chosen['fedavg', 1]['server_lr']:.3f}"
    assert summary[("median", "1")]["λ (method's own)"] == f"{chosen['median', 1]['scaling']:.3f} (mean, validation)"
    assert summary[("fedgma", "1")]["rule parameter (tuned or given)"] == "threshold=0.300 (validation)"
    assert summary[("ties", "1")]["rule parameter (tuned or given)"] == "density=0.500 (given)"
    assert (
        summary[("fedavg", "3")]["λ (method's own)"] == "–"
        and summary[("fedavg", "3")]["β (server lr applied)"] == "1.000"
    )
    data["spec"]["select"] = False
    for entry in data["runs"]:
        entry.get("searched", {})["scaling"] = []
    (run / "results.json").write_text(json.dumps(data))
    assert {row["λ (method's own)"].split(", ")[-1] for row in _summary(run) if row["rounds"] == "1"} == {"given)"}


def test_what_was_merged_is_shown_per_setting(tmp_path):
    root = tmp_path / "runs"
    write_run(root / "a")
    plain = root / "b"
    write_run(plain, settings={"server.lora": "factors"})
    data = json.loads((plain / "results.json").read_text())
    data.update(tensors={"shared": 10, "private": 3, "statistics": 4}, statistics="reestimate", lora="factors")
    (plain / "results.json").write_text(json.dumps(data))
    merged = {row["setting"]: row for row in _table(root, "LoRA aggregation")}
    assert merged["server.lora=default"]["tensors: shared (merged) / private / statistics"] == "4 / 6 / 0"
    assert merged["server.lora=default"]["normalisation statistics"] == "none in the model"
    assert merged["server.lora=default"]["LoRA aggregation"] == "no LoRA adapters"
    assert merged["server.lora=factors"]["tensors: shared (merged) / private / statistics"] == "10 / 3 / 4"
    assert merged["server.lora=factors"]["normalisation statistics"] == "reestimate"
    assert merged["server.lora=factors"]["LoRA aggregation"] == "factors"


def test_a_diverged_run_is_shown_as_diverged_never_as_a_number(tmp_path):
    sweep = write_grid(tmp_path / "sweep", "spread", {"1x": {}}, seeds=(0, 1))
    cell = sweep / "cells" / "spread1x-seed1" / "results.json"
    cell.write_text(json.dumps(results(seed=1, diverged=("median",))))
    data = json.loads(cell.read_text())
    data["spec"]["spread"] = "1x"
    cell.write_text(json.dumps(data))
    summary = {(row["model"], row["rounds"]): row for row in _summary(sweep)}
    assert summary[("median ✗", "1")]["normalized accuracy"] == "diverged (1/2 seeds)"
    assert summary[("median ✗", "3")]["accuracy"] == "diverged (1/2 seeds)"
    assert "±" in summary[("fedavg", "1")]["normalized accuracy"]
    markdown = (write_report(sweep) / "report.md").read_text()
    assert "seed 1: median (1 round(s)) diverged on mnist1d:task-0" in markdown


def test_a_client_no_better_than_theta0_is_warned_about(tmp_path):
    run = write_run(tmp_path / "run", weak=(1,))
    markdown = (write_report(run) / "report.md").read_text()
    warnings = markdown.split("## Warnings", 1)[1].split("## Summary", 1)[0]
    assert "client 1's own model (mnist1d:task-1) is no better than θ0" in warnings and "client 0" not in warnings
    assert "## Warnings" not in (write_report(write_run(tmp_path / "fine")) / "report.md").read_text()


@pytest.mark.parametrize("damage", ["truncate", "not-json", "no-runs"])
def test_a_damaged_results_file_is_named_and_the_old_report_is_kept(tmp_path, damage, capsys):
    run = write_run(tmp_path / "run")
    write_report(run)
    before = (run / "report" / "report.md").read_text()
    path = run / "results.json"
    text = path.read_text()
    if damage == "truncate":
        path.write_text(text[: len(text) // 2])
    elif damage == "not-json":
        path.write_text("<html>")
    else:
        data = json.loads(text)
        del data["runs"]
        path.write_text(json.dumps(data))
    assert main(["report", str(run)]) == 2
    error = capsys.readouterr().err
    assert str(path) in error and "Traceback" not in error
    assert (run / "report" / "report.md").read_text() == before
    assert not [p for p in run.iterdir() if p.name.startswith(".report")]


def test_a_directory_without_results_is_refused(tmp_path, capsys):
    (tmp_path / "empty").mkdir()
    assert main(["report", str(tmp_path / "empty")]) == 2
    assert "no results in" in capsys.readouterr().err
    assert main(["report", str(tmp_path / "missing")]) == 2
    assert not (tmp_path / "empty" / "report").exists()


def test_a_damaged_sweep_manifest_is_named(tmp_path):
    sweep = write_sweep(tmp_path / "sweep", alphas=(1.0,), seeds=(0,))
    (sweep / "sweep.json").write_text('{"cells": [')
    with pytest.raises(FedmergeError, match="sweep.json is not valid JSON"):
        load_runs(sweep)


def test_unfinished_sweep_cells_are_left_out_and_said_so(tmp_path):
    sweep = write_sweep(tmp_path / "sweep", alphas=(0.1, 1.0), seeds=(0,))
    manifest = json.loads((sweep / "sweep.json").read_text())
    manifest["cells"].append({"id": "not-run", "dir": "cells/not-run", "levels": {}})
    (sweep / "sweep.json").write_text(json.dumps(manifest))
    out = write_report(sweep)
    assert "1 sweep cell(s) have no results yet" in (out / "report.md").read_text()


def _tree(path):
    return {str(p.relative_to(path)): p.read_bytes() for p in sorted(path.rglob("*")) if p.is_file()}


def test_a_report_replaces_only_a_previous_report_unless_forced(tmp_path, capsys):
    run = write_run(tmp_path / "run")
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "notes.txt").write_text("a user's work")
    assert main(["report", str(run), "--out", str(mine)]) == 2
    error = capsys.readouterr().err
    assert str(mine) in error and "--force" in error and "Traceback" not in error
    assert _tree(mine) == {"notes.txt": b"a user's work"}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["mine", "run"]

    assert main(["report", str(run), "--out", str(mine), "--force"]) == 0
    assert (mine / "report.md").exists() and not (mine / "notes.txt").exists()
    (tmp_path / "empty").mkdir()
    assert main(["report", str(run), "--out", str(tmp_path / "empty")]) == 0
    assert main(["report", str(run), "--out", str(mine)]) == 0, "a previous report is replaced without --force"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["empty", "mine", "run"]


@pytest.mark.parametrize("where", ["file", "run", "parent", "cwd", "cwd-parent", "sweep-cells", "run-models"])
def test_a_report_never_replaces_a_file_the_results_or_the_current_directory(tmp_path, monkeypatch, capsys, where):
    run = write_run(tmp_path / "runs" / "run")
    (run / "models").mkdir()
    (run / "models" / "fedavg-r1.safetensors").write_text("weights")
    sweep = write_sweep(tmp_path / "sweep", alphas=(1.0,), seeds=(0,))
    (tmp_path / "file").write_text("keep")
    work = tmp_path / "work"
    work.mkdir()
    (work / "data.csv").write_text("1,2")
    monkeypatch.chdir(work)
    source, out = {
        "file": (run, tmp_path / "file"),
        "run": (run, run),
        "parent": (run, tmp_path / "runs"),
        "cwd": (run, "."),
        "cwd-parent": (run, ".."),
        "sweep-cells": (sweep, sweep / "cells"),
        "run-models": (run, run / "models"),
    }[where]
    before = _tree(tmp_path)
    assert main(["report", str(source), "--out", str(out), "--force"]) == 2
    error = capsys.readouterr().err
    assert f"--out {out}" in error and "Traceback" not in error
    assert _tree(tmp_path) == before and not list(tmp_path.rglob(".*partial"))


def test_a_report_is_written_with_the_users_umask_and_leaves_no_staging(tmp_path):
    run = write_run(tmp_path / "run")
    old = os.umask(0o022)
    try:
        out = write_report(run)
        out = write_report(run)
    finally:
        os.umask(old)
    assert stat.S_IMODE(out.stat().st_mode) == 0o755
    assert {stat.S_IMODE(p.stat().st_mode) for p in out.rglob("*") if p.is_file()} == {0o644}
    assert sorted(p.name for p in run.iterdir()) == ["report", "results.json"]


def test_figures_keep_legends_off_the_data_bars_from_zero_and_panels_apart(tmp_path):
    table = rows(load_runs(write_sweep(tmp_path / "sweep")))
    bars = figures.one_shot_vs_multi_round(table, "mean_normalized_accuracy")
    assert all(ax.get_ylim()[0] == 0 for ax in bars.figure.axes)
    for figure in (
        bars,
        figures.per_round(load_runs(tmp_path / "sweep")),
        figures.against(table, "alpha", "mean_accuracy"),
        figures.cosine_heatmap(load_runs(tmp_path / "sweep")),
    ):
        fig = figure.figure
        fig.canvas.draw()
        renderer = fig.canvas.get_renderer()
        panels = [ax for ax in fig.axes if ax.get_visible() and ax.get_label() != "<colorbar>"]
        legends = [*fig.legends, *(ax.get_legend() for ax in panels if ax.get_legend())]
        for legend in legends:
            assert not any(
                legend.get_window_extent(renderer).overlaps(ax.get_window_extent(renderer)) for ax in panels
            ), figure.name
        boxes = [ax.get_tightbbox(renderer) for ax in panels]
        assert not any(a.overlaps(b) for i, a in enumerate(boxes) for b in boxes[i + 1 :]), figure.name


SEEDS5 = (0, 1, 2, 3, 4)


def test_paired_intervals_are_narrower_than_unpaired_ones_when_seeds_share_noise():
    ta = {0: 0.5, 1: 0.7, 2: 0.6, 3: 0.8, 4: 0.55}
    other = {s: v + 0.02 + 0.001 * s for s, v in ta.items()}
    diff = paired(other, ta)
    assert diff[0] == pytest.approx(0.022) and diff[2] == 5 and sign(diff) == 1
    assert mean_ci(list(other.values()))[1] > 10 * diff[1]
    assert sign(paired(ta, other)) == -1 and sign(paired({0: 0.1, 1: -0.1}, {0: 0, 1: 0})) == 0
    assert format_paired(diff).endswith("▲") and "▲" not in format_paired(paired({0: 0.1, 1: -0.1}, {0: 0, 1: 0}))
    assert sign(paired({0: 0.3}, {0: 0.1})) == 0  # one seed: no interval, no verdict


def test_findings_refuse_to_overwrite_what_is_not_theirs_and_no_run_says_to_run(tmp_path, capsys):
    work = tmp_path / "studies"
    assert main(["findings", "--no-run", "--work", str(work), "--out", str(tmp_path / "page.md")]) == 2
    error = capsys.readouterr().err
    assert f"--work {work}" in error and "without --no-run" in error and "Traceback" not in error
    (tmp_path / "README.md").write_text("mine")
    (tmp_path / "pics").mkdir()
    (tmp_path / "pics" / "holiday.png").write_bytes(b"png")
    for out in (tmp_path / "README.md", tmp_path / "pics.md", tmp_path / "pics"):
        with pytest.raises(FedmergeError, match=f"--out {out}"):
            write_findings(work, out)
    assert (tmp_path / "README.md").read_text() == "mine" and (tmp_path / "pics" / "holiday.png").exists()


def test_the_findings_page_is_atomic_and_follows_the_umask(tmp_path, monkeypatch):
    out = tmp_path / "docs" / "findings.md"
    old = os.umask(0o022)
    try:
        write_page([], out, {}, tmp_path / "work")
    finally:
        os.umask(old)
    assert stat.S_IMODE(out.stat().st_mode) == 0o644
    real = os.replace
    monkeypatch.setattr(
        os,
        "replace",
        lambda a, b: (_ for _ in ()).throw(OSError("disk full")) if str(b).endswith(".md") else real(a, b),
    )
    with pytest.raises(OSError):
        write_page([], out, {"total": 1}, tmp_path / "work")
    assert sorted(p.name for p in out.parent.iterdir()) == ["findings", "findings.md"]


def test_a_run_that_stopped_before_its_end_is_reported_with_what_is_missing(tmp_path):
    run = write_run(tmp_path / "run")
    data = json.loads((run / "results.json").read_text())
    data.update(complete=False, pending=["cclip-r5"], error="the disk caught fire")
    (run / "results.json").write_text(json.dumps(data))
    markdown = (write_report(run) / "report.md").read_text()
    assert "stopped before its end (the disk caught fire)" in markdown and "these are missing: cclip-r5" in markdown
