"""FEDMERGE_TEST_TIME_SCALE: the one multiplier of every time limit in the tests (tests/processes.py), checked by
tests/conftest.py before any test runs."""

from pathlib import Path

import pytest

from processes import seconds

pytest_plugins = "pytester"


@pytest.fixture
def suite(pytester):
    """A test session with this repository's conftest.py and one passing test."""
    pytester.makeconftest((Path(__file__).parent / "conftest.py").read_text())
    pytester.makepyfile(test_one="def test_one():\n    pass\n")
    return pytester


def test_time_limits_scale_with_the_environment(monkeypatch):
    monkeypatch.delenv("FEDMERGE_TEST_TIME_SCALE", raising=False)
    assert seconds(8) == 8
    monkeypatch.setenv("FEDMERGE_TEST_TIME_SCALE", "2.5")
    assert seconds(8) == 20


@pytest.mark.parametrize("value", ["0", "-1", "fast", "nan", "inf"])
def test_a_scale_that_is_not_a_positive_number_stops_the_run_naming_it(suite, monkeypatch, value):
    monkeypatch.setenv("FEDMERGE_TEST_TIME_SCALE", value)
    result = suite.runpytest()
    assert result.ret == pytest.ExitCode.USAGE_ERROR
    result.stderr.fnmatch_lines([f"ERROR: FEDMERGE_TEST_TIME_SCALE={value!r}: give a positive number*"])


def test_a_scale_other_than_one_is_shown_in_the_header(suite, monkeypatch):
    monkeypatch.setenv("FEDMERGE_TEST_TIME_SCALE", "3")
    result = suite.runpytest()
    result.assert_outcomes(passed=1)
    result.stdout.fnmatch_lines(["time limits scaled by 3 (FEDMERGE_TEST_TIME_SCALE)"])
