"""Model Stock as a Flower strategy: θ ← θ + β·t·(1/k)Σ_t τ_t, t from the angle between the clients' updates.

Jang, Yun, Han, "Model Stock: All we need is just a few fine-tuned models", ECCV 2024. Per tensor,
t = k·cos θ / (1 + (k − 1)·cos θ), cos θ the mean cosine between two clients' updates. Over rounds, each round's t
comes from that round's updates: the server steps less far where the clients disagree. Needs two clients or more.
"""

from fedmerge.merging.rules.model_stock import METHOD
from fedmerge.strategies.base import MethodStrategy


class ModelStock(MethodStrategy):
    """The clients' mean update, scaled per tensor by Model Stock's t (unweighted; no parameters but
    :class:`fedmerge.strategies.base.MergingStrategy`'s)."""

    method = METHOD
