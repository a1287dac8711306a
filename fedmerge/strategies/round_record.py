"""What a strategy keeps about each round: per-client metadata, never averaged into meaningless numbers."""

from dataclasses import asdict, dataclass, field

from flwr.app import MetricRecord


@dataclass
class RoundRecord:
    """One aggregation round as the server saw it; lists are per accepted client, in ``client_ids`` order.

    ``weights`` are the p_t the rule used; ``effective_weights`` are w_t = p_t a_t / Σ p_s a_s with a_t
    from ``effective_steps_key`` (``lr-sum`` when clients report it, else ``num-steps``); ``chi_square``
    is χ²(p‖w). ``task_vector_norms`` are ‖θ_t − θ‖ over all floating tensors. A round without accepted
    clients has empty lists and ``rule`` {}; ``excluded`` says why.
    """

    server_round: int
    rule: dict
    server_lr: float
    client_ids: list[int]
    node_ids: list[int]
    weights: list[float]
    task_vector_norms: list[float]
    effective_steps_key: str | None = None
    effective_weights: list[float] = field(default_factory=list)
    chi_square: float | None = None
    train_losses: list[float] = field(default_factory=list)
    excluded: list[dict] = field(default_factory=list)
    sampled: list[int] | None = None
    """The clients drawn to train in the round (``clients_per_round``); None when every node was asked."""

    @classmethod
    def empty(cls, server_round: int, server_lr: float, excluded: list[dict]) -> "RoundRecord":
        """A round without accepted clients (the model stayed as it was): only its exclusions."""
        return cls(server_round, {}, server_lr, [], [], [], [], excluded=excluded)

    def to_dict(self) -> dict:
        """Plain data for JSON results."""
        return asdict(self)

    def to_metrics(self) -> MetricRecord:
        """The round's metrics for Flower's Result (per-client lists in ``client-ids`` order)."""
        metrics = {
            "num-clients": len(self.client_ids),
            "num-excluded": len(self.excluded),
            "client-ids": list(self.client_ids),
            "client-weights": list(self.weights),
            "task-vector-norms": list(self.task_vector_norms),
        }
        if self.effective_weights:
            metrics["effective-weights"] = list(self.effective_weights)
            metrics["chi-square"] = float(self.chi_square)
        if self.train_losses:
            metrics["client-train-loss"] = list(self.train_losses)
            metrics["train-loss"] = sum(self.train_losses) / len(self.train_losses)
        return MetricRecord(metrics)
