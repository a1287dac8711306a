"""A report as Markdown (figures as PNG files beside it) and as self-contained HTML (figures embedded).

:func:`build_report` turns a :class:`~fedmerge.report.load.Collection` into sections of text, tables and
figures; :func:`write_report` renders them and writes the report directory atomically (a staging
directory, then a rename). It replaces only a previous report (:func:`is_report`); anything else at the
output path is refused (:func:`check_out`) before anything is written.
"""

from __future__ import annotations

import base64
import html
import io
import math
import os
from dataclasses import dataclass, field
from pathlib import Path

from fedmerge.errors import FedmergeError
from fedmerge.files import check_output_dir, write_tree
from fedmerge.report import figures, records
from fedmerge.report.load import MANIFEST, RESULTS, Collection, load_runs
from fedmerge.report.stats import format_ci


@dataclass
class Table:
    columns: list[str]
    rows: list[list[str]]


@dataclass
class Section:
    title: str
    text: str = ""
    tables: list[Table] = field(default_factory=list)
    figures: list[figures.Figure] = field(default_factory=list)


@dataclass
class Report:
    title: str
    intro: str
    sections: list[Section]


def _number(value, digits: int = 3) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "–"
    if isinstance(value, float):
        return f"{value:.{digits}g}" if abs(value) >= 1e3 or (value != 0 and abs(value) < 1e-3) else f"{value:.{digits}f}"
    return str(value)


def summary_table(table: list[dict], metric_keys: list[str]) -> Table:
    stats = records.aggregate(table, ("group", "strategy", "rounds"), [*metric_keys, "scaling", "server_lr", "rho"])
    columns = ["setting", "strategy", "rounds", "seeds", *(records.METRICS[m] for m in metric_keys),
               "λ (TA scale)", "β (server lr)", "ρ"]
    rows = [[s["group"], s["strategy"], str(s["rounds"]), str(s["n"]),
             *(format_ci(s[m], s[f"{m}_ci"]) for m in metric_keys),
             _number(s["scaling"]), _number(s["server_lr"]), _number(s["rho"])] for s in stats]
    return Table(columns, rows)


def diagnostics_table(table: list[dict]) -> Table | None:
    one_per_run = {row["source"]: row for row in table}.values()
    stats = records.aggregate(list(one_per_run), ("group",), ["zeta2", "mean_cosine", "chi_square", "lr_spread",
                                                              "steps_spread", "alpha", "corrupted"])
    columns = ["setting", "ζ² (data het.)", "mean cos(τ_s, τ_t)", "χ²(p‖w) (training het.)", "lr spread", "step spread",
               "Dirichlet α", "corrupted f"]
    rows = [[s["group"], *(format_ci(s[k], s[f"{k}_ci"]) for k in ("zeta2", "mean_cosine", "chi_square")),
             *(_number(s[k], 3) for k in ("lr_spread", "steps_spread", "alpha", "corrupted"))] for s in stats]
    return Table(columns, rows)


def task_table(collection: Collection) -> Table | None:
    if len(collection.runs) != 1:
        return None
    data = collection.runs[0].data
    key = "normalized_accuracy" if data["suite"].get("metric") == "accuracy" else "loss"
    entries = [(f"{e['strategy']} r{e['rounds']}", {t["task"]: t.get(key) for t in e["final"]["tasks"]}) for e in data["runs"]]
    tasks = list(data["suite"].get("tasks", []))
    rows = [[task, *(_number(values.get(task)) for _, values in entries)] for task in tasks]
    return Table([f"task ({key.replace('_', ' ')})", *(name for name, _ in entries)], rows)


