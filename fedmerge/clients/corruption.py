"""Corrupted updates, for robustness studies: a client that sends θ0 + c(τ) instead of θ0 + τ.

``sign-flip`` sends −scale·τ; ``noise`` sends Gaussian noise of norm scale·‖τ‖ (seeded by the client);
``nan`` sends NaN in every floating tensor (a client whose training diverged).
"""

import torch

from fedmerge.errors import FedmergeError

CORRUPTIONS = ("none", "sign-flip", "noise", "nan")


def check_corruption(kind: str, scale: float) -> None:
    if kind not in CORRUPTIONS:
        raise FedmergeError(f"client option 'corruption' must be one of {', '.join(CORRUPTIONS)}, got {kind!r}.")
    if not (isinstance(scale, (int, float)) and scale > 0):
        raise FedmergeError(f"client option 'corruption_scale' must be a positive number, got {scale!r}.")


def corrupt(
    trained: dict[str, torch.Tensor], base: dict[str, torch.Tensor], kind: str, scale: float, seed: int
) -> dict:
    """The weights a corrupted client sends instead of ``trained`` (integer buffers are left alone)."""
    if kind == "none":
        return trained
    names = [n for n, t in base.items() if t.is_floating_point()]
    tau = {n: trained[n].float() - base[n].float() for n in names}
    if kind == "sign-flip":
        fake = {n: -scale * tau[n] for n in names}
    elif kind == "nan":
        fake = {n: torch.full_like(tau[n], float("nan")) for n in names}
    else:
        generator = torch.Generator().manual_seed(seed)
        noise = {n: torch.randn(tau[n].shape, generator=generator) for n in names}
        ratio = scale * _norm(tau) / max(_norm(noise), 1e-12)
        fake = {n: ratio * noise[n] for n in names}
    return {n: (base[n].float() + fake[n]).to(base[n].dtype) if n in fake else trained[n] for n in trained}


def _norm(tensors: dict[str, torch.Tensor]) -> float:
    return float(torch.sqrt(sum((t.double() ** 2).sum() for t in tensors.values())))
