"""Strategies whose rule needs statistics from every client beside its weights (Fisher merging, RegMean).

The train messages' config asks for them (contract key → how many training examples: ``fisher = 256``); every reply
must carry them as an extra ArrayRecord under that key (:data:`fedmerge.contract.MERGING_STATISTICS`), or the round
stops naming the node and the key; a reply whose statistics hold NaN or ±inf is left out, as one whose weights do.
Each round's rule reads the accepted replies' statistics where they lie, a chunk or a layer at a time.
"""

from fedmerge.merging import Rule
from fedmerge.strategies.arrays import RecordTensors
from fedmerge.strategies.base import MethodStrategy


class StatisticsStrategy(MethodStrategy):
    """A strategy of a method needing client statistics (``method.statistics``), computed over ``examples`` of each
    client's training examples."""

    def statistics_request(self) -> dict[str, int]:
        return {key: self.examples for key in self.method.statistics}

    def build_rule(self, replies, weights) -> Rule:
        statistics = {key: [RecordTensors(r.statistics[key]) for r in replies] for key in self.method.statistics}
        rule_params = {name: value for name, value in self.params.items() if name in self.method.scoped("merge")}
        return self.method.build(weights, statistics, labels=[f"node {r.node_id}'s" for r in replies], **rule_params)
