"""One intra-op thread for the suites' small models: parallel clients, not parallel kernels.

On a shared CPU, torch's default thread pool makes tiny matrix products tens of times slower (threads
wait for cores held by other processes); one thread is never slower at these sizes.
"""

from collections.abc import Iterator
from contextlib import contextmanager

import torch


@contextmanager
def single_threaded() -> Iterator[None]:
    """Run the block with ``torch.set_num_threads(1)``, restoring the previous count afterwards."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(previous)
