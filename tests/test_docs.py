"""Every example in README.md and docs/*.md is a test, or is listed here with why it is not run.

The fenced blocks are read from the pages themselves:

- ``console`` and ``sh`` blocks give commands (a ``$`` prompt, where a block has one, marks them; ``\\``
  continues a line; ``# ...`` is a comment). A ``fedmerge`` command that only reads or checks (``list``,
  ``--help``, ``--dry-run``, ``sweep --list``) or merges checkpoints runs as it is written, in one process, in a
  folder holding what the examples name (tiny checkpoints, and the files the docs write out: ``my_suite.py``,
  ``experiment.toml``, ``alpha-sweep.toml``), and the output lines a block shows under a command must come out
  (``…`` stands for anything). A command that would run for minutes is checked with ``--dry-run`` added
  (:data:`CHECKED_WITH_DRY_RUN`); the rest are in :data:`NOT_RUN`, each with its reason.
- ``python`` and ``toml`` blocks are run or loaded by the function :data:`SNIPPETS` gives them (found by a line
  of theirs), or listed there with why not. A Python expression whose comment starts with a literal
  (``fed.options  # {'images_per_kind': 60, ...}``) or names a value (``# β = 2.4: ...``) must give it, to the
  digits shown.

A block that none of these covers fails: a new example is run here or its reason is given.
"""

import ast
import importlib
import io
import re
import shlex
import shutil
import sys
import tokenize
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import pytest
import torch
from flwr.app import ArrayRecord, Context, RecordDict
from flwr.supercore.task_identity import TaskIdentity
from safetensors.torch import load_file, save_file

from fedmerge.cli import main
from fedmerge.clients.app import client_app
from fedmerge.errors import FedmergeError
from fedmerge.simulations.presets import load_experiment
from fedmerge.simulations.spec import Spec
from fedmerge.simulations.sweep import load_sweep
from fedmerge.tasks import load_suite
from replies import InProcessGrid

ROOT = Path(__file__).resolve().parents[1]
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
EXAMPLE = ROOT / "examples" / "custom-suite"


# -- reading the pages ------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Block:
    page: str  # relative to the repository
    line: int  # of the opening fence
    lang: str
    text: str

    def __str__(self) -> str:
        return f"{self.page}:{self.line}"


def blocks() -> list[Block]:
    found = []
    for path in PAGES:
        text = path.read_text()
        for match in re.finditer(r"^( *)```(\w*)\n(.*?)^\1```", text, re.S | re.M):
            indent = len(match.group(1))
            body = "".join(line[indent:] for line in match.group(3).splitlines(keepends=True))
            line = text.count("\n", 0, match.start()) + 1
            found.append(Block(str(path.relative_to(ROOT)), line, match.group(2), body))
    return found


@dataclass(frozen=True)
class Command:
    text: str  # as typed, comments and continuations removed
    where: str  # page:line where it first appears
    output: tuple[str, ...]  # the lines the page shows it printing


def commands() -> list[Command]:
    """Every distinct command of the console and sh blocks and the output shown under it."""
    found: dict[str, tuple[str, list[str]]] = {}
    for block in blocks():
        if block.lang not in ("console", "sh"):
            continue
        lines, start = [], None  # (page line, text), continued lines joined
        for number, line in enumerate(block.text.splitlines(), block.line + 1):
            if start is None:
                start, joined = number, ""
            joined += line.removesuffix("\\")
            if not line.endswith("\\"):
                lines.append((start, joined))
                start = None
        prompted = any(line.startswith("$ ") for _, line in lines)
        output = None
        for number, line in lines:
            if (not line.startswith("$ ")) if prompted else line.startswith("fedmerge: "):
                if output is not None and line.strip():
                    output.append(line.strip())
                continue
            text = " ".join(re.sub(r"(^|\s)# .*", "", line.removeprefix("$ ")).split())
            if text:
                output = found.setdefault(text, (f"{block.page}:{number}", []))[1]
    return [Command(text, where, tuple(output)) for text, (where, output) in found.items()]


