"""The ``cuda`` marker: a test so marked needs a CUDA device.

Without one, a plain run skips those tests; a run whose marker expression keeps CUDA tests only (``pytest -m
cuda``, ``pytest -m "cuda and not slow"``) asked for them, so it fails at once, naming the cause, instead of
passing with nothing run.
"""

import pytest
import torch

NO_CUDA = ("the marker expression -m {expr!r} selects CUDA tests only ({count} of them), but CUDA is not available "
           "here (torch.cuda.is_available() is False): run them on a machine with a GPU and a CUDA build of torch, or "
           "drop -m to run the other tests (the CUDA ones are then skipped).")


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
