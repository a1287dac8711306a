"""How the causal-lm suite trains and scores: the loss on response tokens, held-out loss, and exact match of the
final answer after greedy generation.

An answer extractor is a function ``extract(text) -> str | None``: the final answer of a response (None when
it has none). ``gsm8k`` reads GSM8K's ``#### 42`` convention; a user's is given as ``module:function``.
"""

import importlib
import re
from collections.abc import Callable, Mapping

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import Dataset

from fedmerge.errors import FedmergeError
from fedmerge.tasks.causal_lm.data import IGNORE, Examples
from fedmerge.tasks.causal_lm.model import quiet

Extractor = Callable[[str], str | None]
GSM8K = re.compile(r"####[ \t]*([^#\n][^\n]*)")


def gsm8k_answer(text: str) -> str | None:
    """The answer after GSM8K's ``####`` (the first one followed by an answer on its line; a longer run of ``#``
    counts as ``####``), numbers normalised: ``#### 1,234.`` → ``1234``, ``#### 42.0`` → ``42``, ``#### $5`` → ``5``;
    other text as written, stripped. None without one."""
    found = GSM8K.search(text)
    if found is None:
        return None
    answer = found.group(1).strip()
    number = answer.replace(",", "").replace("$", "").rstrip(".").strip()
    try:
        value = float(number)
    except ValueError:
        return answer or None
    return str(int(value)) if value == int(value) else repr(value)


def answer_extractor(name: str) -> Extractor | None:
    """The extractor called ``name``: ``gsm8k``, ``none`` (None: score by loss only) or ``module:function``
    (its answers compared as strings; an exception inside it is reported naming it)."""
    if name == "gsm8k":
        return gsm8k_answer
    if name == "none":
        return None
    module_name, sep, function = name.partition(":")
    fix = (
        "set option 'answer' to 'gsm8k', 'none', or 'module:function' naming a function text -> answer (or None) "
        "in a module on the Python path (beside the experiment file)"
    )
    if not sep or not module_name or not function:
        raise FedmergeError(f"option 'answer': unknown answer extractor {name!r}; {fix}.")
    try:
        module = importlib.import_module(module_name)
    except ModuleNotFoundError as error:
        raise FedmergeError(
            f"option 'answer': answer extractor {name!r}: no module {error.name!r} ({error}); {fix}."
        ) from None
    except Exception as error:
        raise FedmergeError(
            f"option 'answer': importing {module_name} failed: {type(error).__name__}: {error}"
        ) from None
    extract = getattr(module, function, None)
    if not callable(extract):
        raise FedmergeError(f"option 'answer': module {module_name} has no function {function!r}; {fix}.")

    def guarded(text: str) -> str | None:
        try:
            answer = extract(text)
        except Exception as error:
            raise FedmergeError(
                f"option 'answer': the answer extractor {name} failed on {text[:60]!r}: {type(error).__name__}: {error}"
            ) from None
        return None if answer is None else str(answer)

    return guarded


def response_loss(output, labels: torch.Tensor) -> torch.Tensor:
    """Mean next-token cross-entropy over the response tokens of the batch (labels -100 elsewhere).

    ``output`` is the model's output (its ``.logits``) or the logits themselves, ``(batch, length, vocab)``.
    """
    logits = getattr(output, "logits", output)
    return F.cross_entropy(logits[:, :-1].flatten(0, 1).float(), labels[:, 1:].flatten(), ignore_index=IGNORE)


class Scorer:
    """``Federation.evaluate_fn`` of the suite: held-out loss (per response token) and, with an extractor,
    ``accuracy``: the share of examples whose greedy continuation of the prompt (at most ``max_new_tokens``
    tokens) has the reference's final answer. Examples whose reference has no final answer are not counted.
    """

    def __init__(self, tokenizer, extract: Extractor | None, max_new_tokens: int, batch_size: int, pad_id: int) -> None:
        self.tokenizer, self.extract = tokenizer, extract
        self.max_new_tokens, self.batch_size, self.pad_id = max_new_tokens, batch_size, pad_id

    def __call__(self, model: nn.Module, data: Dataset, head: int | None = None) -> Mapping[str, float]:
        result = {"loss": self.loss(model, data)}
        if self.extract is not None and isinstance(data, Examples):
            result["accuracy"] = self.exact_match(model, data)
        return result

    def loss(self, model: nn.Module, data: Dataset) -> float:
        """Cross-entropy per response token over the whole split."""
        from fedmerge.tasks.loading import eval_batches

        device = next(model.parameters()).device
        total, count = 0.0, 0
        for input_ids, labels in eval_batches(data, self.batch_size, device=device):
            width = int((labels != IGNORE).long().cumsum(1).argmax(1).max()) + 1  # the batch's last scored token
            logits = model(input_ids[:, :width]).logits
            tokens = int((labels[:, 1:width] != IGNORE).sum())
            total += float(response_loss(logits, labels[:, :width])) * tokens
            count += tokens
        return total / max(count, 1)

    def generate(self, model: nn.Module, prompts: list[list[int]]) -> list[str]:
        """Greedy continuations (decoded, special tokens dropped) of token-id prompts, in batches, left-padded."""
        device = next(model.parameters()).device
        texts = []
        for start in range(0, len(prompts), self.batch_size):
            batch = prompts[start : start + self.batch_size]
            width = max(map(len, batch))
            input_ids = torch.full((len(batch), width), self.pad_id, dtype=torch.long)
            mask = torch.zeros((len(batch), width), dtype=torch.long)
            for i, prompt in enumerate(batch):
                input_ids[i, width - len(prompt) :] = torch.tensor(prompt, dtype=torch.long)
                mask[i, width - len(prompt) :] = 1
            with quiet():
                out = model.generate(
                    input_ids=input_ids.to(device),
                    attention_mask=mask.to(device),
                    do_sample=False,
                    max_new_tokens=self.max_new_tokens,
                    pad_token_id=self.pad_id,
                    eos_token_id=self.tokenizer.eos_token_id,
                )
            texts += self.tokenizer.batch_decode(out[:, width:].cpu(), skip_special_tokens=True)
        return texts

    def exact_match(self, model: nn.Module, data: Examples) -> float:
        """The share of the answerable examples whose generated final answer equals the reference's."""
        answerable = [i for i, answer in enumerate(data.answers) if answer is not None]
        if not answerable:
            return 0.0
        generated = self.generate(model, [data.prompts[i] for i in answerable])
        right = sum(self.extract(text) == data.answers[i] for i, text in zip(answerable, generated))
        return right / len(answerable)