# -- commands ---------------------------------------------------------------------------------------------------
CHECKED_WITH_DRY_RUN = {  # they run for minutes; --dry-run checks their command line, spec and suite, runs nothing
    "fedmerge run",
    "fedmerge run training-heterogeneity --rounds 1 10",
    "fedmerge run quadratic --strategy fedavg fednova",
    "fedmerge run experiment.toml",
    "cd examples/custom-suite && fedmerge run experiment.toml",
    "fedmerge sweep alpha-sweep.toml",
}

DOWNLOADS = "downloads from the Hugging Face Hub (nothing here is online)"
SHELL = "sets the shell's environment for the commands after it"
STUDIES = "runs every study: tens of minutes (tests/test_findings.py checks the page from synthetic results)"
NOT_RUN = {
    "make run": "sets up .venv and runs the default preset: minutes (`fedmerge run --dry-run` is checked here)",
    "make test": "this test suite",
    "fedmerge run my-study.toml --set seed=1 --set 'training.lr={geometric=[0.01, 0.1]}'": "the reader's own file",
    "fedmerge run my-study.toml --set clients=4 --set 'training.lr=[0.01, 0.02, 0.05, 0.1]'": "the reader's own file",
    "fedmerge sweep study.toml": "the reader's own sweep file",
    "fedmerge report results/default-20261122-101500": "needs a run's results (tests/test_report.py)",
    "fedmerge report results/quadratic-20250101-120000": "needs a run's results (tests/test_report.py)",
    "fedmerge report results/sweeps/alpha-sweep": "needs a sweep's results (tests/test_report.py)",
    "fedmerge report results/": "needs results (tests/test_report.py)",
    "fedmerge report results/sweeps/alpha-sweep --out my-report": "needs a sweep's results (tests/test_report.py)",
    "fedmerge evaluate clip-vit-b32-8task --base clip/ --models ft/cars ft/dtd ...": "needs CLIP and its 8 data sets",
    "fedmerge findings": STUDIES,
    "fedmerge findings --work results/studies --out docs/findings.md": STUDIES,
    "fedmerge findings --no-run": "needs the studies' results, and would rewrite docs/findings.md",
    "fedmerge findings --no-run --work results/studies --out docs/findings.md": "needs the studies' results, and "
    "would rewrite docs/findings.md",
    "fedmerge findings --work DIR --out FILE.md": "DIR and FILE.md are placeholders",
    "fedmerge merge --base llama-2-7b --models chat math code --method median --device cuda --out merged": "needs a GPU (the CUDA tests run it on tiny checkpoints)",
    "fedmerge run llm.toml --dry-run": "needs a language model and its task files (tests/test_causal_lm_suite.py "
    "runs the suite on a tiny Llama)",
    "fedmerge run llm.toml": "needs a language model, its task files and a GPU",
    "fedmerge evaluate my-llm.toml --base /models/base --models /ft/math /ft/code /ft/chat": "needs a language model "
    "and its fine-tunes",
    'fedmerge run causal-lm-lora --set \'suite_options.tasks=["/data/a.jsonl", "/data/b.jsonl", "/data/c.jsonl"]\'': "needs Qwen2.5-0.5B, task files and a GPU",
    'fedmerge run causal-lm-lora --set server.lora=stack --set \'strategies=["fedavg", "fednova"]\' '
    "--set 'suite_options.tasks=[…]'": "needs Qwen2.5-0.5B, task files and a GPU",
    "fedmerge run causal-lm-lora --set server.lora=factors --set 'suite_options.tasks=[…]'": "needs Qwen2.5-0.5B, "
    "task files and a GPU",
    'fedmerge run causal-lm-small --set \'suite_options.tasks=["/data/gsm8k.jsonl", "/data/math.jsonl", '
    '"/data/arith.jsonl"]\'': "needs Qwen2.5-0.5B, task files and a GPU",
    "hf download openai/clip-vit-base-patch32": DOWNLOADS,
    "hf download openai/clip-vit-base-patch32 --local-dir clip-vit-b32": DOWNLOADS,
    "for task in stanford-cars dtd eurosat gtsrb mnist resisc45 sun397 svhn; do": DOWNLOADS,
    "hf download meta-llama/Llama-2-13b-hf": DOWNLOADS,
    "hf download WizardLMTeam/WizardLM-13B-V1.2": DOWNLOADS,
    "hf download WizardLMTeam/WizardMath-13B-V1.0": DOWNLOADS,
    "hf download layoric/llama-2-13b-code-alpaca": DOWNLOADS,
    "export HF_HUB_OFFLINE=1": SHELL,
    "export FLWR_TELEMETRY_ENABLED=0": SHELL,
    "export FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION=1": SHELL,
    "export FEDMERGE_RESULTS=$PWD/results": SHELL,
    "export FEDMERGE_CACHE=~/.cache/fedmerge": SHELL,
    "fedmerge run clip-vit-b32-8task --dry-run --set suite_options.root=/data/clip": "needs CLIP's 8 data sets "
    "(tests/test_clip_suite.py)",
    "fedmerge run clip-vit-b32-8task --set suite_options.root=/data/clip": "needs CLIP, its data sets and a GPU",
    "fedmerge run clip-vit-b32-8task-heterogeneous --set suite_options.root=/data/clip": "needs CLIP, its data sets "
    "and a GPU",
    "fedmerge run clip-vit-b32-8task --set suite_options.root=/data/clip --set suite_options.max_examples=256 "
    "--set training.epochs=1 --set training.warmup_steps=0 --strategy fedavg": "needs CLIP and its data sets",
    "fedmerge evaluate clip-vit-b32-8task --set suite_options.root=/data/clip --set suite_options.model=clip-vit-b32 "
    "--set suite_options.train_projection=false --base clip-vit-b32 --models ft/stanford-cars ft/dtd ft/eurosat "
    "ft/gtsrb ft/mnist ft/resisc45 ft/sun397 ft/svhn": "needs CLIP's fine-tunes and data sets",
    "ray start --head --port 6379 --num-cpus 8": "a Ray cluster (tests/test_ray_cluster.py starts one on loopback)",
    "ray start --address HEAD:6379 --num-cpus 32": "a Ray cluster (tests/test_ray_cluster.py)",
    "fedmerge run my-study.toml --set engine.ray_address=HEAD:6379 --set engine.client_cpus=4": "a Ray cluster",
    'flwr run . local --stream --federation-config "num-supernodes=6 client-resources-num-cpus=1"': "Flower's local SuperLink: minutes (tests/test_deployment.py runs a SuperLink)",
    "flwr federation simulation-config @none/default local --num-supernodes 6 --client-resources-num-cpus 1": "changes the user's Flower configuration",
    'flwr run . local --stream --federation-config "num-supernodes=2" --run-config "clients=2 '
    "strategies='[\\\"fednova\\\"]' rounds='[1]' select=false training.steps='[5, 20]'\"": "Flower's local SuperLink: minutes (tests/test_deployment.py runs these overrides)",
    "flwr list local --run-id <RUN_ID> --format json": "needs a SuperLink and a run (tests/test_deployment.py)",
    "flwr log <RUN_ID> local --show": "needs a SuperLink and a run",
    "flower-superlink --insecure --host 0.0.0.0 --port 9093 --database superlink.db "
    "--disable-runtime-dependency-installation": "a server that runs until stopped (tests/test_deployment.py)",
    "flower-supernode --insecure --superlink SERVER:9093 --port 9094 --node-config "
    '"partition-id=0 num-partitions=2"': "a server that runs until stopped (tests/test_deployment.py)",
    "flower-supernode --insecure --superlink SERVER:9093 --port 9095 --node-config "
    '"partition-id=1 num-partitions=2 lr=0.05 steps=200"': "a server that runs until stopped",
    "flwr run . my-superlink --stream --run-config \"clients=2 strategies='[\\\"fednova\\\"]' rounds='[1]' "
    "select=false training.steps='[5, 20]'\"": "needs a deployed SuperLink (tests/test_deployment.py)",
    "flwr list my-superlink --run-id <RUN_ID> --format json": "needs a deployed SuperLink and a run",
}

