"""The command line's front door: help and version come at once, without loading the heavy stacks."""

import subprocess
import sys

import pytest

from fedmerge.cli import COMMANDS

HEAVY = ("torch", "flwr", "ray", "matplotlib")


@pytest.mark.parametrize("argv", [["--help"], ["--version"], ["run", "--help"], ["sweep", "--help"]])
def test_help_and_version_do_not_import_torch_flower_ray_or_matplotlib(argv):
    script = (f"import sys\nfrom fedmerge.cli import main\ntry:\n    main({argv!r})\nexcept SystemExit:\n    pass\n"
              f"print(sorted(m for m in {HEAVY!r} if m in sys.modules))")
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=60)
    assert result.stdout.strip().splitlines()[-1] == "[]", result.stderr


def test_the_top_level_help_lists_every_command(capsys):
    from fedmerge.cli import main

    with pytest.raises(SystemExit):
        main(["--help"])
    listing = capsys.readouterr().out
    assert all(f"    {name}" in listing for name in COMMANDS)
