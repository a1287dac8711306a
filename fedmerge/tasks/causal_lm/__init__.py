"""The ``causal-lm`` suite: a causal language model fine-tuned on one instruction data set per client (the paper's
LLM experiment is three such fine-tunes merged).

The model and its tokenizer come from a local directory or the local Hugging Face cache
(:mod:`fedmerge.tasks.causal_lm.model`), the tasks from JSONL files or ``save_to_disk`` folders
(:mod:`fedmerge.tasks.causal_lm.data`); nothing downloads. Every parameter trains (full fine-tuning), or, with
``lora_r``, only LoRA adapters (peft) do, and only they travel and are merged; the loss counts the response
tokens only. A task is scored by its held-out loss and, with an answer extractor, by exact
match of the final answer after greedy generation (:mod:`fedmerge.tasks.causal_lm.scoring`), which is the
suite's ``accuracy``: normalised accuracy divides it by the client's own. θ0 is the model's own weights.
docs/llm.md.
"""

import copy
from pathlib import Path

from fedmerge.errors import FedmergeError
from fedmerge.options import Option, fraction, list_of, non_negative_float, positive_float, positive_int, string, text
from fedmerge.tasks.causal_lm.data import encode, examples, read_rows, split_indices, texts
from fedmerge.tasks.causal_lm.model import load_model, load_tokenizer, model_dir, with_lora
from fedmerge.tasks.causal_lm.scoring import Scorer, answer_extractor, response_loss
from fedmerge.tasks.federation import Federation, Task


def extractor_name(name: str, value) -> str:
    """``gsm8k``, ``none`` or ``module:function`` (imported when the suite is built)."""
    value = text(name, value)
    module, sep, function = value.partition(":")
    if value not in ("gsm8k", "none") and not (sep and module and function):
        raise FedmergeError(
            f"option {name!r}: unknown answer extractor {value!r}; give 'gsm8k' (GSM8K's '#### 42'), "
            "'none' (score by loss only) or 'module:function' naming your own function text -> answer."
        )
    return value


def template(name: str, value) -> str:
    value = string(name, value)
    if "{prompt}" not in value:
        raise FedmergeError(f"option {name!r} must contain '{{prompt}}' where the prompt goes, got {value!r}.")
    return value


def at_least_two(name: str, value) -> int:
    value = positive_int(name, value)
    if value < 2:
        raise FedmergeError(f"option {name!r} must be at least 2 (a prompt token and a response token), got {value}.")
    return value


def dropout(name: str, value) -> float:
    value = non_negative_float(name, value)
    if value >= 1:
        raise FedmergeError(f"option {name!r} must be a number in [0, 1), got {value!r}.")
    return value


DESCRIPTION = (
    "A causal language model fine-tuned (fully, or LoRA adapters) on one instruction data set per client "
    "(JSONL or save_to_disk)."
)
OPTIONS = {
    "model": Option(
        None, "a directory written by save_pretrained, or a Hugging Face model name in the local cache (required)", text
    ),
    "tasks": Option(
        None, "one client per task, in order: JSONL files or save_to_disk folders (required)", list_of(text)
    ),
    "prompt_field": Option("prompt", "the field holding the prompt", text),
    "response_field": Option("response", "the field holding the response", text),
    "prompt_template": Option(
        "{prompt}\n", "the text the model sees before the response; {prompt} is replaced by the prompt", template
    ),
    "hf_split": Option("train", "the split read from a saved DatasetDict", text),
    "max_length": Option(
        512,
        "tokens per example, prompt and response together (the prompt is cut from the left, "
        "then the response from the right)",
        at_least_two,
    ),
    "max_examples": Option(
        None, "at most this many examples per task (a seeded subset, drawn before splitting)", positive_int
    ),
    "val_fraction": Option(0.1, "share of each task drawn (seeded) as its validation split", fraction),
    "test_fraction": Option(0.1, "share of each task drawn (seeded) as its test split", fraction),
    "answer": Option(
        "gsm8k",
        "the final-answer extractor: gsm8k ('#### 42'), none (score by loss only), or "
        "module:function (text -> answer or None)",
        extractor_name,
    ),
    "max_new_tokens": Option(256, "token limit of the greedy generation scored by exact match", positive_int),
    "eval_batch_size": Option(16, "examples per batch in evaluation and generation", positive_int),
    "lora_r": Option(
        None,
        "LoRA's rank r: train only LoRA adapters (peft) of this rank on lora_target_modules; unset: full fine-tuning",
        positive_int,
    ),
    "lora_alpha": Option(16.0, "LoRA's α: the adapters add (α/r)·B·A", positive_float),
    "lora_dropout": Option(0.0, "dropout on the adapters' input while training", dropout),
    "lora_target_modules": Option(["q_proj", "v_proj"], "the modules (by name) that get adapters", list_of(text)),
}


