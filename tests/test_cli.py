"""The command line's front door: help and version come at once, without loading the heavy stacks."""

import subprocess
import sys

import pytest

from fedmerge.cli import COMMANDS
from processes import seconds

HEAVY = ("torch", "flwr", "ray", "matplotlib")


@pytest.mark.parametrize("argv", [["--help"], ["--version"], ["run", "--help"], ["sweep", "--help"]])
def test_help_and_version_do_not_import_torch_flower_ray_or_matplotlib(argv):
    script = (
        f"import sys\nfrom fedmerge.cli import main\ntry:\n    main({argv!r})\nexcept SystemExit:\n    pass\n"
        f"print(sorted(m for m in {HEAVY!r} if m in sys.modules))"
    )
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=seconds(60))
    assert result.stdout.strip().splitlines()[-1] == "[]", result.stderr


def test_the_top_level_help_lists_every_command(capsys):
    from fedmerge.cli import main

    with pytest.raises(SystemExit):
        main(["--help"])
    listing = capsys.readouterr().out
    assert all(f"    {name}" in listing for name in COMMANDS)


@pytest.mark.parametrize(
    "argv, message",
    [
        (["run", "--out", "{file}"], "--out {file} is a file; give a directory path."),
        (
            ["run", "quadratic", "--set", "clients=0", "--out={file}/results"],
            "--out {file}/results is under {file}, which is a file",
        ),
        (["sweep", "grid.toml", "--out", "{file}"], "--out {file} is a file; give a directory path."),
        (["evaluate", "quadratic", "--base", "b", "--models", "m", "--out", "{file}"], "--out {file} is a file"),
        (
            ["merge", "--base", "b", "--models", "m", "--out", "{file}/merged"],
            "--out {file}/merged: its directory {file} is a file",
        ),
        (["report", "results", "--out", "{file}/report"], "--out {file}/report is under {file}, which is a file"),
        (["findings", "--out", "{file}/findings.md"], "--out {file}/findings.md: its directory {file} is a file"),
    ],
)
def test_an_out_path_that_cannot_be_written_is_refused_before_the_heavy_imports(argv, message, tmp_path):
    """Checked before torch, Flower and Ray load (seconds; a minute on a loaded machine), ahead of any other check."""
    file = tmp_path / "file"
    file.write_text("mine")
    argv = [arg.format(file=file) for arg in argv]
    script = (
        f"import sys\nfrom fedmerge.cli import main\ncode = main({argv!r})\n"
        f"print(sorted(m for m in {HEAVY!r} if m in sys.modules))\nsys.exit(code)"
    )
    result = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, timeout=seconds(60), cwd=tmp_path
    )
    (line,) = result.stderr.splitlines()
    assert result.returncode == 2 and line.startswith(f"fedmerge: error: {message.format(file=file)}")
    assert result.stdout.strip() == "[]" and file.read_text() == "mine"


def test_main_leaves_the_callers_sigterm_handler_as_it_was():
    import signal

    from fedmerge.cli import main

    def mine(signum, frame):
        pass

    previous = signal.signal(signal.SIGTERM, mine)
    try:
        assert main(["run", "--out", "/dev/null"]) == 2
        assert signal.getsignal(signal.SIGTERM) is mine
    finally:
        signal.signal(signal.SIGTERM, previous)
