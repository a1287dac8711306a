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

import numpy as np

from fedmerge.errors import FedmergeError
from fedmerge.files import check_output_dir, write_tree
from fedmerge.report import figures, records
from fedmerge.report.load import MANIFEST, RESULTS, Collection, covered, load_runs
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
    items: list[str] = field(default_factory=list)  # a bulleted list under the text


@dataclass
class Report:
    title: str
    intro: str
    sections: list[Section]


def _number(value, digits: int = 3) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "–"
    if isinstance(value, float):
        return (
            f"{value:.{digits}g}" if abs(value) >= 1e3 or (value != 0 and abs(value) < 1e-3) else f"{value:.{digits}f}"
        )
    return str(value)


def _over_seeds(values) -> str:
    """One value, or the range of its values over seeds (``0.3–0.5``); ``–`` when there is none."""
    values = [v for v in values if v is not None]
    if not values:
        return "–"
    if not all(isinstance(v, (int, float)) for v in values):
        return "/".join(dict.fromkeys(str(v) for v in values))
    low, high = min(values), max(values)
    return _number(low) if low == high else f"{_number(low)}–{_number(high)}"


def _join(values) -> str:
    return ", ".join(dict.fromkeys(str(v) for v in values))


def _metric_cell(stat: dict, key: str) -> str:
    """Mean ± interval over seeds; a setting with a diverged seed shows that instead of a number."""
    if stat.get("diverged"):
        return "diverged" + (f" ({stat['diverged']}/{stat['n']} seeds)" if stat["n"] > 1 else "")
    return format_ci(stat[key], stat[f"{key}_ci"])


def worse_key(table: list[dict]) -> str:
    """The metric on which a setting's model is worse than θ0 (as `fedmerge run`'s table): normalized accuracy for
    suites scored by accuracy, else mean loss."""
    return "mean_normalized_accuracy" if any(r["metric"] == "accuracy" for r in table) else "mean_loss"


def summary_table(table: list[dict], metric_keys: list[str]) -> Table:
    """Per setting: θ0 and the clients' own models, then every strategy and round count (means over seeds); ✗ marks
    a strategy worse than θ0; λ, β and the rule's tuned parameter with how each was set."""
    columns = [
        "setting",
        "model",
        "rounds",
        "seeds",
        *(records.METRICS[m] for m in metric_keys),
        "λ (method's own)",
        "β (server lr applied)",
        "rule parameter (tuned or given)",
    ]
    rows = []
    for group in records.varying(table, "group"):
        here = records.select(table, group=group)
        worse = worse_key(here)
        references = records.aggregate(
            records.one_per_run(here),
            ("group",),
            [f"{p}_{m}" for p in records.BASELINES for m in {*metric_keys, worse}],
        )[0]
        for prefix, name in records.BASELINES.items():
            rows.append(
                [
                    group,
                    name,
                    "–",
                    str(references["n"]),
                    *(format_ci(references[f"{prefix}_{m}"], references[f"{prefix}_{m}_ci"]) for m in metric_keys),
                    "",
                    "",
                    "",
                ]
            )
        theta0 = references[f"theta0_{worse}"]
        for stat in records.aggregate(here, ("strategy", "rounds"), [*metric_keys, worse]):
            members = records.select(here, strategy=stat["strategy"], rounds=stat["rounds"])
            below = stat["diverged"] or (stat[worse] > theta0 if worse == "mean_loss" else stat[worse] < theta0)
            rows.append(
                [
                    group,
                    stat["strategy"] + (" ✗" if below else ""),
                    str(stat["rounds"]),
                    str(stat["n"]),
                    *(_metric_cell(stat, m) for m in metric_keys),
                    _scaling_cell(members),
                    _over_seeds(m["server_lr"] for m in members),
                    _tuned_cell(members),
                ]
            )
    return Table(columns, rows)


SUMMARY_TEXT = (
    "Final test metrics: means over a setting's seeds, ± a 95% Student-t interval over seeds where it has two or more. "
    "θ0 is the pretrained model before any merging; the clients' own models are their fine-tunes θ0 + τ_t, each scored "
    "on its own task (normalized accuracy 1 by definition). ✗: worse than θ0 (on normalized accuracy, or on mean loss "
    "for suites scored by loss), or diverged (non-finite outputs: never shown as a number). λ is each method's own "
    "scale: (sum) θ0 + λ·Σ_t τ_t, Task Arithmetic's convention, β = λ·T; (mean) θ0 + λ·Δ, TIES's convention, β = λ. "
    "β is the server learning rate applied to the mean-scale update Δ (θ ← θ + β·Δ); multi-round runs have β only. "
    "(validation): chosen on the validation split by the one-shot search; (given): set in the spec and kept. a–b: the "
    "values over seeds."
)


