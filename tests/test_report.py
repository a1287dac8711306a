"""fedmerge report on small synthetic results directories (no Ray)."""

import json
import math
import os
import re
import stat

import pytest
from scipy import stats

from fedmerge.cli import main
from fedmerge.errors import FedmergeError
from fedmerge.report import figures, load_runs, write_report
from fedmerge.report.findings import claim_training_heterogeneity, write_findings, write_page
from fedmerge.report.records import aggregate, rows
from fedmerge.report.stats import format_paired, mean_ci, paired, sign
from report_data import write_grid, write_run, write_sweep


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
    assert {"per-round.png", "one-shot-vs-multi-round.png", "cosine-similarity.png", "effective-weights.png"} <= set(figures)
    for name in figures:
        assert f"figures/{name}" in markdown
    assert html.count("data:image/png;base64,") == len(figures)
    assert not re.search(r"src=['\"](?!data:)", html), "the HTML must not reference outside files"
    assert "| setting | strategy | rounds |" in markdown and "fedavg" in markdown


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
    source, out = {"file": (run, tmp_path / "file"), "run": (run, run), "parent": (run, tmp_path / "runs"),
                   "cwd": (run, "."), "cwd-parent": (run, ".."), "sweep-cells": (sweep, sweep / "cells"),
                   "run-models": (run, run / "models")}[where]
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
    for figure in (bars, figures.per_round(load_runs(tmp_path / "sweep")), figures.against(table, "alpha", "mean_accuracy"),
                   figures.cosine_heatmap(load_runs(tmp_path / "sweep"))):
        fig = figure.figure
        fig.canvas.draw()
        renderer = fig.canvas.get_renderer()
        panels = [ax for ax in fig.axes if ax.get_visible() and ax.get_label() != "<colorbar>"]
        legends = [*fig.legends, *(ax.get_legend() for ax in panels if ax.get_legend())]
        for legend in legends:
            assert not any(legend.get_window_extent(renderer).overlaps(ax.get_window_extent(renderer)) for ax in panels), figure.name
        boxes = [ax.get_tightbbox(renderer) for ax in panels]
        assert not any(a.overlaps(b) for i, a in enumerate(boxes) for b in boxes[i + 1:]), figure.name


SEEDS5 = (0, 1, 2, 3, 4)


@pytest.mark.parametrize("ta_16x, nova_16x, verdict, wording", [
    (-0.1, -0.02, "reproduces", "recovers"),          # TA drops, FedNova beats TA in every seed
    (-0.1, -0.2, "partly", "widens the drop"),         # TA drops, FedNova below TA
    (0.0, 0.0, "does not reproduce", "changes nothing significant"),
])
def test_claim_2_is_decided_on_paired_intervals_over_seeds(tmp_path, ta_16x, nova_16x, verdict, wording):
    study = write_grid(tmp_path / "study", "spread", {
        "1x": {"strategies": ("fedavg", "fednova"), "rounds": (1,), "shift": {"fednova": -0.02}},
        "16x": {"strategies": ("fedavg", "fednova"), "rounds": (1,), "shift": {"fedavg": ta_16x, "fednova": nova_16x - 0.02}}},
        seeds=SEEDS5)
    claim = claim_training_heterogeneity(load_runs(study))
    assert claim.verdict == verdict and wording in claim.summary, claim.summary
    assert "5 seeds" in claim.summary
    table = claim.body[1].split("\n\n", 1)[1]
    assert "fednova − TA" in table and ("▲" in table) == (verdict == "reproduces")


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
    monkeypatch.setattr(os, "replace", lambda a, b: (_ for _ in ()).throw(OSError("disk full")) if str(b).endswith(".md")
                        else real(a, b))
    with pytest.raises(OSError):
        write_page([], out, {"total": 1}, tmp_path / "work")
    assert sorted(p.name for p in out.parent.iterdir()) == ["findings", "findings.md"]
