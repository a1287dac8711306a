"""The fedmerge ServerApp: run the experiment its flat run config describes on the Flower grid."""

import os
import threading
from collections.abc import Callable, Mapping
from pathlib import Path

from flwr.app import Context
from flwr.serverapp import Grid, ServerApp

from fedmerge.simulations.experiment import Experiment, Progress
from fedmerge.simulations.results import write_results
from fedmerge.simulations.spec import Spec

RESULTS_ENV = "FEDMERGE_RESULTS"
"""Where a ServerApp run by ``flwr run`` writes its results directories (default ``results``)."""


def server_app(
    run_config: Mapping | None = None,
    on_results: Callable[[Spec, dict], None] | None = None,
    progress: Progress | None = None,
    stop: threading.Event | None = None,
) -> ServerApp:
    """A ServerApp for ``run_config`` if given (``run_simulation``), else the run's own config.

    Results go to ``on_results`` when given, else into a new directory under ``$FEDMERGE_RESULTS``
    (default ``results/``). Setting ``stop`` ends the experiment promptly.
    """
    app = ServerApp()

    @app.main()
    def _main(grid: Grid, context: Context) -> None:
        spec = Spec.from_flat(context.run_config if run_config is None else run_config)
        results = Experiment(spec, grid, progress, stop=stop).run()
        if on_results is not None:
            on_results(spec, results)
        else:
            write_results(spec, results, Path(os.environ.get(RESULTS_ENV, "results")))

    return app


app = server_app()
"""For ``flwr run``: ``serverapp = "fedmerge.simulations.serverapp:app"``."""
