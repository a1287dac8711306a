"""tests/conftest.py's handling of the ``cuda`` marker, on a small test file run by pytest itself."""

from pathlib import Path

import pytest
import torch

pytest_plugins = "pytester"

TESTS = """
import pytest

@pytest.mark.cuda
def test_on_the_gpu():
    pass

def test_on_the_cpu():
    pass
"""


@pytest.fixture
def suite(pytester, monkeypatch):
    """A test session with this repository's conftest.py and its marker, on a machine without CUDA."""
    pytester.makeconftest((Path(__file__).parent / "conftest.py").read_text())
    pytester.makeini("[pytest]\nmarkers =\n    cuda: needs a CUDA device\n")
    pytester.makepyfile(test_devices=TESTS)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    return pytester


@pytest.mark.parametrize("expr", ["cuda", "cuda and not slow"])
def test_asking_for_the_cuda_tests_without_cuda_fails_naming_the_cause(suite, expr):
    result = suite.runpytest("-m", expr)
    assert result.ret == pytest.ExitCode.USAGE_ERROR
    result.stderr.fnmatch_lines(
        [
            f"ERROR: the marker expression -m '{expr}' selects CUDA tests only (1 of them), but "
            "CUDA is not available here*"
        ]
    )


def test_a_plain_run_skips_the_cuda_tests(suite):
    result = suite.runpytest("-rs")
    result.assert_outcomes(passed=1, skipped=1)
    result.stdout.fnmatch_lines(["*needs a CUDA device*"])
    suite.runpytest("-m", "not cuda").assert_outcomes(passed=1, deselected=1)


def test_with_cuda_the_cuda_tests_run(suite, monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    suite.runpytest("-m", "cuda").assert_outcomes(passed=1, deselected=1)
