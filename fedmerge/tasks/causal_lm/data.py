"""Instruction data sets on disk, tokenised for a causal language model with the loss on the response only.

A task is a JSONL file (one JSON object per line, the prompt and the response under field names that are
options) or a folder written by ``datasets``' ``save_to_disk`` (a ``Dataset``, or a ``DatasetDict`` of which
one split is read). Its rows are shuffled from the seed and split into train / val / test.

An example is ``(input_ids, labels)``: the prompt (through the template, with the tokenizer's special tokens)
followed by the response and the end-of-sequence token; ``labels`` is ``input_ids`` with the prompt and the
padding set to -100, so only response tokens count in the loss. Each split is padded on the right to its
longest example (at most ``max_length`` tokens): with causal attention, padding after the last token changes
no logit that is scored, so no attention mask is needed.
"""

import json
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import TensorDataset

from fedmerge.errors import FedmergeError

IGNORE = -100
"""The label of a token that does not count in the loss (prompt and padding)."""


class Examples(TensorDataset):
    """A split's ``(input_ids, labels)`` pairs (a :class:`TensorDataset`: the trainer's in-memory fast path), with
    what evaluation needs besides: each example's ``lengths``, its ``prompts`` (token ids, for generation) and
    its reference ``answers`` (None where the response has no final answer, or no extractor is set)."""

    def __init__(
        self,
        input_ids: torch.Tensor,
        labels: torch.Tensor,
        lengths: list[int],
        prompts: list[list[int]],
        answers: list[str | None],
    ) -> None:
        super().__init__(input_ids, labels)
        self.lengths, self.prompts, self.answers = lengths, prompts, answers


def read_rows(path: str, split: str) -> list[dict]:
    """The rows of a task: a JSONL file, or a ``save_to_disk`` folder (its ``split`` if it is a DatasetDict)."""
    file = Path(path).expanduser()
    if not file.exists():
        raise FedmergeError(
            f"task {path}: no such file or folder; give a JSONL file (one JSON object per line) or "
            "a folder written by datasets' save_to_disk (option 'tasks')."
        )
    if file.is_dir():
        return _saved_rows(file, split)
    rows = []
    with file.open(encoding="utf-8") as lines:
        for number, line in enumerate(lines, 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as error:
                raise FedmergeError(
                    f"task {path}, line {number}: not valid JSON ({error.msg}); a JSONL file holds one "
                    "JSON object per line."
                ) from None
            if not isinstance(row, dict):
                raise FedmergeError(
                    f"task {path}, line {number}: a JSON {type(row).__name__}, not an object; each "
                    'line must be an object such as {"prompt": ..., "response": ...}.'
                )
            rows.append(row)
    return rows


def _saved_rows(folder: Path, split: str) -> list[dict]:
    import datasets

    try:
        data = datasets.load_from_disk(str(folder))
    except (FileNotFoundError, ValueError, OSError) as error:
        raise FedmergeError(
            f"task {folder}: a folder, but not one written by datasets' save_to_disk ({error}); give "
            "such a folder or a JSONL file."
        ) from None
    if isinstance(data, datasets.DatasetDict):
        if split not in data:
            raise FedmergeError(
                f"task {folder}: the saved DatasetDict has no split {split!r}; it has "
                f"{', '.join(data)}: set option 'hf_split' to one of them."
            )
        data = data[split]
    return data.to_list()


def texts(rows: list[dict], path: str, prompt_field: str, response_field: str) -> list[tuple[str, str]]:
    """``(prompt, response)`` of every row; a missing or non-string field is named with its line and the fix."""
    pairs = []
    for number, row in enumerate(rows, 1):
        for field, option in ((prompt_field, "prompt_field"), (response_field, "response_field")):
            if not isinstance(row.get(field), str):
                problem = "has no field" if field not in row else f"has a {type(row[field]).__name__} in field"
                raise FedmergeError(
                    f"task {path}, row {number}: {problem} {field!r} (its fields: "
                    f"{', '.join(map(str, row)) or 'none'}); set option {option!r} to the field that "
                    "holds the text."
                )
        pairs.append((row[prompt_field], row[response_field]))
    return pairs


def split_indices(
    size: int, seed: int, task: int, val_fraction: float, test_fraction: float, path: str
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Train / val / test indices: a permutation drawn from (seed, task), then the val and test shares (each ≥ 1)."""
    n_val, n_test = max(1, round(size * val_fraction)), max(1, round(size * test_fraction))
    if size - n_val - n_test < 1:
        raise FedmergeError(
            f"task {path} has {size} examples: too few for a train, a validation and a test split "
            f"(val_fraction {val_fraction:g}, test_fraction {test_fraction:g}); give it at least 3 "
            "examples, or more."
        )
    order = np.random.default_rng([seed, task]).permutation(size)
    return order[n_val + n_test :], order[:n_val], order[n_val : n_val + n_test]


def encode(tokenizer, template: str, prompt: str, response: str, max_length: int) -> tuple[list[int], list[int]]:
    """``(prompt ids, response ids)``: the templated prompt with the tokenizer's special tokens, the response
    followed by the end-of-sequence token, cut to ``max_length`` together: the response keeps at least
    ``min(its length, max_length // 2)`` tokens, the prompt its last tokens."""
    prompt_ids = tokenizer(template.replace("{prompt}", prompt))["input_ids"]
    response_ids = tokenizer(response, add_special_tokens=False)["input_ids"]
    if tokenizer.eos_token_id is not None:
        response_ids = response_ids + [tokenizer.eos_token_id]
    keep = min(len(prompt_ids), max_length - min(len(response_ids), max_length // 2))
    prompt_ids = prompt_ids[len(prompt_ids) - keep :]
    return prompt_ids, response_ids[: max_length - keep]


def examples(pairs: list[tuple[list[int], list[int]]], answers: list[str | None], pad_id: int) -> Examples:
    """A split's tensors from its ``(prompt ids, response ids)``, right-padded to its longest example."""
    lengths = [len(p) + len(r) for p, r in pairs]
    width = max(lengths)
    input_ids = torch.full((len(pairs), width), pad_id, dtype=torch.long)
    labels = torch.full((len(pairs), width), IGNORE, dtype=torch.long)
    for i, (prompt, response) in enumerate(pairs):
        input_ids[i, : lengths[i]] = torch.tensor(prompt + response, dtype=torch.long)
        labels[i, len(prompt) : lengths[i]] = torch.tensor(response, dtype=torch.long)
    return Examples(input_ids, labels, lengths, [p for p, _ in pairs], answers)
