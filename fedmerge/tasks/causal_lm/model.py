"""The causal language model and its tokenizer, from a local directory or the local Hugging Face cache (never
downloaded).

The model keeps its own class and state-dict names (``model.layers.0.self_attn.q_proj.weight``, ...), so the
models fedmerge writes load into ``AutoModelForCausalLM`` as they are, and the task vectors of checkpoints made
elsewhere line up with it. fedmerge calls it as ``model(input_ids)``; the suite's loss reads ``.logits``.
"""

from pathlib import Path

import torch

from fedmerge.errors import FedmergeError
from fedmerge.tasks import hub
from fedmerge.tasks.hub import quiet

FILES = "config.json, model.safetensors (or pytorch_model.bin) and the tokenizer's files (tokenizer.json, ...)"


def model_dir(model: str) -> Path:
    """The directory of ``model``: itself, or its snapshot in the local Hugging Face cache."""
    return hub.model_dir(model, FILES)


def load_tokenizer(directory: Path, model: str):
    """The model's tokenizer (``AutoTokenizer``, local files only)."""
    from transformers import AutoTokenizer

    try:
        with quiet():
            return AutoTokenizer.from_pretrained(directory, local_files_only=True)
    except (OSError, ValueError, TypeError) as error:
        raise FedmergeError(
            f"option 'model': the tokenizer of {model!r} could not be loaded from {directory} ({error}); "
            f"the directory needs {FILES}, as save_pretrained writes them."
        ) from None


def load_model(directory: Path, model: str) -> torch.nn.Module:
    """The full model in float32 (``AutoModelForCausalLM``, local files only), every parameter trained.

    The one place the suite's model is made: a LoRA variant wraps what this returns.
    """
    from transformers import AutoModelForCausalLM

    try:
        with quiet():
            return AutoModelForCausalLM.from_pretrained(directory, local_files_only=True, dtype=torch.float32)
    except (OSError, ValueError, KeyError) as error:
        raise FedmergeError(
            f"option 'model': {model!r} could not be loaded as a causal language model from {directory} "
            f"({error}); the directory needs {FILES}, as save_pretrained writes them."
        ) from None


def with_lora(model: torch.nn.Module, r: int, alpha: float, dropout: float, target_modules: list[str], seed: int):
    """``model`` with LoRA adapters (peft) on ``target_modules``: only their factors A and B train, so only they
    travel between server and clients and are merged; the base weights stay frozen at θ0. A's random start is
    drawn from ``seed``, so every process that builds the suite starts from the same θ0 (B starts at 0)."""
    from peft import LoraConfig, get_peft_model

    names = {name.rsplit(".", 1)[-1] for name, _ in model.named_modules()}
    missing = [module for module in target_modules if module not in names]
    if missing:
        raise FedmergeError(
            f"option 'lora_target_modules': the model has no module named {missing[0]!r}; its modules "
            f"include {', '.join(sorted(n for n in names if n)[:12])}."
        )
    config = LoraConfig(r=r, lora_alpha=alpha, lora_dropout=dropout, target_modules=list(target_modules))
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        with quiet():
            return get_peft_model(model, config)