def task_names(paths: list[str]) -> list[str]:
    """Each task's name: its file or folder name without the extension (``gsm8k.jsonl`` → ``gsm8k``), made unique."""
    stems = [Path(path).expanduser().name.removesuffix(".jsonl").removesuffix(".json") or path for path in paths]
    return [stem if stems.count(stem) == 1 else f"{stem}-{t}" for t, stem in enumerate(stems)]


def build(num_clients: int, options: dict, seed: int) -> Federation:
    """Client t fine-tunes the model on ``options["tasks"][t]`` (see :data:`OPTIONS`)."""
    if options["model"] is None:
        raise FedmergeError(
            "the causal-lm suite needs option 'model': a directory written by save_pretrained or a "
            "Hugging Face model name in the local cache (e.g. --set suite_options.model=/models/qwen); "
            "docs/llm.md."
        )
    paths = options["tasks"]
    if not paths:
        raise FedmergeError(
            "the causal-lm suite needs option 'tasks': one JSONL file or save_to_disk folder per client "
            '(e.g. tasks = ["math.jsonl", "code.jsonl"]); docs/llm.md.'
        )
    if len(paths) != num_clients:
        raise FedmergeError(
            f"option 'tasks' lists {len(paths)} tasks for {num_clients} clients; the causal-lm suite has "
            f"one client per task: set clients = {len(paths)}, or list {num_clients} tasks."
        )
    extract = answer_extractor(options["answer"])
    directory = model_dir(options["model"])
    tokenizer = load_tokenizer(directory, options["model"])
    pad_id = next((i for i in (tokenizer.pad_token_id, tokenizer.eos_token_id) if i is not None), 0)
    tasks = [
        _task(t, path, name, tokenizer, extract, pad_id, options, seed)
        for t, (path, name) in enumerate(zip(paths, task_names(paths)))
    ]
    model = load_model(directory, options["model"])
    if options["lora_r"] is not None:
        model = with_lora(
            model,
            options["lora_r"],
            options["lora_alpha"],
            options["lora_dropout"],
            options["lora_target_modules"],
            seed,
        )
    scorer = Scorer(tokenizer, extract, options["max_new_tokens"], options["eval_batch_size"], pad_id)
    return Federation(
        tasks=tasks,
        model_fn=lambda: copy.deepcopy(model),
        loss_fn=response_loss,
        metric="loss" if extract is None else "accuracy",
        evaluate_fn=scorer,
        eval_batch_size=options["eval_batch_size"],
    )


def _task(t: int, path: str, name: str, tokenizer, extract, pad_id: int, options: dict, seed: int) -> Task:
    pairs = texts(read_rows(path, options["hf_split"]), path, options["prompt_field"], options["response_field"])
    if not pairs:
        raise FedmergeError(
            f"task {path} is empty; give it examples (one JSON object per line with fields "
            f"{options['prompt_field']!r} and {options['response_field']!r})."
        )
    empty = next(
        (i for i, (_, response) in enumerate(pairs, 1) if not response and tokenizer.eos_token_id is None), None
    )
    if empty is not None:
        raise FedmergeError(
            f"task {path}, row {empty}: the response is empty and the tokenizer has no end-of-sequence "
            "token, so the example has nothing to learn; remove it or give it a response."
        )
    if options["max_examples"] is not None and len(pairs) > options["max_examples"]:
        import numpy as np

        keep = np.sort(np.random.default_rng([seed, t, 1]).permutation(len(pairs))[: options["max_examples"]])
        pairs = [pairs[i] for i in keep]
    splits = []
    for indices in split_indices(len(pairs), seed, t, options["val_fraction"], options["test_fraction"], path):
        chosen = [pairs[i] for i in indices]
        encoded = [encode(tokenizer, options["prompt_template"], p, r, options["max_length"]) for p, r in chosen]
        answers = [None if extract is None else extract(response) for _, response in chosen]
        splits.append(examples(encoded, answers, pad_id))
    if extract is not None:
        for split, data in zip(("validation", "test"), splits[1:]):
            if all(answer is None for answer in data.answers):
                raise FedmergeError(
                    f"task {path}: no response in its {split} split has a final answer for the "
                    f"extractor {options['answer']!r} to compare; use answer = 'none' to score by loss "
                    "only, or give the responses final answers (GSM8K: a last line '#### 42')."
                )
    return Task(name, *splits)