IN_THE_EXAMPLE = {  # commands shown in examples/custom-suite (a copy of it)
    "fedmerge run experiment.toml --set suite_options.images_per_kind=0 --dry-run",
    "fedmerge run experiment.toml --set suite_options.colour=1 --dry-run",
}

CHECKPOINT_NAMES = (
    "base",
    "math",
    "code",
    "chat",
    "a",
    "b",
    "c",
    "llama-2-7b",
    "llama-2-7b-chat",
    "llama-2-7b-math",
    "llama-2-7b-code",
)
"""The models the merge examples name, as tiny Hugging Face directories of the tensors the examples read."""


def runs_as_written(argv: list[str]) -> bool:
    checks = "--help" in argv or "--dry-run" in argv or argv[1:] in (["list"], ["sweep", "--list"])
    return argv[0] == "fedmerge" and (checks or argv[1] == "merge")


def block_with(page: str, marker: str) -> Block:
    (block,) = [b for b in blocks() if b.page == page and marker in b.text]
    return block


EXAMPLE_MODULES = ("my_suite", "my_tasks", "own_checks")
"""The modules the examples import from their folders."""


@pytest.fixture
def isolated(monkeypatch, tmp_path_factory):
    """This process as it was after the test: sys.path, the examples' modules, the suite cache; FEDMERGE_CACHE in a
    temporary folder, shared by the module's tests."""
    monkeypatch.setattr(sys, "path", list(sys.path))
    monkeypatch.setenv("FEDMERGE_CACHE", str(tmp_path_factory.getbasetemp() / "docs-cache"))
    load_suite.cache_clear()
    importlib.invalidate_caches()  # "." on sys.path (as the examples put it) is another folder in each test
    yield
    load_suite.cache_clear()
    for name in EXAMPLE_MODULES:
        sys.modules.pop(name, None)


