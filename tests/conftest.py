"""The ``cuda`` marker, and the scale of the tests' time limits.

A test marked ``cuda`` needs a CUDA device. Without one, a plain run skips those tests; a run whose marker
expression keeps CUDA tests only (``pytest -m cuda``, ``pytest -m "cuda and not slow"``) asked for them, so it
fails at once, naming the cause, instead of passing with nothing run.

Every time limit in the tests is multiplied by ``FEDMERGE_TEST_TIME_SCALE`` (``processes.seconds``); a value that
is not a positive number stops the run before any test, and a scale other than 1 is shown in the header.
"""

import pytest
import torch

from processes import TIME_SCALE, time_scale

NO_CUDA = (
    "the marker expression -m {expr!r} selects CUDA tests only ({count} of them), but CUDA is not available "
    "here (torch.cuda.is_available() is False): run them on a machine with a GPU and a CUDA build of torch, or "
    "drop -m to run the other tests (the CUDA ones are then skipped)."
)


@pytest.hookimpl(trylast=True)  # after -m has deselected: ``items`` are the tests that will run
def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    cuda = [item for item in items if item.get_closest_marker("cuda")]
    if not cuda or torch.cuda.is_available():
        return
    expr = config.getoption("markexpr")
    if expr and len(cuda) == len(items):
        raise pytest.UsageError(NO_CUDA.format(expr=expr, count=len(cuda)))
    for item in cuda:
        item.add_marker(pytest.mark.skip(reason="needs a CUDA device"))


def pytest_configure(config: pytest.Config) -> None:
    try:
        time_scale()
    except ValueError as error:
        raise pytest.UsageError(str(error)) from None


def pytest_report_header(config: pytest.Config) -> str | None:
    scale = time_scale()
    return None if scale == 1 else f"time limits scaled by {scale:g} ({TIME_SCALE})"