def _scaling_cell(members: list[dict]) -> str:
    """λ over a strategy's seeds, with its scale and how it was set (results without a scale had Task Arithmetic's)."""
    first = members[0]
    if first["scaling"] is None:
        return "–"
    return f"{_over_seeds(m['scaling'] for m in members)} ({first['scale'] or 'sum'}, {first['scaling_how']})"


def _tuned_cell(members: list[dict]) -> str:
    """The rule's tuned or given parameters over a strategy's seeds, each with how it was set."""
    tuned = members[0]["tuned"]
    return (
        "; ".join(
            f"{key}={_over_seeds(m['tuned'].get(key, (None,))[0] for m in members)} ({how})"
            for key, (_, how) in tuned.items()
        )
        or "–"
    )


def differs_table(collection: Collection) -> Table | None:
    """The spec keys that differ between settings, one row per setting (None with one setting)."""
    if len(collection.groups) < 2:
        return None
    axes = list(collection.groups[0].levels)
    keys = [key for key in collection.groups[0].differs if key not in axes]
    shorten = lambda text: text if len(text) <= 40 else text[:39] + "…"
    return Table(
        ["setting", *axes, *keys],
        [[g.label, *(g.levels[a] for a in axes), *(shorten(g.differs[k]) for k in keys)] for g in collection.groups],
    )


def merged_table(collection: Collection) -> Table:
    """Per setting: its seeds, suite and clients, the tensors the rules merged, and how normalisation statistics and
    LoRA adapters were handled (``not recorded`` for results older than these fields)."""
    rows = []
    for group in collection.groups:
        data = [run.data for run in group.runs]
        rows.append(
            [
                group.label,
                ", ".join(map(str, group.seeds)),
                _join(d["suite"].get("name") for d in data),
                _join(len(d.get("clients", [])) for d in data),
                _join(_tensors(d) for d in data),
                _join(_recorded(d, "statistics", "none in the model") for d in data),
                _join(_recorded(d, "lora", "no LoRA adapters") for d in data),
            ]
        )
    return Table(
        [
            "setting",
            "seeds",
            "suite",
            "clients T",
            "tensors: shared (merged) / private / statistics",
            "normalisation statistics",
            "LoRA aggregation",
        ],
        rows,
    )


def _tensors(data: dict) -> str:
    counts = data.get("tensors")
    return f"{counts['shared']} / {counts['private']} / {counts['statistics']}" if counts else "not recorded"


def _recorded(data: dict, key: str, none: str) -> str:
    if key not in data:
        return "not recorded"
    return none if data[key] is None else str(data[key])


MERGED_TEXT = (
    "Runs are grouped by their whole spec except the seed: a setting's runs differ only by their seed, and only they "
    "are averaged. The rules merge the shared tensors; each client's private tensors (its head) stay as it trained "
    "them; normalisation statistics (BatchNorm's) are never merged as task vectors but re-estimated on the clients' "
    "data for the merged model (reestimate), averaged (average) or kept from θ0 (theta0). LoRA aggregation: dense "
    "merges each layer's (α/r)·B·A through the rule (exact); factors merges A and B apart."
)


def diagnostics_table(table: list[dict]) -> Table:
    """Per setting, means over seeds: ζ², mean cosine, χ²(p‖w) of the first round (and which round that is), spreads."""
    stats = records.aggregate(
        records.one_per_run(table),
        ("group",),
        ["zeta2", "mean_cosine", "first_round_chi_square", "lr_spread", "steps_spread", "alpha", "corrupted"],
    )
    columns = [
        "setting",
        "ζ² (data het.)",
        "mean cos(τ_s, τ_t)",
        "χ²(p‖w), first round (training het.)",
        "χ² from",
        "lr spread",
        "step spread",
        "Dirichlet α",
        "corrupted f",
    ]
    sources = lambda group: (
        _join(r["first_round_source"] for r in records.select(table, group=group) if r["first_round_source"]) or "–"
    )
    rows = [
        [
            s["group"],
            *(format_ci(s[k], s[f"{k}_ci"]) for k in ("zeta2", "mean_cosine", "first_round_chi_square")),
            sources(s["group"]),
            *(_number(s[k], 3) for k in ("lr_spread", "steps_spread", "alpha", "corrupted")),
        ]
        for s in stats
    ]
    return Table(columns, rows)


