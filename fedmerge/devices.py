"""Which torch device a setting names: ``cpu``, ``cuda`` (or ``cuda:N``), or ``auto`` (cuda where there is one)."""

import torch

from fedmerge.errors import FedmergeError

DEVICES = ("cpu", "cuda", "auto")


def resolve_device(device: str | torch.device, option: str = "--device") -> torch.device:
    """The device ``device`` names on this machine; ``option`` (how the user set it) goes into the messages.

    Raises :class:`FedmergeError` for an unknown device, or a CUDA device this machine does not have.
    """
    if str(device) == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        resolved = torch.device(device)
    except (RuntimeError, TypeError):
        resolved = None
    if resolved is None or resolved.type not in ("cpu", "cuda"):
        raise FedmergeError(f"{option}: unknown device {device!r}; choose one of {', '.join(DEVICES)} (or cuda:N).")
    if resolved.type == "cuda" and not torch.cuda.is_available():
        raise FedmergeError(
            f"{option} {device}: CUDA is not available on this machine (torch.cuda.is_available() is False); "
            f"use {option} cpu, or {option} auto to take a GPU only where there is one."
        )
    if resolved.type == "cuda" and (resolved.index or 0) >= torch.cuda.device_count():
        raise FedmergeError(
            f"{option}: there is no {resolved}; this machine has {torch.cuda.device_count()} CUDA device(s)."
        )
    return resolved
