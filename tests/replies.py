"""Build real Flower reply Messages for strategy tests (a reply needs explicit Metadata outside an app)."""

import time

import numpy as np
from flwr.app import Array, ArrayRecord, Error, Message, Metadata, MetricRecord, RecordDict


def _metadata(node_id: int) -> Metadata:
    return Metadata(
        run_id=1,
        message_id=f"reply-{node_id}",
        src_node_id=node_id,
        dst_node_id=0,
        reply_to_message_id=f"ins-{node_id}",
        group_id="1",
        created_at=time.time(),
        ttl=3600.0,
        message_type="train",
    )


def arrays_record(arrays: dict[str, np.ndarray]) -> ArrayRecord:
    return ArrayRecord({name: Array(np.asarray(value)) for name, value in arrays.items()})


def reply(node_id: int, arrays: dict[str, np.ndarray], **metrics) -> Message:
    """A training reply from ``node_id`` with the weights ``arrays`` and the metric keys given."""
    content = RecordDict(
        {"arrays": arrays_record(arrays), "metrics": MetricRecord({k.replace("_", "-"): v for k, v in metrics.items()})}
    )
    return Message(content=content, metadata=_metadata(node_id))


def error_reply(node_id: int, reason: str) -> Message:
    return Message(error=Error(code=0, reason=reason), metadata=_metadata(node_id))