def task_table(collection: Collection) -> Table | None:
    if len(collection.runs) != 1:
        return None
    data = collection.runs[0].data
    key = "normalized_accuracy" if data["suite"].get("metric") == "accuracy" else "loss"
    entries = [(f"{e['strategy']} r{e['rounds']}", {t["task"]: t for t in e["final"]["tasks"]}) for e in data["runs"]]
    tasks = list(data["suite"].get("tasks", []))
    columns = [f"task ({key.replace('_', ' ')})", *(name for name, _ in entries)]
    if len(tasks) > records.DETAIL_LIMIT:
        return Table(columns, _task_quantiles(tasks, [values for _, values in entries], key))
    cell = lambda t: "diverged" if t.get("diverged") else _number(t.get(key))
    rows = [[task, *(cell(values.get(task, {})) for _, values in entries)] for task in tasks]
    return Table(columns, rows)


TASK_QUANTILES = {"min": 0.0, "10%": 0.1, "25%": 0.25, "median": 0.5, "75%": 0.75, "90%": 0.9, "max": 1.0}


def _task_quantiles(tasks: list[str], entries: list[dict], key: str) -> list[list[str]]:
    """Many tasks: the distribution of each model's per-task ``key`` over the tasks it scored (quantiles), and how
    many tasks it did not (diverged or missing); the per-task values are in ``tasks.csv``."""
    scores = [
        [float(v[t][key]) for t in tasks if t in v and not v[t].get("diverged") and v[t].get(key) is not None]
        for v in entries
    ]
    rows = [
        [f"{name} of {len(tasks)} tasks", *(_number(float(np.quantile(s, q))) if s else "–" for s in scores)]
        for name, q in TASK_QUANTILES.items()
    ]
    return rows + [["not scored (diverged or missing)", *(str(len(tasks) - len(s)) for s in scores)]]


def warnings(collection: Collection) -> list[str]:
    """What a reader must know before trusting the numbers: repeated seeds left out, runs that stopped before their
    end, diverged runs, and clients whose own model is no better than θ0 (normalized accuracy divides by it)."""
    lines = []
    for left, kept in collection.repeats:
        same = [e["final"] for e in left.data["runs"]] == [e["final"] for e in kept.data["runs"]]
        lines.append(
            f"{left.path} repeats {kept.path} (same settings, seed {kept.seed}): the same seed gives the same "
            f"numbers, so they are one sample, not two seeds; the newer, {kept.path.name}, is kept"
            + ("." if same else "; their results differ (made by other code?).")
        )
    for group in collection.groups:
        for run in sorted(group.runs, key=lambda r: r.seed):
            where = f"{group.label}, seed {run.seed}"
            if run.data.get("complete") is False:
                pending = ", ".join(run.data.get("pending", [])) or "nothing listed"
                lines.append(
                    f"{where}: {run.path} stopped before its end ({run.data.get('error', 'no reason recorded')}); "
                    f"its finished runs are reported, these are missing: {pending}."
                )
            for entry in run.data["runs"]:
                if entry["final"].get("diverged"):
                    lines.append(
                        f"{where}: {entry['strategy']} ({entry['rounds']} round(s)) diverged on "
                        f"{', '.join(entry['final']['diverged'])} (non-finite outputs); shown as diverged."
                    )
            theta0 = run.data.get("pretrained", {}).get("tasks", [])
            for client in records.weak_clients(run.data):
                base = next((t.get("accuracy") for t in theta0 if t.get("task") == client.get("task")), None)
                lines.append(
                    f"{where}: client {client['id']}'s own model ({client.get('task')}) is no better than θ0 on "
                    f"its own task ({_number(records.own_test(client, 'accuracy'))} against θ0's {_number(base)}); "
                    "normalized accuracy divides by it, so scores on that task are inflated."
                )
    return lines