@pytest.fixture
def work(tmp_path, isolated):
    """The folder the examples run in: tiny checkpoints, and the files the docs give (my_suite.py, its
    experiment.toml, alpha-sweep.toml)."""
    for name in CHECKPOINT_NAMES:
        (tmp_path / name).mkdir()
        generator = torch.Generator().manual_seed(len(name))
        save_file(
            {
                "lm_head.weight": torch.randn(8, 4, generator=generator),
                "model.layers.0.mlp.up_proj.weight": torch.randn(6, 4, generator=generator),
            },
            tmp_path / name / "model.safetensors",
        )
    (tmp_path / "my_suite.py").write_text(block_with("docs/suites.md", "# my_suite.py").text)
    (tmp_path / "experiment.toml").write_text(block_with("docs/suites.md", "# experiment.toml").text)
    (tmp_path / "alpha-sweep.toml").write_text(block_with("docs/studies.md", 'name = "alpha-sweep"').text)
    return tmp_path


def example_copy(folder: Path) -> Path:
    """examples/custom-suite copied to ``folder`` (its images are drawn there)."""
    return shutil.copytree(EXAMPLE, folder / "custom-suite", ignore=shutil.ignore_patterns("data", "results"))


def fedmerge(argv: list[str], cwd: Path, monkeypatch, capsys) -> tuple[int, list[str]]:
    """``fedmerge argv`` in this process, in ``cwd``: its exit status and output lines."""
    monkeypatch.chdir(cwd)
    try:
        code = main(argv)
    except SystemExit as done:  # --help
        code = done.code
    captured = capsys.readouterr()
    return code, [line.strip() for line in (captured.out + captured.err).splitlines()]


def matches(expected: str, line: str) -> bool:
    return re.fullmatch(".*".join(map(re.escape, expected.split("…"))), line) is not None


@pytest.mark.parametrize("command", commands(), ids=lambda c: c.where)
def test_the_docs_commands_run_as_shown(command, work, monkeypatch, capsys):
    if command.text in NOT_RUN:
        pytest.skip(NOT_RUN[command.text])
    folder, text = work, command.text
    if text.startswith("cd examples/custom-suite && "):
        folder, text = example_copy(work), text.removeprefix("cd examples/custom-suite && ")
    if text in IN_THE_EXAMPLE:
        folder = example_copy(work)
    argv = shlex.split(text)
    if command.text in CHECKED_WITH_DRY_RUN:
        argv.append("--dry-run")
    else:
        assert runs_as_written(argv), f"{command.where}: run `{command.text}` here, or say in NOT_RUN why not"
    code, lines = fedmerge(argv[1:], folder, monkeypatch, capsys)
    expected_code = 2 if any(line.startswith("fedmerge: error:") for line in command.output) else 0
    assert code == expected_code, "\n".join(lines)
    rest = iter(lines)
    for expected in command.output:  # in order, each on a line of its own
        assert any(matches(expected, line) for line in rest), f"{expected!r} not printed:\n" + "\n".join(lines)


