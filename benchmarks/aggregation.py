"""Aggregation speed and peak extra memory: fedmerge's rules beside Flower's FedAvg and FedMedian.

T = 8 clients of a model of about 25M float32 parameters, the same Flower reply Messages for every
method. Peak extra memory is the highest resident memory seen above the level before the call
(sampled every millisecond).

Cores: every method is timed with the same cores, once per core count asked (by default one core, then all
this process may use). For k cores every thread of this process is pinned to the same k CPUs, torch's
intra-op threads and numpy's BLAS threads (threadpoolctl) are set to k, and fedmerge's merging driver, which
reads the cores it may use, runs k worker threads, torch single-threaded in each. Flower's FedAvg and
FedMedian run numpy element-wise arithmetic and ``np.median``, which use one thread whatever k.

Each fedmerge rule with a Flower counterpart must agree with it (max |difference| ≤ ``RTOL`` · max |value|
per tensor), else the run fails. Run: ``python benchmarks/aggregation.py [--clients 8] [--repeats 3]
[--cores 1 2]``. The last lines are the ratios Flower / fedmerge at each core count.
"""

import argparse
import gc
import os
import threading
import time

import numpy as np
import torch
from flwr.app import Array, ArrayRecord, Message, Metadata, MetricRecord, RecordDict
from flwr.serverapp.strategy import FedAvg as FlowerFedAvg
from flwr.serverapp.strategy import FedMedian as FlowerFedMedian
from threadpoolctl import threadpool_limits

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
RTOL = 1e-6
"""fedmerge and Flower agree when every tensor's max |difference| ≤ RTOL · its max |value|."""
PAIRS = (("fedmerge FedAvg", "Flower FedAvg"), ("fedmerge Median", "Flower FedMedian"))


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


def use_cores(cpus: list[int]) -> None:
    """Pin every thread of this process to ``cpus``; torch's intra-op and numpy's BLAS threads to as many."""
    for thread in os.listdir("/proc/self/task"):
        os.sched_setaffinity(int(thread), cpus)
    torch.set_num_threads(len(cpus))
    threadpool_limits(len(cpus))


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
        meta = Metadata(
            run_id=1,
            message_id=f"m{t}",
            src_node_id=t + 1,
            dst_node_id=0,
            reply_to_message_id="i",
            group_id="1",
            created_at=0.0,
            ttl=3600.0,
            message_type="train",
        )
        out.append(
            Message(content=RecordDict({"arrays": ArrayRecord(dict(a)), "metrics": MetricRecord(m)}), metadata=meta)
        )
    return out


def timed(run, arrays, metrics, repeats: int) -> tuple[float, int, dict]:
    """(best time in s, peak extra memory in bytes, the merged arrays) of ``run`` on fresh replies."""
    samples, extra = [], 0
    for _ in range(repeats):
        replies = messages(arrays, metrics)
        with PeakMemory() as peak:
            start = time.perf_counter()
            result = run(replies)
            samples.append(time.perf_counter() - start)
        extra = max(extra, peak.extra)
    return min(samples), extra, {k: v.numpy() for k, v in result.items()}


def agreement(ours: dict, theirs: dict, what: str) -> float:
    """max |ours − theirs| over every tensor; SystemExit naming the tensor where they differ beyond tolerance."""
    largest = 0.0
    for name in SHAPES:
        difference, bound = float(np.abs(ours[name] - theirs[name]).max()), RTOL * float(np.abs(theirs[name]).max())
        if not difference <= bound:
            raise SystemExit(
                f"{what}: tensor {name!r} differs by {difference:.3e} > {bound:.3e} (rtol {RTOL:g}); "
                "they did not compute the same aggregate"
            )
        largest = max(largest, difference)
    return largest


def main() -> None:
    cpus = sorted(os.sched_getaffinity(0))
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--clients", type=int, default=8)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument(
        "--cores",
        type=int,
        nargs="+",
        default=sorted({1, len(cpus)}),
        help=f"core counts to time every method with (default: 1 and all {len(cpus)})",
    )
    args = parser.parse_args()
    if not all(1 <= k <= len(cpus) for k in args.cores):
        raise SystemExit(f"--cores: each count must lie in 1..{len(cpus)}, the cores this process may use.")

    base, arrays, metrics = make_replies(args.clients)
    params = sum(int(np.prod(s)) for s in SHAPES.values())
    print(
        f"{args.clients} clients x {params / 1e6:.1f}M float32 parameters "
        f"(largest tensor {max(int(np.prod(s)) for s in SHAPES.values()) * 4 / 2**20:.0f} MiB, "
        f"model {params * 4 / 2**20:.0f} MiB), best of {args.repeats}"
    )
    print(
        "k cores: every thread pinned to the same k CPUs, torch.set_num_threads(k), numpy's BLAS threads k; "
        "fedmerge's merging driver runs k worker threads, torch single-threaded in each; Flower's FedAvg and "
        "FedMedian run numpy element-wise and np.median, one thread whatever k"
    )

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
    paired = {name for pair in PAIRS for name in pair}
    times, memory, differences = {}, dict.fromkeys(methods, 0), {}
    for k in args.cores:
        use_cores(cpus[:k])
        outputs = {}
        for name, run in methods.items():
            times[name, k], extra, output = timed(run, arrays, metrics, args.repeats)
            memory[name] = max(memory[name], extra)
            if name in paired:
                outputs[name] = output
        for ours, theirs in PAIRS:
            differences[ours, k] = agreement(outputs[ours], outputs[theirs], f"{ours} against {theirs} on {k} cores")
    use_cores(cpus)

    most = max(args.cores)
    columns = "".join(f"{f'{k} core' + ('s' if k > 1 else '') + ' (s)':>14}" for k in args.cores)
    print(f"\n{'method':<18} {columns} {'peak extra (MiB)':>17} {f'x fedmerge FedAvg ({most} cores)':>28}")
    for name in methods:
        row = "".join(f"{times[name, k]:>14.3f}" for k in args.cores)
        print(
            f"{name:<18} {row} {memory[name] / 2**20:>17.0f} {times[name, most] / times['fedmerge FedAvg', most]:>28.2f}"
        )

    def ratios(numerator: str, denominator: str) -> str:
        return ", ".join(
            f"{times[numerator, k] / times[denominator, k]:.2f} on {k} core{'s' if k > 1 else ''} each"
            for k in args.cores
        )

    print()
    for ours, theirs in PAIRS:
        largest = max(differences[ours, k] for k in args.cores)
        print(
            f"max |{ours} - {theirs}| = {largest:.2e} (per tensor <= {RTOL:g} x max|value|, checked at every core count)"
        )
    print(f"Flower FedAvg / fedmerge FedAvg time:      {ratios('Flower FedAvg', 'fedmerge FedAvg')}  (target >= 2)")
    print(f"fedmerge Median / fedmerge FedAvg time:    {ratios('fedmerge Median', 'fedmerge FedAvg')}  (target <= 10)")
    print(f"Flower FedMedian / fedmerge Median time:   {ratios('Flower FedMedian', 'fedmerge Median')}")


if __name__ == "__main__":
    main()
