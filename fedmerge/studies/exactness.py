"""Claim 1, checked exactly: Task Arithmetic with λ equals one round of FedAvg with β = λT, through the merging
core and through the Flower FedAvg strategy (real Flower Messages), in float32 and float64.

:func:`check` returns plain data (every case's largest difference and its tolerance); the findings runner
writes it to ``<work>/exactness.json`` for :mod:`fedmerge.report.findings`.
"""

from __future__ import annotations

import time

import numpy as np

SHAPES = {"layer.weight": (64, 40), "layer.bias": (64,), "head.weight": (10, 64), "head.bias": (10,)}
TOLERANCES = {"float32": 1e-5, "float64": 1e-12}
"""Relative to 1 + max |θ|."""


def check() -> dict:
    import torch
    from flwr.app import Array, ArrayRecord

    from fedmerge.merging import FedAvgRule, merged_model, scaling_to_server_lr
    from fedmerge.strategies import FedAvg

    cases = []
    for dtype_name, tolerance in TOLERANCES.items():
        dtype = getattr(torch, dtype_name)
        for clients in (2, 4, 8):
            for scaling in (0.05, 0.3, 1.0, 2.0):
                gen = torch.Generator().manual_seed(clients)
                base = {k: torch.randn(s, generator=gen, dtype=torch.float64).to(dtype) for k, s in SHAPES.items()}
                models = [
                    {
                        k: v + 0.1 * torch.randn(v.shape, generator=gen, dtype=torch.float64).to(dtype)
                        for k, v in base.items()
                    }
                    for _ in range(clients)
                ]
                beta = scaling_to_server_lr(scaling, clients)
                ta = {
                    k: base[k].double() + scaling * sum(m[k].double() - base[k].double() for m in models) for k in base
                }
                core = merged_model(FedAvgRule(), base, models, server_lr=beta)
                replies = [_reply(i, {k: v.numpy() for k, v in m.items()}) for i, m in enumerate(models)]
                record, _ = FedAvg(server_lr=beta).merge_replies(
                    1, replies, ArrayRecord({k: Array(v.numpy()) for k, v in base.items()})
                )
                strategy = {k: torch.from_numpy(np.asarray(record[k].numpy())) for k in base}
                scale = 1 + max(float(t.abs().max()) for t in ta.values())
                core_error, strategy_error = (
                    max(float((got[k].double() - ta[k]).abs().max()) for k in base) for got in (core, strategy)
                )
                cases.append(
                    {
                        "dtype": dtype_name,
                        "clients": clients,
                        "scaling": scaling,
                        "server_lr": beta,
                        "core_error": core_error,
                        "strategy_error": strategy_error,
                        "tolerance": tolerance * scale,
                    }
                )
    return {
        "study": "exactness",
        "model": "a 2-layer MLP's tensors (40 → 64 → 10), task vectors of scale 0.1",
        "cases": cases,
    }


def _reply(node: int, arrays: dict):
    from flwr.app import Array, ArrayRecord, Message, Metadata, MetricRecord, RecordDict

    metadata = Metadata(
        run_id=1,
        message_id=f"r{node}",
        src_node_id=node + 1,
        dst_node_id=0,
        reply_to_message_id=f"i{node}",
        group_id="1",
        created_at=time.time(),
        ttl=3600.0,
        message_type="train",
    )
    content = RecordDict(
        {
            "arrays": ArrayRecord({k: Array(v) for k, v in arrays.items()}),
            "metrics": MetricRecord({"num-examples": 10, "num-steps": 10, "lr-sum": 0.1, "client-id": node}),
        }
    )
    return Message(content=content, metadata=metadata)