def test_every_listed_command_is_still_in_the_docs():
    shown = {c.text for c in commands()}
    assert not (CHECKED_WITH_DRY_RUN | set(NOT_RUN) | IN_THE_EXAMPLE) - shown


# -- Python and TOML blocks -------------------------------------------------------------------------------------
def commented_values(source: str) -> dict[int, object]:
    """Line → the value its comment states: a leading Python literal (``# {'a': 1}: ...``) or ``# NAME = value``."""
    values = {}
    for token in tokenize.generate_tokens(io.StringIO(source).readline):
        if token.type != tokenize.COMMENT:
            continue
        text = token.string.lstrip("#").strip()
        named = re.match(r"\w+ = (.*)", text)
        text = named.group(1) if named else text if text[:1] in "{[('\"" else ""
        for end in range(len(text), 0, -1):
            try:
                values[token.start[0]] = ast.literal_eval(text[:end])
                break
            except (ValueError, SyntaxError, TypeError):
                continue
    return values


def agrees(value, stated) -> bool:
    """``value`` is what ``stated`` says, to the digits it shows (``...`` stands for anything)."""
    if stated is Ellipsis:
        return True
    if isinstance(stated, float) and "." in repr(stated) and "e" not in repr(stated):
        return round(float(value), len(repr(stated).split(".")[1])) == stated
    if isinstance(stated, dict):
        return (
            isinstance(value, dict)
            and value.keys() == stated.keys()
            and all(agrees(value[k], v) for k, v in stated.items())
        )
    if isinstance(stated, (list, tuple)):
        return len(value) == len(stated) and all(agrees(v, s) for v, s in zip(value, stated))
    return value == stated


def run_python(block: Block, namespace: dict) -> dict:
    """Run the block statement by statement, checking each expression against the value its comment states."""
    stated = commented_values(block.text)
    for node in ast.parse(block.text).body:
        if isinstance(node, ast.Expr):
            value = eval(compile(ast.Expression(node.value), str(block), "eval"), namespace)
            if node.end_lineno in stated:
                assert agrees(value, stated[node.end_lineno]), (
                    f"{block.page}:{block.line + node.end_lineno}: {value!r}, not {stated[node.end_lineno]!r}"
                )
        else:
            exec(compile(ast.Module([node], []), str(block), "exec"), namespace)
    return namespace


@pytest.fixture
def server_app(monkeypatch):
    """Flower's task identity, which a running ServerApp has and its messages need."""
    for name in ("_run_id", "_node_id", "_task_id"):
        monkeypatch.setattr(TaskIdentity, name, 1)


QUADRATIC = Spec.from_dict(
    {"name": "docs", "suite": "quadratic", "clients": 2, "training": {"steps": [5, 20], "lr": 0.1}}
)


def quadratic_grid() -> tuple[InProcessGrid, dict]:
    """Two fedmerge ClientApps on the quadratic suite, in this process, and θ0."""
    fed = load_suite(QUADRATIC.suite, QUADRATIC.clients, QUADRATIC.suite_options, QUADRATIC.seed)
    return InProcessGrid(client_app(QUADRATIC.to_flat()), QUADRATIC.clients), fed.pretrained


def readme_server_app(block, request):
    request.getfixturevalue("server_app")
    request.getfixturevalue("isolated")
    grid, theta0 = quadratic_grid()
    result = run_python(block, {"grid": grid, "arrays": ArrayRecord(theta0)})["result"]
    assert not torch.equal(result.arrays.to_torch_state_dict()["theta"], theta0["theta"])