def build_report(collection: Collection) -> Report:
    table = records.rows(collection)
    if not table:
        raise FedmergeError(f"the results in {collection.root} hold no strategy runs; nothing to report.")
    accuracy = any(r["metric"] == "accuracy" for r in table)
    main = "mean_normalized_accuracy" if accuracy else "distance_to_optimum"
    metric_keys = ["mean_normalized_accuracy", "mean_accuracy"] if accuracy else ["mean_loss", "distance_to_optimum"]
    metric_keys = [m for m in metric_keys if any(r.get(m) is not None for r in table)]
    seeds = sorted({r["seed"] for r in table})
    suites = sorted({r["suite"] for r in table})
    intro = (f"{len(collection.runs)} run(s) on {', '.join(suites)}; seeds {', '.join(map(str, seeds))}. "
             "Test-split metrics; normalized accuracy is the merged model's accuracy on task t divided by client t's own "
             "fine-tuned model's, averaged over tasks. λ is Task Arithmetic's scale (θ0 + λ Σ τ_t), β the server learning "
             "rate of the mean-scale update (θ ← θ + β Δ); β = λ·T. "
             + ("Means over seeds with 95% t-intervals (±)." if len(seeds) > 1 else ""))
    if collection.missing:
        intro += f" {len(collection.missing)} sweep cell(s) have no results yet and are left out."
    sections = [Section("Summary", "Final test metrics of every strategy and round count.", [summary_table(table, metric_keys)])]
    per_task = task_table(collection)
    if per_task:
        sections[0].tables.append(per_task)

    shown = []
    rounds_figure = figures.per_round(collection, main)
    compare = figures.one_shot_vs_multi_round(table, main)
    if rounds_figure or compare:
        sections.append(Section("Rounds", "Federated learning round by round, and one-shot merging against R rounds at the "
                                "same local compute.", figures=[f for f in (rounds_figure, compare) if f]))
    factor_figures, drawn = [], []
    for factor in records.FACTORS:
        metric = "mean_accuracy" if factor == "corrupted" and accuracy else main
        figure = figures.against(table, factor, metric)
        if figure:
            factor_figures.append(figure)
            shown.extend(records.FACTOR_KEYS[factor])
            drawn.append(factor)
    for axis in collection.axes:
        keys = next((a["keys"] for a in collection.manifest["axes"] if a["name"] == axis), [axis])
        levels = records.varying(table, f"level:{axis}")
        resolved = {tuple(r.get(f) for f in drawn) for r in table if r.get(f"level:{axis}") is not None}
        if all(k in shown for k in keys) and len(resolved) >= len(levels):
            continue  # the factor figures already tell this axis's levels apart
        labels = next(a["labels"] for a in collection.manifest["axes"] if a["name"] == axis)
        figure = figures.against_levels(table, axis, labels, "mean_accuracy" if any(
            k.startswith("training.corruption") for k in keys) and accuracy else main)
        if figure:
            factor_figures.append(figure)
    if factor_figures:
        sections.append(Section("Heterogeneity", "Each strategy against the levels this collection varies.",
                                figures=factor_figures))
    diagnostics = diagnostics_table(table)
    diag_figures = [f for f in (figures.cosine_heatmap(collection), figures.effective_weights(collection)) if f]
    sections.append(Section("Diagnostics", "Data heterogeneity ζ² (at θ0), task-vector similarity, training heterogeneity "
                            "χ²(p‖w) of the first round, and the spreads the clients were given.",
                            [diagnostics] if diagnostics else [], diag_figures))
    return Report(f"fedmerge report: {collection.title}", intro, sections)


# -- rendering --------------------------------------------------------------------------------------
def _md_table(table: Table) -> str:
    escape = lambda cell: str(cell).replace("|", "\\|")  # noqa: E731
    lines = ["| " + " | ".join(map(escape, table.columns)) + " |", "|" + "---|" * len(table.columns)]
    lines += ["| " + " | ".join(map(escape, row)) + " |" for row in table.rows]
    return "\n".join(lines)


def to_markdown(report: Report, figure_dir: str = "figures") -> str:
    parts = [f"# {report.title}", "", report.intro, ""]
    for section in report.sections:
        parts += [f"## {section.title}", "", section.text, ""]
        for table in section.tables:
            parts += [_md_table(table), ""]
        for figure in section.figures:
            parts += [f"![{figure.caption}]({figure_dir}/{figure.name})", "", f"*{figure.caption}*", ""]
    return "\n".join(parts)


STYLE = """body{font-family:system-ui,sans-serif;max-width:1150px;margin:2em auto;padding:0 1em;color:#222}
table{border-collapse:collapse;margin:1em 0;font-size:0.9em}th,td{border:1px solid #ccc;padding:4px 8px;text-align:right}
th{background:#f0f0f0}td:first-child,th:first-child{text-align:left}img{max-width:100%}figcaption{color:#555;font-size:0.9em}"""


