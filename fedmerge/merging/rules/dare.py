"""DARE: drop each task-vector entry at random and rescale the rest, then average or elect signs (TIES).

Yu, Yu, Yu, Huang, Li, "Language Models are Super Mario: Absorbing Abilities from Homologous Models as a
Free Lunch", ICML 2024. Each entry of τ_t is kept with probability k (density) and the kept ones are
rescaled by 1/k, so E[τ̃_t] = τ_t; then ``dare-linear``: Δ = Σ_t p_t τ̃_t, or ``dare-ties``: TIES's elected
sign and disjoint mean over the τ̃_t (see :mod:`fedmerge.merging.rules.ties`).

The draws are counter-based: position j's draw is a hash of (seed, round, client, tensor name, j), made on the
merge's device by integer operations that give the same bits on every device, so the drops are the same whatever
the chunking, the thread that merges a chunk, or the device (a merge on the GPU equals the CPU's).
"""

import hashlib
from collections.abc import Sequence

import torch

from fedmerge.merging.method import Method, Param
from fedmerge.merging.rule import Rule, merge
from fedmerge.merging.rules.ties import DENSITIES, DENSITY, disjoint_mean_into
from fedmerge.merging.tensors import weighted_sum_into
from fedmerge.options import Option, non_negative_int, proportion

WORD = 1 << 32
MULTIPLIERS = (0x7FEB352D, 0x846CA68B)  # lowbias32's (C. Wellons, hash-prospector): 32-bit words, low bias


def keep_mask(
    seed: int, name: str, client: int, s: slice, density: float, device: torch.device, draw: int = 0
) -> torch.Tensor:
    """Whether each position of ``s`` of tensor ``name`` is kept for ``client`` in draw ``draw`` (a round), made on
    ``device``: position j is kept when its 32 random bits (:func:`random_bits`), read as an unsigned number, are
    below round(density · 2³²)."""
    threshold = min(round(density * WORD), WORD - 1)
    bits = random_bits(stream_key(seed, draw, client, name), s, device)
    return bits.bitwise_xor_(_signed(1 << 31)) < threshold - (1 << 31)  # the sign bit flipped: unsigned order


def stream_key(seed: int, draw: int, client: int, name: str) -> tuple[int, int]:
    """Two 32-bit keys of the draws' stream, from a hash of (seed, draw, client, name) that every run repeats."""
    digest = hashlib.blake2b(f"{seed}/{draw}/{client}/{name}".encode(), digest_size=8).digest()
    return int.from_bytes(digest[:4], "little"), int.from_bytes(digest[4:], "little")


def random_bits(key: tuple[int, int], s: slice, device: torch.device) -> torch.Tensor:
    """32 random bits per position j of ``s``, as int32 on ``device``: h(h(j mod 2³² ⊕ k₁) ⊕ ⌊j / 2³²⌋ ⊕ k₂), h
    lowbias32 and (k₁, k₂) the stream's ``key``. Two rounds keyed apart, so streams share no structure.

    Integer arithmetic wraps modulo 2³² on every device torch runs on; tests check the bits against this formula
    computed on Python integers."""
    bits = torch.empty(s.stop - s.start, dtype=torch.int32, device=device)
    scratch = torch.empty_like(bits)
    start = s.start
    while start < s.stop:
        stop = min(s.stop, (start // WORD + 1) * WORD)  # a part within one value of ⌊j / 2³²⌋
        x, tmp = bits[start - s.start : stop - s.start], scratch[: stop - start]
        torch.arange(stop - start, dtype=torch.int32, device=device, out=x).add_(_signed(start))  # j mod 2³²
        _lowbias32(x.bitwise_xor_(_signed(key[0])), tmp)
        _lowbias32(x.bitwise_xor_(_signed((start // WORD) ^ key[1])), tmp)
        start = stop
    return bits


def _lowbias32(x: torch.Tensor, tmp: torch.Tensor) -> None:
    """x ← lowbias32(x) in place, 32-bit words in int32 (shifts made logical by masking off the sign's copies)."""
    for shift, multiplier in zip((16, 15), MULTIPLIERS):
        _xorshift(x, shift, tmp)
        x.mul_(_signed(multiplier))
    _xorshift(x, 16, tmp)


def _xorshift(x: torch.Tensor, shift: int, tmp: torch.Tensor) -> None:
    x.bitwise_xor_(torch.bitwise_right_shift(x, shift, out=tmp).bitwise_and_((1 << (32 - shift)) - 1))


def _signed(word: int) -> int:
    """A 32-bit word as the int32 holding its bits."""
    word %= WORD
    return word - WORD if word >= 1 << 31 else word


class DareRule(Rule):
    """Random drop and rescale, then the weighted mean (``elect_sign=False``) or TIES's disjoint mean."""

    name = "dare"

    def __init__(
        self,
        density: float = 0.2,
        seed: int = 0,
        elect_sign: bool = False,
        weights: Sequence[float] | None = None,
        clients: Sequence[int] | None = None,
        draw: int = 0,
    ) -> None:
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


def dare(
    task_vectors, density: float = 0.2, seed: int = 0, elect_sign: bool = False, weights: Sequence[float] | None = None
) -> dict[str, torch.Tensor]:
    """Δ of DARE with density k, the draws' ``seed``, then the mean or (``elect_sign``) TIES's disjoint mean."""
    return merge(DareRule(density, seed, elect_sign, weights), task_vectors)


SEED = Param("seed", Option(0, "the seed of the random drops (the same seed drops the same entries)", non_negative_int))
LINEAR = Method(
    "dare-linear",
    DareRule,
    "DARE: drop entries at random, rescale by 1/k, average (Yu et al. 2024)",
    params=(DENSITY, SEED),
    tuned="density",
    grid=lambda norms: list(DENSITIES),
    make=lambda weights, **params: DareRule(**params, elect_sign=False, weights=weights),
)
TIES = Method(
    "dare-ties",
    DareRule,
    "DARE's random drop and rescale, then TIES's elected sign and disjoint mean",
    params=(DENSITY, SEED),
    tuned="density",
    grid=lambda norms: list(DENSITIES),
    make=lambda weights, **params: DareRule(**params, elect_sign=True, weights=weights),
    scale="mean",
)