def deployment_server_app(block, request):
    request.getfixturevalue("server_app")
    request.getfixturevalue("isolated")
    tmp_path, capsys = request.getfixturevalue("tmp_path"), request.getfixturevalue("capsys")
    grid, theta0 = quadratic_grid()
    save_file(theta0, tmp_path / "theta0.safetensors")
    run_config = {
        **QUADRATIC.to_flat(),
        "base": str(tmp_path / "theta0.safetensors"),
        "out": str(tmp_path / "out.safetensors"),
    }
    namespace = run_python(block, {})
    namespace["app"](grid, Context(0, 0, {}, RecordDict(), run_config))
    assert [m.metadata.message_type for m in grid.sent] == ["train", "train"]
    assert set(load_file(tmp_path / "out.safetensors")) == {"theta"}
    assert "[0, 1]" in capsys.readouterr().out  # the round's record: its clients' ids


def client_contract(block, request):
    """The ClientApp and the fragment after it, together, as the page says they were run: FedNova on a two-layer
    model whose first layer is frozen; only the second layer's tensors travel and change."""
    request.getfixturevalue("server_app")
    from fedmerge.strategies import FedNova

    torch.manual_seed(0)
    theta0 = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.Linear(4, 2)).state_dict()
    frozen_names = ["0.weight", "0.bias"]
    x, y = torch.randn(16, 3), torch.randint(0, 2, (16,))

    def build_model_holding_theta0():
        model = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.Linear(4, 2))
        model.load_state_dict(theta0)
        model[0].requires_grad_(False)
        return model

    def my_local_training(model, steps=5, lr=0.1):
        optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=lr)
        for _ in range(steps):
            optimizer.zero_grad()
            loss = torch.nn.functional.cross_entropy(model(x), y)
            loss.backward()
            optimizer.step()
        return steps, steps * lr, loss.item()

    namespace = run_python(
        block,
        {
            "build_model_holding_theta0": build_model_holding_theta0,
            "my_local_training": my_local_training,
            "trainset": list(zip(x, y)),
        },
    )
    grid = InProcessGrid(namespace["app"], 2)
    fragment = block_with("docs/client-contract.md", "trained = {name: tensor")
    merged = run_python(
        fragment,
        {
            "theta0": theta0,
            "frozen_names": frozen_names,
            "strategy": FedNova(),
            "grid": grid,
            "ArrayRecord": ArrayRecord,
        },
    )["merged"]
    assert [sorted(m.content["arrays"]) for m in grid.sent] == [["1.bias", "1.weight"]] * 2
    assert all(torch.equal(merged[n], theta0[n]) for n in frozen_names)
    assert not torch.equal(merged["1.weight"], theta0["1.weight"])


def merging_core(block, request):
    base = {"w": torch.zeros(5), "b": torch.ones(2)}
    models = [{"w": torch.full((5,), float(t)), "b": torch.full((2,), 1.0 + t)} for t in (1, 2, 4)]
    namespace = run_python(block, {"base": base, "models": models})
    new_model, delta = namespace["new_model"], namespace["delta"]  # the same rule, through its two entrances
    assert all(torch.allclose(new_model[name], base[name] + delta[name]) for name in base)
    assert torch.allclose(delta["w"], torch.full((5,), 3.5 * (1 / 0.5 + 2 / 2 + 4 / 8) / 3))  # ā Σ p_t τ_t / a_t


def new_rule(block, request):
    from fedmerge.merging import merge

    task_vectors = [{"w": torch.full((4,), float(t))} for t in (1, 2, 3)]
    rule = run_python(block, {})["ShrunkMeanRule"](factor=0.5)
    assert torch.allclose(merge(rule, task_vectors)["w"], torch.full((4,), 1.0))  # half the mean, 2


def in_isolation(block, request):
    request.getfixturevalue("isolated")
    run_python(block, {})


def boxed(block, request):
    found = run_python(block, {})["boxed"]
    assert found(r"so the answer is \boxed{ 42 }.") == "42" and found("no box") is None


def checkpoints_api(block, request):
    folder = request.getfixturevalue("work")
    request.getfixturevalue("monkeypatch").chdir(folder)
    run_python(block, {})
    assert (folder / "merged-cclip" / "model.safetensors").is_file()


def in_folder(folder: Callable[[pytest.FixtureRequest], Path]):
    """Run the block in ``folder(request)``, as its page says (``sys.path.insert(0, ".")``)."""

    def run(block, request):
        where = folder(request)
        request.getfixturevalue("monkeypatch").chdir(where)
        run_python(block, {})

    return run


