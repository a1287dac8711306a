"""The fedmerge ServerApp: run the experiment its flat run config describes on the Flower grid."""

import os
import threading
from collections.abc import Callable, Mapping
from pathlib import Path

from flwr.app import Context
from flwr.serverapp import Grid, ServerApp

from fedmerge.simulations.experiment import Experiment, Progress
from fedmerge.simulations.results import ResultsDirectory
from fedmerge.simulations.spec import Spec

RESULTS_ENV = "FEDMERGE_RESULTS"
"""Where a ServerApp run by ``flwr run`` writes its results directories (default ``results``)."""


def server_app(
    run_config: Mapping | None = None,
    store: Callable[[Spec], ResultsDirectory] | None = None,
    progress: Progress | None = None,
    stop: threading.Event | None = None,
) -> ServerApp:
    """A ServerApp for ``run_config`` if given (``run_simulation``), else the run's own config.

    Results go, as each run finishes, into the :class:`ResultsDirectory` that ``store(spec)`` returns, by default a
    new directory under ``$FEDMERGE_RESULTS`` (default ``results/``); a failure records why in its results.json and
    keeps what finished. Setting ``stop`` ends the experiment promptly.
    """
    app = ServerApp()

    @app.main()
    def _main(grid: Grid, context: Context) -> None:
        spec = Spec.from_flat(context.run_config if run_config is None else run_config)
        results = (store or _default_store)(spec)
        try:
            found = Experiment(
                spec,
                grid,
                progress,
                stop=stop,
                on_partial=lambda partial, pending: results.update(partial, pending=pending),
            ).run()
        except BaseException as error:
            results.fail(f"{type(error).__name__}: {error}")
            raise
        results.update(found, complete=True)

    return app


def _default_store(spec: Spec) -> ResultsDirectory:
    return ResultsDirectory(spec, Path(os.environ.get(RESULTS_ENV, "results")))


app = server_app()
"""For ``flwr run``: ``serverapp = "fedmerge.simulations.serverapp:app"``."""
