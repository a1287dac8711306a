"""The Karcher mean as a Flower strategy: θ ← θ + β·(m − θ), m the clients' models averaged on the sphere.

Per tensor, m is the p-weighted Riemannian mean of the directions θ_t/‖θ_t‖ at the p-weighted mean norm (mergekit's
``karcher``). Over rounds, each round takes the spherical mean of the models the clients send back.
"""

from fedmerge.merging.rules.karcher import METHOD
from fedmerge.strategies.base import MethodStrategy


class Karcher(MethodStrategy):
    """The Karcher mean of the clients' models.

    Parameters
    ----------
    max_iter : int (default 10)
        The most Riemannian gradient steps per tensor.
    tol : float (default 1e-5)
        The step norm that ends them; a model whose tensor has a smaller norm is left out of its direction.
    **kwargs
        As :class:`fedmerge.strategies.base.MergingStrategy`.
    """

    method = METHOD