def my_suite(block, request):
    request.getfixturevalue("isolated")
    federation = run_python(block, {})["build"](3, {}, 0)
    assert [t.name for t in federation.tasks] == ["feature-0", "feature-1", "feature-2"]


def own_checks(block, request):
    """The suite that checks its own options, and the message the page shows for width = 0."""
    request.getfixturevalue("isolated")
    tmp_path = request.getfixturevalue("tmp_path")
    (tmp_path / "own_checks.py").write_text(block.text)
    sys.path.insert(0, str(tmp_path))
    shown = block_with("docs/suites.md", "suite 'own_checks:build'").text.strip()
    with pytest.raises(FedmergeError) as error:
        load_suite("own_checks:build", 2, {"width": 0}, 0)
    assert f"fedmerge: error: {error.value}" == shown


def quoted_from_the_example(block, request):
    """An excerpt of examples/custom-suite/my_tasks.py: every line of it is there."""
    source = {line.strip() for line in (EXAMPLE / "my_tasks.py").read_text().splitlines()}
    assert [line for line in block.text.splitlines() if line.strip() not in source] == []


def experiment_file(folder: Callable[[pytest.FixtureRequest], Path] | None = None, base: str | None = None):
    """A TOML experiment (or a part of one over the preset ``base``) that validates as a spec, read in ``folder``."""

    def check(block, request):
        where = folder(request) if folder else request.getfixturevalue("tmp_path")
        (where / "doc.toml").write_text(block.text)
        request.getfixturevalue("isolated")
        given = load_experiment(str(where / "doc.toml"))
        Spec.from_dict({**load_experiment(base), **given} if base else given)

    return check


def sweep_file(block, request):
    """studies.md's sweep: valid, with the number of cells the page says it has, and the cell id it quotes is one
    of them but for the hash of the resolved spec (which any new spec key changes)."""
    page = (ROOT / block.page).read_text()
    (count,) = re.findall(r"This grid has .* = (\d+) cells", page)
    (quoted,) = re.findall(r"`([\w.-]+)-[0-9a-f]{8}`", page)
    ids = [cell.id for cell in load_sweep(str(request.getfixturevalue("work") / "alpha-sweep.toml")).cells]
    assert len(ids) == int(count) and all(re.fullmatch(r".+-[0-9a-f]{8}", i) for i in ids)
    assert quoted in {i[:-9] for i in ids}


def example_folder(request) -> Path:
    return example_copy(request.getfixturevalue("work"))