def to_html(report: Report, images: dict[str, bytes]) -> str:
    out = [f"<!doctype html><html><head><meta charset='utf-8'><title>{html.escape(report.title)}</title>",
           f"<style>{STYLE}</style></head><body><h1>{html.escape(report.title)}</h1><p>{html.escape(report.intro)}</p>"]
    for section in report.sections:
        out.append(f"<h2>{html.escape(section.title)}</h2><p>{html.escape(section.text)}</p>")
        for table in section.tables:
            out.append("<table><tr>" + "".join(f"<th>{html.escape(c)}</th>" for c in table.columns) + "</tr>")
            out += ["<tr>" + "".join(f"<td>{html.escape(str(c))}</td>" for c in row) + "</tr>" for row in table.rows]
            out.append("</table>")
        for figure in section.figures:
            data = base64.b64encode(images[figure.name]).decode()
            out.append(f"<figure><img alt='{html.escape(figure.caption)}' src='data:image/png;base64,{data}'>"
                       f"<figcaption>{html.escape(figure.caption)}</figcaption></figure>")
    out.append("</body></html>")
    return "\n".join(out)


def render(report: Report) -> dict[str, bytes]:
    """Every file of the report directory: report.md, report.html, figures/*.png."""
    images = {}
    for section in report.sections:
        for figure in section.figures:
            buffer = io.BytesIO()
            figure.save(buffer)
            images[figure.name] = buffer.getvalue()
    files = {f"figures/{name}": data for name, data in images.items()}
    files["report.md"] = to_markdown(report).encode()
    files["report.html"] = to_html(report, images).encode()
    return files


REPORT_FILES = ("report.md", "report.html")


def is_report(path: Path) -> bool:
    """Whether ``path`` holds exactly what :func:`render` writes: report.md, report.html and figures/*.png."""
    path = Path(path)
    if not path.is_dir() or not all((path / name).is_file() for name in REPORT_FILES):
        return False
    figure_dir = path / "figures"
    if not {p.name for p in path.iterdir()} <= {*REPORT_FILES, "figures"}:
        return False
    return not figure_dir.exists() or figure_dir.is_dir() and all(p.suffix == ".png" and p.is_file() for p in figure_dir.iterdir())


def check_out(out: Path, collection: Collection, force: bool = False) -> None:
    """Refuse a report output that would lose something: the reported results or a folder above them, the current
    directory, a file, a results directory, or (unless ``force``) a non-empty folder that is no report."""
    out = Path(out)
    where, here = out.resolve(), Path.cwd().resolve()
    for source in (collection.root, *(run.path for run in collection.runs)):
        if where == source.resolve() or where in source.resolve().parents:
            what = "the results directory" if where == source.resolve() else "a folder above the results directory"
            raise FedmergeError(f"--out {out} is {what} {source} being reported; the report would replace the results. "
                                f"Give a folder of its own, e.g. --out {collection.root / 'report'}.")
    if where == here or where in here.parents:
        raise FedmergeError(f"--out {out} is the current directory{'' if where == here else ' or a folder above it'}; "
                            "give a folder of its own for the report, e.g. --out report.")
    check_output_dir(out, "--out")
    if not where.is_dir() or is_report(where) or not any(where.iterdir()):
        return
    held = [name for name in (RESULTS, MANIFEST) if (where / name).exists()]
    if held:
        raise FedmergeError(f"--out {out} holds results ({held[0]}); a report never replaces them. Give another folder.")
    inside = next((source for source in (collection.root, *(run.path for run in collection.runs))
                   if source.resolve() in where.parents), None)
    if inside is not None:
        raise FedmergeError(f"--out {out} is a folder of the results {inside} (not a report); a report never replaces "
                            f"part of the results. Give a new folder, e.g. --out {collection.root / 'report'}.")
    if not force:
        names = sorted(p.name for p in where.iterdir())
        raise FedmergeError(f"--out {out} exists and is not a fedmerge report (it holds {', '.join(names[:3])}"
                            f"{', ...' if len(names) > 3 else ''}); give a new folder, or pass --force to replace it whole.")


def write_report(directory: str | Path, out: str | Path | None = None, force: bool = False) -> Path:
    """Load the results under ``directory`` and write its report (default ``directory/report``); return the path.

    Replaces ``out`` only when it is a previous report (or, with ``force``, a folder of other files); see :func:`check_out`.
    """
    collection = load_runs(directory)
    out = Path(out) if out else Path(directory) / "report"
    check_out(out, collection, force)
    target = Path(os.path.abspath(out))
    return write_tree(target, render(build_report(collection)), replace=target.exists())