def build_report(collection: Collection) -> Report:
    table = records.rows(collection)
    if not table:
        raise FedmergeError(f"the results in {collection.root} hold no strategy runs; nothing to report.")
    accuracy = any(r["metric"] == "accuracy" for r in table)
    main = "mean_normalized_accuracy" if accuracy else "distance_to_optimum"
    metric_keys = ["mean_normalized_accuracy", "mean_accuracy"] if accuracy else ["mean_loss", "distance_to_optimum"]
    metric_keys = [
        m for m in metric_keys if any(r.get(m) is not None or r.get(f"theta0_{m}") is not None for r in table)
    ]
    seeds = sorted({r["seed"] for r in table})
    suites = sorted({r["suite"] for r in table})
    intro = (
        f"{len(collection.runs)} run(s) in {len(collection.groups)} setting(s) on {', '.join(suites)}; seeds "
        f"{', '.join(map(str, seeds))}. A setting is one spec; its runs differ only by their seed. Test-split "
        "metrics; normalized accuracy is a model's accuracy on task t divided by client t's own fine-tuned model's, "
        "averaged over tasks."
    )
    if collection.missing:
        intro += f" {len(collection.missing)} sweep cell(s) have no results yet and are left out."
    sections = []
    notes = warnings(collection)
    if notes:
        sections.append(Section("Warnings", "Read these before the numbers.", items=notes))
    summary = Section("Summary", SUMMARY_TEXT, [summary_table(table, metric_keys)])
    per_task = task_table(collection)
    if per_task:
        summary.tables.append(per_task)
    sections.append(summary)
    settings = [table for table in (differs_table(collection), merged_table(collection)) if table]
    sections.append(Section("Settings", MERGED_TEXT, settings))

    rounds_figure = figures.per_round(collection, main)
    compare = figures.one_shot_vs_multi_round(table, main)
    if rounds_figure or compare:
        sections.append(
            Section(
                "Rounds",
                "Federated learning round by round, and one-shot merging against R rounds at the same local compute.",
                figures=[f for f in (rounds_figure, compare) if f],
            )
        )
    factor_figures = heterogeneity_figures(collection, table, main, accuracy)
    if factor_figures:
        sections.append(
            Section(
                "Heterogeneity",
                "Each strategy against the levels this collection varies, one panel per "
                "combination of the other settings: nothing is averaged across settings.",
                figures=factor_figures,
            )
        )
    diag_figures = [f for f in (figures.cosine_heatmap(collection), figures.effective_weights(collection)) if f]
    sections.append(
        Section(
            "Diagnostics",
            "Data heterogeneity ζ² (at θ0), task-vector similarity, training heterogeneity "
            "χ²(p‖w) of the first round (of the strategy run named in 'χ² from', the round the "
            "effective-weights figure draws), and the spreads the clients were given; means over seeds.",
            [diagnostics_table(table)],
            diag_figures,
        )
    )
    return Report(f"fedmerge report: {collection.title}", intro, sections)


def heterogeneity_figures(collection: Collection, table: list[dict], main: str, accuracy: bool) -> list[figures.Figure]:
    """The metric against every factor that varies, then against each sweep axis the factor figures do not cover."""
    drawn, keys = [], []
    for factor in records.FACTORS:
        figure = figures.against(table, factor, "mean_accuracy" if factor == "corrupted" and accuracy else main)
        if figure:
            drawn.append(figure)
            keys.extend(records.FACTOR_KEYS[factor])
    for axis in collection.manifest["axes"] if collection.manifest else []:
        if axis["name"] not in collection.axes or all(covered(key, keys) for key in axis["keys"]):
            continue
        corruption = any(key.startswith("training.corruption") for key in axis["keys"])
        metric = "mean_accuracy" if corruption and accuracy else main
        figure = figures.against_levels(table, axis["name"], axis["labels"], metric)
        if figure:
            drawn.append(figure)
    return drawn


# -- rendering --------------------------------------------------------------------------------------
def _md_table(table: Table) -> str:
    escape = lambda cell: str(cell).replace("|", "\\|")
    lines = ["| " + " | ".join(map(escape, table.columns)) + " |", "|" + "---|" * len(table.columns)]
    lines += ["| " + " | ".join(map(escape, row)) + " |" for row in table.rows]
    return "\n".join(lines)


def to_markdown(report: Report, figure_dir: str = "figures") -> str:
    parts = [f"# {report.title}", "", report.intro, ""]
    for section in report.sections:
        parts += [f"## {section.title}", "", section.text, ""]
        if section.items:
            parts += [*(f"- {item}" for item in section.items), ""]
        for table in section.tables:
            parts += [_md_table(table), ""]
        for figure in section.figures:
            parts += [f"![{figure.caption}]({figure_dir}/{figure.name})", "", f"*{figure.caption}*", ""]
    return "\n".join(parts)