FLOWER_CONFIG = "Flower's own connection settings ($FLWR_HOME/config.toml), read by flwr (tests/test_deployment.py)"
SNIPPETS: dict[tuple[str, str], Callable | str] = {  # (page, a line of the block) → its test, or why it is not run
    ("README.md", "strategy = FedNova()"): readme_server_app,
    ("docs/client-contract.md", "@app.train()"): client_contract,
    ("docs/client-contract.md", "trained = {name: tensor"): "run with the ClientApp above, in its test",
    ("docs/clip.md", "CLIPModel.from_pretrained"): DOWNLOADS,
    ("docs/clip.md", 'load_dataset("tanganke/gtsrb")'): DOWNLOADS,
    ("docs/deployment.md", "app = ServerApp()"): deployment_server_app,
    ("docs/deployment.md", 'default = "local"'): FLOWER_CONFIG,
    ("docs/deployment.md", "[superlink.my-superlink]"): FLOWER_CONFIG,
    ("docs/llm.md", "# llm.toml"): experiment_file(),
    ("docs/llm.md", 'load_suite("causal-lm"'): "needs a language model and task files (tests/test_causal_lm_suite.py "
    "makes these calls on a tiny Llama)",
    ("docs/llm.md", "def boxed(text)"): boxed,
    ("docs/merging-checkpoints.md", "merge_checkpoints("): checkpoints_api,
    ("docs/simulations.md", 'name = "my-study"'): experiment_file(),
    ("docs/simulations.md", 'suite = "my_tasks:build"'): experiment_file(example_folder),
    ("docs/simulations.md", "client_gpus = 0.25"): experiment_file(base="default"),
    ("docs/simulations.md", "run_dir = run(spec)"): "a run of the default preset for 10 rounds: minutes "
    "(tests/test_simulation.py calls run)",
    ("docs/strategies.md", "from fedmerge.merging import METHODS"): in_isolation,
    ("docs/strategies.md", "app = ServerApp()"): "run by tests/test_strategies.py (the docs' ServerApp test)",
    ("docs/strategies.md", "task_vectors = [TaskVector"): merging_core,
    ("docs/strategies.md", "class ShrunkMeanRule"): new_rule,
    ("docs/strategies.md", "DifferentialPrivacyServerSideFixedClipping(Median()"): in_isolation,
    ("docs/client-contract.md", "controls = ControlVariates.load("): "steps inside a ClientApp's train function; "
    "tests/test_scaffold.py runs fedmerge's, which "
    "takes them",
    (
        "docs/client-contract.md",
        "from fedmerge.clients.merging_statistics import",
    ): "run by tests/test_fisher_regmean.py with a model and data set of its own",
    ("docs/merging-checkpoints.md", "fisher_diagonal(model, train_set"): "run by tests/test_fisher_regmean.py, which "
    "feeds the files to fedmerge merge",
    ("docs/studies.md", 'name = "alpha-sweep"'): sweep_file,
    ("docs/suites.md", 'load_suite("mnist1d"'): in_isolation,
    ("docs/suites.md", "# my_suite.py"): my_suite,
    ("docs/suites.md", "# experiment.toml"): experiment_file(lambda request: request.getfixturevalue("work")),
    ("docs/suites.md", 'load_suite("my_suite:build"'): in_folder(lambda request: request.getfixturevalue("work")),
    ("docs/suites.md", '"images_per_kind": Option(60'): quoted_from_the_example,
    ("docs/suites.md", "to_tensor = v2.Compose"): quoted_from_the_example,
    ("docs/suites.md", "tasks.append(Task(name"): quoted_from_the_example,
    ("docs/suites.md", "def pretrained(model"): quoted_from_the_example,
    ("docs/suites.md", 'load_suite("my_tasks:build"'): in_folder(example_folder),
    ("docs/suites.md", "def build(num_clients, options, seed):\n    unknown"): own_checks,
    ("docs/suites.md", 'theta0=HERE / "theta0.safetensors"'): "a part of a build function (`return` outside it); "
    "tests/test_plugin_suites.py reads θ0 from a file",
    ("docs/suites.md", "ViTForImageClassification"): "needs a ViT checkpoint written by save_pretrained beside it",
    ("docs/suites.md", "[project.entry-points"): "packaging: an installed plugin (tests/test_plugin_suites.py)",
    ("docs/suites.md", '"root": "my-data"'): "needs an image folder, my-data (tests/test_vision_suite.py)",
}


def snippets() -> list[Block]:
    return [b for b in blocks() if b.lang in ("python", "toml")]


def entry(block: Block):
    keys = [key for key in SNIPPETS if key[0] == block.page and key[1] in block.text]
    assert len(keys) == 1, f"{block}: say in SNIPPETS how this example is tested, or why it is not ({keys})"
    return SNIPPETS[keys[0]]


@pytest.mark.parametrize("block", snippets(), ids=str)
def test_the_docs_python_and_toml_examples_work(block, request):
    test = entry(block)
    if isinstance(test, str):
        pytest.skip(test)
    test(block, request)


def test_every_listed_snippet_is_still_in_the_docs():
    for page, marker in SNIPPETS:
        assert len([b for b in snippets() if b.page == page and marker in b.text]) == 1, (page, marker)


def test_a_stated_value_that_is_not_the_result_fails():
    block = Block("README.md", 1, "python", "x = {'a': 0.25, 'b': [1, 2]}\nx  # {'a': 0.3, 'b': [1, 2]}\n")
    with pytest.raises(AssertionError, match=r"README.md:3: .* not \{'a': 0.3"):
        run_python(block, {})
    assert agrees({"a": 0.2512, "b": [1, 2]}, {"a": 0.25, "b": [1, 2]}) and agrees(np.float32(2.4), 2.4)
