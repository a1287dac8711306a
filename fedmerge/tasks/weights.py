"""θ0 from a weights file: ``.safetensors``, or a PyTorch ``.pt``/``.pth``/``.bin`` state dict (read safely)."""

from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file

from fedmerge.errors import FedmergeError

TORCH_SUFFIXES = (".pt", ".pth", ".bin")


def load_weights(path: str | Path) -> dict[str, torch.Tensor]:
    """The state dict stored at ``path``, on the CPU.

    PyTorch files are read with ``weights_only=True`` (a pickle that runs code is refused). A Hugging Face
    model directory is not a weights file: load it in the suite's ``model_fn`` with ``from_pretrained``.
    """
    path = Path(path)
    if path.is_dir():
        raise FedmergeError(
            f"theta0 {path} is a directory; give a weights file, or load a Hugging Face model "
            "directory in model_fn with from_pretrained(...) and leave theta0 unset."
        )
    if not path.is_file():
        raise FedmergeError(f"theta0 {path} does not exist; give the path of a .safetensors or .pt file.")
    try:
        if path.suffix == ".safetensors":
            return load_file(path)
        if path.suffix in TORCH_SUFFIXES:
            state = torch.load(path, map_location="cpu", weights_only=True)
            if isinstance(state, dict) and all(isinstance(v, torch.Tensor) for v in state.values()):
                return state
            raise FedmergeError(
                f"theta0 {path} holds a {type(state).__name__}, not a state dict of tensors; save model.state_dict()."
            )
    except (SafetensorError, OSError, RuntimeError, ValueError) as error:
        raise FedmergeError(f"theta0 {path} cannot be read ({error}); is it a complete weights file?") from None
    raise FedmergeError(f"theta0 {path}: unknown format {path.suffix!r}; give .safetensors, .pt, .pth or .bin.")