STYLE = """body{font-family:system-ui,sans-serif;max-width:1150px;margin:2em auto;padding:0 1em;color:#222}
table{border-collapse:collapse;margin:1em 0;font-size:0.9em}th,td{border:1px solid #ccc;padding:4px 8px;text-align:right}
th{background:#f0f0f0}td:first-child,th:first-child{text-align:left}img{max-width:100%}figcaption{color:#555;font-size:0.9em}"""


def to_html(report: Report, images: dict[str, bytes]) -> str:
    out = [
        f"<!doctype html><html><head><meta charset='utf-8'><title>{html.escape(report.title)}</title>",
        f"<style>{STYLE}</style></head><body><h1>{html.escape(report.title)}</h1><p>{html.escape(report.intro)}</p>",
    ]
    for section in report.sections:
        out.append(f"<h2>{html.escape(section.title)}</h2><p>{html.escape(section.text)}</p>")
        if section.items:
            out.append("<ul>" + "".join(f"<li>{html.escape(item)}</li>" for item in section.items) + "</ul>")
        for table in section.tables:
            out.append("<table><tr>" + "".join(f"<th>{html.escape(c)}</th>" for c in table.columns) + "</tr>")
            out += ["<tr>" + "".join(f"<td>{html.escape(str(c))}</td>" for c in row) + "</tr>" for row in table.rows]
            out.append("</table>")
        for figure in section.figures:
            data = base64.b64encode(images[figure.name]).decode()
            out.append(
                f"<figure><img alt='{html.escape(figure.caption)}' src='data:image/png;base64,{data}'>"
                f"<figcaption>{html.escape(figure.caption)}</figcaption></figure>"
            )
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
    return (
        not figure_dir.exists()
        or figure_dir.is_dir()
        and all(p.suffix == ".png" and p.is_file() for p in figure_dir.iterdir())
    )


def check_out(out: Path, collection: Collection, force: bool = False) -> None:
    """Refuse a report output that would lose something: the reported results or a folder above them, the current
    directory, a file, a results directory, or (unless ``force``) a non-empty folder that is no report."""
    out = Path(out)
    where, here = out.resolve(), Path.cwd().resolve()
    for source in (collection.root, *(run.path for run in collection.runs)):
        if where == source.resolve() or where in source.resolve().parents:
            what = "the results directory" if where == source.resolve() else "a folder above the results directory"
            raise FedmergeError(
                f"--out {out} is {what} {source} being reported; the report would replace the results. "
                f"Give a folder of its own, e.g. --out {collection.root / 'report'}."
            )
    if where == here or where in here.parents:
        raise FedmergeError(
            f"--out {out} is the current directory{'' if where == here else ' or a folder above it'}; "
            "give a folder of its own for the report, e.g. --out report."
        )
    check_output_dir(out, "--out")
    if not where.is_dir() or is_report(where) or not any(where.iterdir()):
        return
    held = [name for name in (RESULTS, MANIFEST) if (where / name).exists()]
    if held:
        raise FedmergeError(
            f"--out {out} holds results ({held[0]}); a report never replaces them. Give another folder."
        )
    inside = next(
        (
            source
            for source in (collection.root, *(run.path for run in collection.runs))
            if source.resolve() in where.parents
        ),
        None,
    )
    if inside is not None:
        raise FedmergeError(
            f"--out {out} is a folder of the results {inside} (not a report); a report never replaces "
            f"part of the results. Give a new folder, e.g. --out {collection.root / 'report'}."
        )
    if not force:
        names = sorted(p.name for p in where.iterdir())
        raise FedmergeError(
            f"--out {out} exists and is not a fedmerge report (it holds {', '.join(names[:3])}"
            f"{', ...' if len(names) > 3 else ''}); give a new folder, or pass --force to replace it whole."
        )


def write_report(directory: str | Path, out: str | Path | None = None, force: bool = False) -> Path:
    """Load the results under ``directory`` and write its report (default ``directory/report``); return the path.

    Replaces ``out`` only when it is a previous report (or, with ``force``, a folder of other files); see :func:`check_out`.
    """
    collection = load_runs(directory)
    out = Path(out) if out else Path(directory) / "report"
    check_out(out, collection, force)
    target = Path(os.path.abspath(out))
    return write_tree(target, render(build_report(collection)), replace=target.exists())
