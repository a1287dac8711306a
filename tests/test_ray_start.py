"""Starting Ray: again while its GCS does not answer (a heavily loaded machine), within a bounded time, then a clear
error; and whatever way a run ends, the process's loggers, environment and SIGTERM handler are as they were."""

import logging
import os
import re
import signal
import time

import pytest
import ray

import fedmerge.simulations.runner as runner
from fedmerge.cli import main
from fedmerge.errors import FedmergeError
from fedmerge.simulations.experiment import Experiment
from fedmerge.simulations.progress import ProgressDisplay
from fedmerge.simulations.spec import Spec

SPEC = Spec.from_dict(
    {
        "name": "start",
        "suite": "quadratic",
        "clients": 2,
        "strategies": ["fedavg"],
        "rounds": [1],
        "select": False,
        "training": {"steps": [3, 6], "lr": 0.1},
    }
)
GCS_DOWN = (
    "Failed to connect to GCS. Please check if the GCS server is running and if this node can connect to the head node."
)
"""What Ray raises when its GCS does not answer in time."""


@pytest.fixture
def failing_starts(monkeypatch):
    """``failing_starts(n, message)``: the first ``n`` calls of ``ray.init`` fail with ``message``; their times."""

    def install(n: int, message: str = GCS_DOWN) -> list[float]:
        real, calls = ray.init, []

        def init(*args, **kwargs):
            calls.append(time.monotonic())
            if len(calls) <= n:
                raise RuntimeError(message)
            return real(*args, **kwargs)

        monkeypatch.setattr(ray, "init", init)
        return calls

    return install


@pytest.mark.slow
def test_a_start_whose_gcs_does_not_answer_is_tried_again(failing_starts, tmp_path):
    calls = failing_starts(1)
    run_dir = runner.run(SPEC, tmp_path, run_dir=tmp_path / "run", show_progress=False)
    assert len(calls) == 2 and calls[1] - calls[0] >= runner.RAY_RETRY_PAUSE
    assert (run_dir / "results.json").is_file() and not ray.is_initialized()


def test_a_gcs_that_never_answers_fails_within_the_bound_in_one_line(failing_starts, monkeypatch, tmp_path, capsys):
    monkeypatch.setattr(runner, "RAY_START_SECONDS", 3.0)
    monkeypatch.setattr(runner, "RAY_RETRY_PAUSE", 0.5)
    calls = failing_starts(1000)
    argv = ["run", "quadratic", "--set", "clients=2", "--set", "training.steps=3", "--out", str(tmp_path / "results")]
    assert main([*argv, "--no-progress"]) == 2
    (line,) = capsys.readouterr().err.splitlines()
    assert re.fullmatch(
        rf"fedmerge: error: Ray did not start: {re.escape(GCS_DOWN)} \(\d+ attempts in \d+ s; its "
        r"GCS does not answer, as happens on a heavily loaded machine\)\. Try again when the machine "
        r"is less busy\.",
        line,
    )
    assert len(calls) >= 3 and calls[-1] - calls[0] < 3.0
    assert not ray.is_initialized() and not (tmp_path / "results").exists()


def test_any_other_failure_to_start_is_not_tried_again(failing_starts, tmp_path):
    calls = failing_starts(1, "Insufficient space in /tmp/ray")
    with pytest.raises(FedmergeError, match=r"^Ray did not start: Insufficient space in /tmp/ray$"):
        runner.run(SPEC, tmp_path, run_dir=tmp_path / "run", show_progress=False)
    assert len(calls) == 1 and not (tmp_path / "run").exists()


# -- what a run leaves of the process ----------------------------------------------------------------------------------
def process_state() -> tuple:
    return (
        tuple(logging.getLogger(name).level for name in ("flwr", "ray", "fedmerge")),
        {key: os.environ.get(key) for key in (*runner.RAY_ENVIRONMENT, "PYTHONPATH")},
        signal.getsignal(signal.SIGTERM),
    )


def fails(self, *args):
    raise FedmergeError("the experiment failed")


def interrupted(monkeypatch):
    """Ctrl-C, delivered to the process once, as the first client's reply is shown."""
    advance, sent = ProgressDisplay.advance, []

    def interrupt(self, message):
        if not sent:
            sent.append(os.kill(os.getpid(), signal.SIGINT))
        advance(self, message)

    monkeypatch.setattr(ProgressDisplay, "advance", interrupt)


@pytest.mark.slow
@pytest.mark.parametrize("ending", ["success", "failure", "ctrl-c"])
def test_a_run_leaves_loggers_environment_and_sigterm_handler_as_they_were(ending, monkeypatch, tmp_path):
    monkeypatch.setenv("RAY_ACCEL_ENV_VAR_OVERRIDE_ON_ZERO", "1")  # the user's own value
    monkeypatch.delenv("RAY_DEDUP_LOGS", raising=False)
    monkeypatch.setenv("PYTHONPATH", "/mine")
    for name, level in (("flwr", logging.INFO), ("ray", logging.WARNING), ("fedmerge", logging.DEBUG)):
        monkeypatch.setattr(logging.getLogger(name), "level", level)
    previous = signal.signal(signal.SIGTERM, lambda *_: None)
    try:
        before = process_state()
        if ending == "failure":
            monkeypatch.setattr(Experiment, "run", fails)
        if ending == "ctrl-c":
            interrupted(monkeypatch)
        expected = {"success": None, "failure": FedmergeError, "ctrl-c": KeyboardInterrupt}[ending]
        if expected is None:
            runner.run(SPEC, tmp_path, show_progress=True)
        else:
            with pytest.raises(expected):
                runner.run(SPEC, tmp_path, show_progress=True)
        assert process_state() == before and not ray.is_initialized()
    finally:
        signal.signal(signal.SIGTERM, previous)
