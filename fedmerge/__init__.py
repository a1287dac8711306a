"""fedmerge: federated-learning simulation in which model merging is a one-round federation."""

from fedmerge.errors import FedmergeError

__version__ = "0.1.0"
__all__ = ["FedmergeError", "__version__"]
