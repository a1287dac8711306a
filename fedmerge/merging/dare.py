"""DARE: drop each task-vector entry at random and rescale the rest, then average or elect signs (TIES).

Yu, Yu, Yu, Huang, Li, "Language Models are Super Mario: Absorbing Abilities from Homologous Models as a
Free Lunch", ICML 2024. Each entry of τ_t is kept with probability k (density) and the kept ones are
rescaled by 1/k, so E[τ̃_t] = τ_t; then ``dare-linear``: Δ = Σ_t p_t τ̃_t, or ``dare-ties``: TIES's elected
sign and disjoint mean over the τ̃_t (see :mod:`fedmerge.merging.ties`).

The draws are made on the CPU in blocks of 65536 positions, each block by a generator seeded from (seed,
client, tensor name, block), so they are the same whatever the chunking, the thread that merges a chunk,
or the device (the mask is copied there): a merge on the GPU equals the CPU's.
"""

import zlib
from collections.abc import Sequence

import torch

from fedmerge.merging.method import Method, Param
from fedmerge.merging.rule import Rule, merge
from fedmerge.merging.tensors import weighted_sum_into
from fedmerge.merging.ties import DENSITIES, DENSITY, disjoint_mean_into
from fedmerge.options import Option, non_negative_int, proportion

BLOCK = 1 << 16  # draws are made in blocks of this many positions, each from its own seeded generator


def keep_mask(seed: int, name: str, client: int, s: slice, density: float, device: torch.device,
              draw: int = 0) -> torch.Tensor:
    """Whether each position of ``s`` of tensor ``name`` is kept for ``client`` in draw ``draw`` (a round): a
    uniform draw below ``density``.

    Position j's draw is element j mod BLOCK of block j // BLOCK, drawn on the CPU by a generator seeded from
    (seed, draw, client, name, block): the same whatever slices are asked for, and copied to ``device``. The CPU
    generator takes 32-bit seeds, so among many blocks a few pairs share their pattern (about n²/2³³ pairs for n
    blocks in all): harmless for the drops' statistics, since such blocks lie at unrelated places.
    """
    key = f"{seed}/{draw}/{client}/{name}/"
    first, last = s.start // BLOCK, (s.stop - 1) // BLOCK
    draws = torch.empty((last - first + 1) * BLOCK, device="cpu")
    generator = torch.Generator()
    for k, block in enumerate(range(first, last + 1)):
        generator.manual_seed(zlib.crc32(f"{key}{block}".encode()))  # the CPU generator keeps 32 bits of a seed
        torch.rand(BLOCK, generator=generator, out=draws[k * BLOCK : (k + 1) * BLOCK], device="cpu")
    start = s.start - first * BLOCK
    return (draws[start : start + s.stop - s.start] < density).to(device)


class DareRule(Rule):
    """Random drop and rescale, then the weighted mean (``elect_sign=False``) or TIES's disjoint mean."""

    name = "dare"

    def __init__(self, density: float = 0.2, seed: int = 0, elect_sign: bool = False,
                 weights: Sequence[float] | None = None, clients: Sequence[int] | None = None, draw: int = 0) -> None:
        super().__init__(weights)
        self.density = proportion("DARE density", density)
        self.seed = non_negative_int("DARE seed", seed)
        self.elect_sign = elect_sign
        self.clients = clients  # each client's identity in the draws (default: its position)
        self.draw = draw  # a round's number: each round drops other entries
        self.name = "dare-ties" if elect_sign else "dare-linear"

    def merge_chunk(self, name, s, values, out):
        if self.density < 1:
            for t, row in zip(self.present, values):
                client = int(t) if self.clients is None else int(self.clients[t])
                row.mul_(keep_mask(self.seed, name, client, s, self.density, row.device, self.draw)).div_(self.density)
        if self.elect_sign:
            disjoint_mean_into(out, values, self.p)
        else:
            weighted_sum_into(out, values, self.p)

    def params(self) -> dict:
        return {"rule": self.name, "density": self.density, "seed": self.seed}


def dare(task_vectors, density: float = 0.2, seed: int = 0, elect_sign: bool = False,
         weights: Sequence[float] | None = None) -> dict[str, torch.Tensor]:
    """Δ of DARE with density k, the draws' ``seed``, then the mean or (``elect_sign``) TIES's disjoint mean."""
    return merge(DareRule(density, seed, elect_sign, weights), task_vectors)


SEED = Param("seed", Option(0, "the seed of the random drops (the same seed drops the same entries)", non_negative_int))
LINEAR = Method(
    "dare-linear", DareRule, "DARE: drop entries at random, rescale by 1/k, average (Yu et al. 2024)",
    params=(DENSITY, SEED), tuned="density", grid=lambda norms: list(DENSITIES),
    make=lambda weights, **params: DareRule(**params, elect_sign=False, weights=weights),
)
TIES = Method(
    "dare-ties", DareRule, "DARE's random drop and rescale, then TIES's elected sign and disjoint mean",
    params=(DENSITY, SEED), tuned="density", grid=lambda norms: list(DENSITIES),
    make=lambda weights, **params: DareRule(**params, elect_sign=True, weights=weights), scale="mean",
)
