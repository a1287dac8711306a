"""Aggregation speed and peak extra memory: fedmerge's five rules beside Flower's FedAvg and FedMedian.

T = 8 clients of a model of about 25M float32 parameters, the same Flower reply Messages for every
method. Peak extra memory is the highest resident memory seen above the level before the call
(sampled every millisecond). Run: ``python benchmarks/aggregation.py [--clients 8] [--repeats 3]``.
The last line is the ratio Flower FedMedian time / fedmerge Median time.
"""

import argparse
import gc
import os
import threading
import time

import numpy as np
from flwr.app import Array, ArrayRecord, Message, Metadata, MetricRecord, RecordDict
from flwr.serverapp.strategy import FedAvg as FlowerFedAvg
from flwr.serverapp.strategy import FedMedian as FlowerFedMedian

from fedmerge.strategies import CClip, DareTies, FedAvg, FedGMA, FedNova, Median, Ties

SHAPES = {  # 25.4M parameters, the largest tensor 16.8M
    "embed.weight": (4096, 4096),
    "block.attn.weight": (1024, 4096),
    "block.mlp.weight": (4096, 1024),
    "block.mlp.bias": (4096,),
    "head.weight": (100, 2048),
    "head.bias": (100,),
}
PAGE = os.sysconf("SC_PAGE_SIZE")


def rss() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * PAGE


class PeakMemory:
    """Highest RSS above the level at entry, sampled every millisecond by a thread."""

    def __enter__(self):
        gc.collect()
        self.start = self.peak = rss()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)
        self._thread.start()
        return self

    def _sample(self):
        while not self._stop.is_set():
            self.peak = max(self.peak, rss())
            time.sleep(0.001)

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, rss())
        self.extra = self.peak - self.start


def make_replies(num_clients: int, seed: int = 0):
    rng = np.random.default_rng(seed)
    base = {k: rng.standard_normal(s, dtype=np.float32) for k, s in SHAPES.items()}
    arrays = [
        {k: Array(base[k] + 0.01 * rng.standard_normal(s, dtype=np.float32)) for k, s in SHAPES.items()}
        for _ in range(num_clients)
    ]
    metrics = [{"num-examples": 100, "num-steps": 10 * (t + 1), "lr-sum": 0.1 * (t + 1)} for t in range(num_clients)]
    return ArrayRecord({k: Array(v) for k, v in base.items()}), arrays, metrics


def messages(arrays, metrics):
    """Fresh reply Messages over the same serialized arrays (Flower's FedMedian pops from its replies)."""
    out = []
    for t, (a, m) in enumerate(zip(arrays, metrics)):
        meta = Metadata(run_id=1, message_id=f"m{t}", src_node_id=t + 1, dst_node_id=0, reply_to_message_id="i",
                        group_id="1", created_at=0.0, ttl=3600.0, message_type="train")
        out.append(Message(content=RecordDict({"arrays": ArrayRecord(dict(a)), "metrics": MetricRecord(m)}), metadata=meta))
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--clients", type=int, default=8)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()

    base, arrays, metrics = make_replies(args.clients)
    params = sum(int(np.prod(s)) for s in SHAPES.values())
    print(f"{args.clients} clients x {params / 1e6:.1f}M float32 parameters "
          f"(largest tensor {max(int(np.prod(s)) for s in SHAPES.values()) * 4 / 2**20:.0f} MiB, "
          f"model {params * 4 / 2**20:.0f} MiB), best of {args.repeats}")

    methods = {
        "Flower FedAvg": lambda r: FlowerFedAvg().aggregate_train(1, r)[0],
        "Flower FedMedian": lambda r: FlowerFedMedian().aggregate_train(1, r)[0],
        "fedmerge FedAvg": lambda r: FedAvg().merge_replies(1, r, base)[0],
        "fedmerge FedNova": lambda r: FedNova().merge_replies(1, r, base)[0],
        "fedmerge FedGMA": lambda r: FedGMA(threshold=0.5).merge_replies(1, r, base)[0],
        "fedmerge Median": lambda r: Median().merge_replies(1, r, base)[0],
        "fedmerge CCLIP": lambda r: CClip(radius=None).merge_replies(1, r, base)[0],
        "fedmerge TIES": lambda r: Ties().merge_replies(1, r, base)[0],
        "fedmerge DARE-TIES": lambda r: DareTies().merge_replies(1, r, base)[0],
    }
    times, memory, outputs = {}, {}, {}
    for name, run in methods.items():
        samples = []
        for _ in range(args.repeats):
            replies = messages(arrays, metrics)
            with PeakMemory() as peak:
                start = time.perf_counter()
                result = run(replies)
                samples.append(time.perf_counter() - start)
            memory[name] = max(memory.get(name, 0), peak.extra)
        outputs[name] = {k: v.numpy() for k, v in result.items()}
        del result
        times[name] = min(samples)

    def max_diff(a, b):
        return max(float(np.abs(outputs[a][k] - outputs[b][k]).max()) for k in SHAPES)

    print(f"\n{'method':<18} {'time (s)':>9} {'peak extra (MiB)':>17} {'x fedmerge FedAvg':>18}")
    for name in methods:
        print(f"{name:<18} {times[name]:>9.3f} {memory[name] / 2**20:>17.0f} "
              f"{times[name] / times['fedmerge FedAvg']:>18.2f}")
    print(f"\nmax |fedmerge FedAvg - Flower FedAvg|      = {max_diff('fedmerge FedAvg', 'Flower FedAvg'):.2e}")
    print(f"max |fedmerge Median - Flower FedMedian|   = {max_diff('fedmerge Median', 'Flower FedMedian'):.2e}")
    print(f"Flower FedAvg / fedmerge FedAvg time      = {times['Flower FedAvg'] / times['fedmerge FedAvg']:.2f}  (target >= 2)")
    print(f"fedmerge Median / fedmerge FedAvg time    = {times['fedmerge Median'] / times['fedmerge FedAvg']:.2f}  (target <= 10)")
    print(f"Flower FedMedian / fedmerge Median time: {times['Flower FedMedian'] / times['fedmerge Median']:.2f}")


if __name__ == "__main__":
    main()
