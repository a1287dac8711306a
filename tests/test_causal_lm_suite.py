"""The causal-lm suite offline: a tiny Llama and a character-level tokenizer saved with save_pretrained, tiny
generated instruction tasks as JSONL files and saved `datasets` folders, all written here (nothing downloads)."""

import json
import random
import subprocess
import sys

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file

from fedmerge.clients.trainer import TrainConfig, train
from fedmerge.errors import FedmergeError
from fedmerge.simulations.runner import run
from fedmerge.simulations.spec import Spec
from fedmerge.tasks import load_suite
from fedmerge.tasks.causal_lm.data import IGNORE
from fedmerge.tasks.causal_lm.scoring import gsm8k_answer, response_loss
from processes import seconds

CHARS = "abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789 .,:?!+-*/=#$\n"


def tiny_llama(folder) -> None:
    """A 2-layer, width-32 Llama with a character-level WordLevel tokenizer (BOS added), saved as a model directory."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    vocab = {"<pad>": 0, "<s>": 1, "</s>": 2, "<unk>": 3}
    for char in sorted(set(CHARS)):
        vocab.setdefault(char, len(vocab))
    for filler in range(300 - len(vocab)):  # a vocabulary of about 300, as a byte-level one would have
        vocab[f"<extra_{filler}>"] = len(vocab)
    tokenizer = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tokenizer.pre_tokenizer = pre_tokenizers.Split("", "isolated")
    tokenizer.decoder = decoders.Fuse()
    tokenizer.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 1)])
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tokenizer, bos_token="<s>", eos_token="</s>", pad_token="<pad>", unk_token="<unk>"
    )
    config = LlamaConfig(
        vocab_size=len(vocab),
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=256,
        bos_token_id=1,
        eos_token_id=2,
        pad_token_id=0,
    )
    torch.manual_seed(0)
    LlamaForCausalLM(config).save_pretrained(folder)
    fast.save_pretrained(folder)


def write_jsonl(path, rows) -> str:
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return str(path)


def addition(n: int, seed: int = 0) -> list[dict]:
    rng = random.Random(seed)
    rows = []
    for _ in range(n):
        a, b = rng.randrange(10), rng.randrange(10)
        rows.append({"prompt": f"What is {a} plus {b}?", "response": f"{a}+{b}={a + b}\n#### {a + b}"})
    return rows


def sevens(n: int, seed: int = 1) -> list[dict]:
    """A task a few steps learn: whatever the prompt, the answer is 7."""
    rng = random.Random(seed)
    return [{"prompt": f"say seven {rng.randrange(1000)}", "response": "#### 7"} for _ in range(n)]


@pytest.fixture(scope="module")
def assets(tmp_path_factory):
    """(model directory, addition task, sevens task)."""
    model, data = tmp_path_factory.mktemp("tiny-llama"), tmp_path_factory.mktemp("tasks")
    tiny_llama(model)
    return (
        str(model),
        write_jsonl(data / "addition.jsonl", addition(40)),
        write_jsonl(data / "sevens.jsonl", sevens(40)),
    )


@pytest.fixture(autouse=True)
def offline(tmp_path, monkeypatch):
    monkeypatch.setenv("FEDMERGE_CACHE", str(tmp_path / "cache"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    load_suite.cache_clear()
    yield
    load_suite.cache_clear()


def options(assets, **more):
    model, add, seven = assets
    return {
        "model": model,
        "tasks": [add, seven],
        "max_new_tokens": 12,
        "val_fraction": 0.2,
        "test_fraction": 0.2,
        **more,
    }


def test_examples_hold_the_prompt_then_the_response_and_only_the_response_is_labelled(assets):
    from transformers import AutoTokenizer

    fed = load_suite("causal-lm", 2, options(assets), 0)
    tokenizer = AutoTokenizer.from_pretrained(assets[0])
    assert [t.name for t in fed.tasks] == ["addition", "sevens"] and fed.metric == "accuracy"
    assert [[len(t.split(s)) for s in ("train", "val", "test")] for t in fed.tasks] == [[24, 8, 8], [24, 8, 8]]
    data = fed.tasks[0].train
    input_ids, labels = data.tensors
    assert input_ids.shape == labels.shape and input_ids.shape[1] == max(data.lengths)
    for i in range(len(data)):
        n, prompt = data.lengths[i], data.prompts[i]
        text = tokenizer.decode(input_ids[i, :n], skip_special_tokens=True)
        assert text.startswith("What is ") and text.endswith(f"\n#### {gsm8k_answer(text)}")
        assert input_ids[i, 0] == tokenizer.bos_token_id and input_ids[i, n - 1] == tokenizer.eos_token_id
        assert input_ids[i, : len(prompt)].tolist() == prompt and tokenizer.decode(
            prompt, skip_special_tokens=True
        ).endswith("?\n")
        assert (labels[i, : len(prompt)] == IGNORE).all() and (labels[i, n:] == IGNORE).all()
        assert torch.equal(labels[i, len(prompt) : n], input_ids[i, len(prompt) : n])
        assert (input_ids[i, n:] == tokenizer.pad_token_id).all()
        assert data.answers[i] == gsm8k_answer(
            tokenizer.decode(input_ids[i, len(prompt) : n], skip_special_tokens=True)
        )


def test_splits_are_drawn_from_the_seed(assets):
    first, again = (load_suite("causal-lm", 2, options(assets), 0) for _ in range(2))
    other = load_suite("causal-lm", 2, options(assets), 1)
    rows = lambda fed: sorted(map(tuple, fed.tasks[0].test.tensors[0].tolist()))
    assert rows(first) == rows(again) and rows(first) != rows(other)
    cut = load_suite("causal-lm", 2, options(assets, max_examples=10), 0)
    assert [len(cut.tasks[0].split(s)) for s in ("train", "val", "test")] == [6, 2, 2]


def test_the_loss_counts_the_response_tokens_only(assets):
    fed = load_suite("causal-lm", 2, options(assets), 0)
    model = fed.model_from(fed.pretrained).eval()
    input_ids, labels = fed.tasks[0].train.tensors
    input_ids, labels = input_ids[:4], labels[:4]
    with torch.no_grad():
        logits = model(input_ids).logits
        loss = fed.loss(model(input_ids), labels)
        terms = [
            F.cross_entropy(logits[i, j - 1], input_ids[i, j], reduction="sum")
            for i in range(4)
            for j in range(1, labels.shape[1])
            if labels[i, j] != IGNORE
        ]
        torch.testing.assert_close(loss, torch.stack(terms).mean())
        other_prompts = input_ids.clone()
        other_prompts[labels == IGNORE] = 5  # prompt and padding changed: the response's logits change, the count not
        assert torch.isfinite(fed.loss(model(other_prompts), labels))
        assert response_loss(logits, torch.full_like(labels, IGNORE)).isnan()  # nothing to score: not a silent 0
    held_out = fed.evaluate(model, fed.tasks[0], "val")["loss"]
    val_ids, val_labels = fed.tasks[0].val.tensors
    with torch.no_grad():
        whole = response_loss(model(val_ids), val_labels)  # one batch: the mean over all response tokens
    assert held_out == pytest.approx(float(whole), rel=1e-5)


def test_max_length_cuts_the_prompt_from_the_left_and_then_the_response(assets, tmp_path):
    rows = [{"prompt": "abcdefghijklmnopqrstuvwxyz" * 2, "response": "0123456789#### 9"}] * 10
    task = write_jsonl(tmp_path / "long.jsonl", rows)
    fed = load_suite("causal-lm", 1, {"model": assets[0], "tasks": [task], "max_length": 20, "answer": "none"}, 0)
    data = fed.tasks[0].train
    assert fed.metric == "loss" and data.tensors[0].shape[1] == 20 and set(data.lengths) == {20}
    prompt_tokens = int((data.tensors[1][0] == IGNORE).sum())
    assert prompt_tokens == 10  # the response keeps max_length // 2 tokens; the prompt its last 10 ("...yz" + "\n")
    assert data.prompts[0][-2:] == data.tensors[0][0, 8:10].tolist()


def test_gsm8k_answers_are_normalised():
    assert gsm8k_answer("so 6*7=42\n#### 42") == "42"
    assert gsm8k_answer("#### 1,234.") == gsm8k_answer("####1234") == gsm8k_answer("#### $1234.0") == "1234"
    assert gsm8k_answer("#### -3.5") == "-3.5" and gsm8k_answer("#### yes") == "yes"
    assert gsm8k_answer("##### 7") == gsm8k_answer("####7\n#### 8") == "7"  # the first answer; a longer run of # too
    assert (
        gsm8k_answer("the answer is 42") is None and gsm8k_answer("#### ") is None and gsm8k_answer("####\n7") is None
    )


def test_exact_match_after_greedy_generation_rises_with_training(assets):
    fed = load_suite("causal-lm", 2, options(assets), 0)
    task = fed.tasks[1]
    model = fed.model_from(fed.pretrained)
    before = fed.evaluate(model, task, "val")
    assert before["accuracy"] == 0.0  # a random model never writes "#### 7"
    train(model, task, fed.loss, TrainConfig(optimizer="adamw", lr=1e-2, steps=40, batch_size=8))
    after = fed.evaluate(model, task, "test")
    assert after["accuracy"] == 1.0 and after["loss"] < before["loss"] / 10
    generated = fed.evaluate_fn.generate(model, task.test.prompts[:2])
    assert all(text.startswith("####") and text.endswith(" 7") for text in generated), generated
    assert model.training  # evaluation restores the mode


def test_a_users_answer_extractor_and_a_token_limit(assets, tmp_path, monkeypatch):
    (tmp_path / "my_answers.py").write_text(
        "def first_word(text):\n    words = text.replace('#', ' ').split()\n    return words[0] if words else None\n"
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    fed = load_suite("causal-lm", 2, options(assets, answer="my_answers:first_word"), 0)
    assert fed.tasks[1].val.answers == ["7"] * 8 and fed.tasks[0].val.answers[0][1] == "+"
    model = fed.model_from(fed.pretrained)
    train(model, fed.tasks[1], fed.loss, TrainConfig(optimizer="adamw", lr=1e-2, steps=30, batch_size=8))
    assert fed.evaluate(model, fed.tasks[1], "val")["accuracy"] == 1.0
    load_suite.cache_clear()
    short = load_suite("causal-lm", 2, options(assets, max_new_tokens=2), 0)  # "#### 7" needs 6 tokens
    assert short.evaluate_fn.generate(model, fed.tasks[1].val.prompts[:1]) == ["##"]
    assert short.evaluate(model, fed.tasks[1], "val")["accuracy"] == 0.0


def test_a_saved_datasets_folder_with_other_field_names(assets, tmp_path):
    from datasets import Dataset, DatasetDict

    rows = [{"question": r["prompt"], "answer": r["response"]} for r in addition(30, seed=3)]
    Dataset.from_list(rows).save_to_disk(tmp_path / "plain")
    DatasetDict({"train": Dataset.from_list(rows[:20]), "test": Dataset.from_list(rows[20:])}).save_to_disk(
        tmp_path / "dict"
    )
    given = {
        "model": assets[0],
        "tasks": [str(tmp_path / "plain"), str(tmp_path / "dict")],
        "prompt_field": "question",
        "response_field": "answer",
        "prompt_template": "Q: {prompt}\nA: ",
    }
    fed = load_suite("causal-lm", 2, given, 0)
    assert [t.name for t in fed.tasks] == ["plain", "dict"]
    assert sum(len(fed.tasks[0].split(s)) for s in ("train", "val", "test")) == 30
    assert sum(len(fed.tasks[1].split(s)) for s in ("train", "val", "test")) == 20  # the DatasetDict's train split
    from transformers import AutoTokenizer

    prompt = AutoTokenizer.from_pretrained(assets[0]).decode(fed.tasks[0].train.prompts[0], skip_special_tokens=True)
    assert prompt.startswith("Q: What is ") and prompt.endswith("?\nA: ")
    load_suite.cache_clear()
    with pytest.raises(FedmergeError, match="has no split 'validation'; it has train, test: set option 'hf_split'"):
        load_suite("causal-lm", 2, {**given, "hf_split": "validation"}, 0)


@pytest.fixture(scope="module")
def bad_tasks(tmp_path_factory):
    folder = tmp_path_factory.mktemp("bad")
    (folder / "empty.jsonl").write_text("\n")
    write_jsonl(
        folder / "no_prompt.jsonl", [{"prompt": "a", "response": "#### 1"}, {"question": "b", "response": "#### 2"}]
    )
    (folder / "broken.jsonl").write_text('{"prompt": "a", "response": "#### 1"}\n{"prompt": "b", \n')
    write_jsonl(folder / "no_answers.jsonl", [{"prompt": "a", "response": "b"}] * 10)
    write_jsonl(folder / "two.jsonl", [{"prompt": "a", "response": "#### 1"}] * 2)
    return folder


@pytest.mark.parametrize(
    "change, message",
    [
        (
            {"model": "/nowhere/tiny-llama"},
            r"option 'model': the model directory /nowhere/tiny-llama does not exist; give a "
            r"directory holding config.json",
        ),
        (
            {"model": "someone/no-such-llm"},
            r"'someone/no-such-llm' is neither a directory nor in the local Hugging Face "
            r"cache .*fedmerge never downloads. .*`hf download someone/no-such-llm`",
        ),
        (
            {"tasks": ["{bad}/missing.jsonl", "{bad}/two.jsonl"]},
            r"task .*missing.jsonl: no such file or folder; give a JSONL",
        ),
        (
            {"tasks": ["{bad}/no_prompt.jsonl"]},
            r"task .*no_prompt.jsonl, row 2: has no field 'prompt' \(its fields: question, "
            r"response\); set option 'prompt_field'",
        ),
        ({"tasks": ["{bad}/broken.jsonl"]}, r"task .*broken.jsonl, line 2: not valid JSON"),
        ({"tasks": ["{bad}/empty.jsonl"]}, r"task .*empty.jsonl is empty; give it examples"),
        (
            {"tasks": ["{bad}/two.jsonl"]},
            r"task .*two.jsonl has 2 examples: too few for a train, a validation and a test",
        ),
        (
            {"tasks": ["{bad}/no_answers.jsonl"]},
            r"no response in its validation split has a final answer for the extractor "
            r"'gsm8k' to compare; use answer = 'none'",
        ),
        ({"answer": "regex"}, r"option 'answer': unknown answer extractor 'regex'; give 'gsm8k'"),
        (
            {"answer": "no_such_module:extract"},
            r"option 'answer': answer extractor 'no_such_module:extract': no module "
            r"'no_such_module'",
        ),
        ({"answer": "json:no_such_function"}, r"option 'answer': module json has no function 'no_such_function'"),
        ({"tasks": ["{bad}/two.jsonl"] * 3}, r"option 'tasks' lists 3 tasks for 1 clients"),
        ({"model": None}, r"needs option 'model'"),
        ({"prompt_template": "no place"}, r"option 'prompt_template' must contain '\{prompt\}'"),
    ],
)
def test_mistakes_are_named(assets, bad_tasks, change, message):
    given = {"model": assets[0], "tasks": [assets[1]]}
    for key, value in change.items():
        given[key] = [v.format(bad=bad_tasks) for v in value] if key == "tasks" else value
    tasks = given["tasks"] if isinstance(given["tasks"], list) else [given["tasks"]]
    clients = 1 if "lists 3 tasks" in message else len(tasks)
    with pytest.raises(FedmergeError, match=message):
        load_suite("causal-lm", clients, given, 0)


def test_the_command_line_refuses_a_missing_model_before_ray_starts(assets, tmp_path):
    experiment = tmp_path / "llm.toml"
    experiment.write_text(
        f'name = "llm"\nsuite = "causal-lm"\nclients = 2\nstrategies = ["fedavg"]\n\n'
        f'[suite_options]\nmodel = "{tmp_path}/missing-model"\ntasks = ["{assets[1]}", "{assets[2]}"]\n'
    )
    done = subprocess.run(
        [sys.executable, "-m", "fedmerge.cli", "run", str(experiment), "--out", str(tmp_path / "out")],
        capture_output=True,
        text=True,
        timeout=seconds(300),
    )
    assert done.returncode == 2, done.stderr
    assert "fedmerge: error: suite 'fedmerge.tasks.causal_lm:build': option 'model': the model directory" in done.stderr
    assert "Traceback" not in done.stderr and not (tmp_path / "out").exists()


@pytest.fixture(scope="module")
def llm_run(assets, tmp_path_factory):
    """One `fedmerge run` on Flower's simulation runtime: 2 clients, one-shot and 2 rounds, FedAvg and Median."""
    out = tmp_path_factory.mktemp("runs")
    spec = Spec.from_dict(
        {
            "name": "llm-test",
            "suite": "causal-lm",
            "clients": 2,
            "strategies": ["fedavg", "median"],
            "rounds": [1, 2],
            "suite_options": options(assets),
            "training": {"optimizer": "adamw", "lr": 1e-2, "steps": 40, "batch_size": 8},
        }
    )
    with pytest.MonkeyPatch.context() as patch:  # the Ray workers inherit the environment
        patch.setenv("FEDMERGE_CACHE", str(out / "cache"))
        patch.setenv("HF_HUB_OFFLINE", "1")
        load_suite.cache_clear()
        run_dir = run(spec, out, run_dir=out / "run", show_progress=False)
    load_suite.cache_clear()
    return run_dir


@pytest.mark.slow
def test_fedmerge_run_fine_tunes_and_merges_the_language_model(llm_run):
    results = json.loads((llm_run / "results.json").read_text())
    assert results["suite"]["name"] == "causal-lm" and results["suite"]["metric"] == "accuracy"
    assert results["suite"]["tasks"] == ["addition", "sevens"]
    assert [(r["strategy"], r["rounds"]) for r in results["runs"]] == [
        ("fedavg", 1),
        ("median", 1),
        ("fedavg", 2),
        ("median", 2),
    ]
    own = [c["own"]["test"] for c in results["clients"]]
    pretrained = results["pretrained"]["tasks"]
    assert own[1]["accuracy"] > pretrained[1]["accuracy"] == 0.0  # sevens: its own client learns to answer 7
    assert all(o["loss"] < p["loss"] for o, p in zip(own, pretrained))  # fine-tuning lowers each task's held-out loss
    for run_ in results["runs"]:
        for t, task in enumerate(run_["final"]["tasks"]):
            assert 0 <= task["accuracy"] <= 1 and task["loss"] > 0
            if own[t]["accuracy"] > 0:
                assert task["normalized_accuracy"] == pytest.approx(task["accuracy"] / own[t]["accuracy"])
    one_shot = results["runs"][0]
    assert len(one_shot["selection"]) == 40 and 0.05 <= one_shot["selected"]["scaling"] <= 2.0  # λ chosen on val


@pytest.mark.slow
def test_the_merged_models_load_into_transformers_as_they_are(llm_run, assets):
    from transformers import AutoModelForCausalLM

    models = {path.stem: load_file(path) for path in (llm_run / "models").glob("*.safetensors")}
    assert set(models) == {"fedavg-r1", "median-r1", "fedavg-r2", "median-r2"}
    base = AutoModelForCausalLM.from_pretrained(assets[0])
    assert set(models["fedavg-r1"]) == set(
        base.state_dict()
    )  # the model's own names: model.layers.0..., lm_head.weight
    base.load_state_dict(models["fedavg-r2"], strict=True)
    assert not torch.equal(models["fedavg-r1"]["lm_head.weight"], models["fedavg-r2"]["lm_head.weight"])
    assert not torch.equal(
        models["fedavg-r1"]["model.layers.0.self_attn.q_proj.weight"],
        AutoModelForCausalLM.from_pretrained(assets[0]).state_dict()["model.layers.0.self_attn.q_proj.weight"],
    )


@pytest.mark.parametrize("name", ["causal-lm-small", "causal-lm-lora"])
def test_the_presets_read_gsm8k_style_files(assets, tmp_path, name):
    from transformers import AutoTokenizer

    from fedmerge.simulations.presets import load_experiment

    preset = load_experiment(name)
    tasks = []
    for name, seed in (("gsm8k", 0), ("math", 1), ("arith", 2)):
        rows = [{"question": r["prompt"], "answer": r["response"]} for r in addition(20, seed)]
        tasks.append(write_jsonl(tmp_path / f"{name}.jsonl", rows))
    spec = Spec.from_dict({**preset, "suite_options": {**preset["suite_options"], "model": assets[0], "tasks": tasks}})
    assert spec.suite == "causal-lm" and spec.clients == 3 and spec.client_configs()[0].precision == "bf16"
    fed = load_suite(spec.suite, spec.clients, spec.suite_options, spec.seed)
    assert [t.name for t in fed.tasks] == ["gsm8k", "math", "arith"] and fed.metric == "accuracy"
    prompt = AutoTokenizer.from_pretrained(assets[0]).decode(fed.tasks[0].val.prompts[0], skip_special_tokens=True)
    assert prompt.startswith("Question: What is ") and prompt.endswith("?\nAnswer: ")
    assert [len(t.val) for t in fed.tasks] == [1, 1, 1]  # 5% of 20
    if name == "causal-lm-lora":  # only the adapters on the four attention projections train and travel
        assert spec.server["lora"] == "dense" and len(fed.trained_names) == 2 * 4 * 2
        assert all(".lora_A." in n or ".lora_B." in n for n in fed.trained_names)


def test_with_lora_only_the_adapters_train_travel_and_change(assets):
    from fedmerge.strategies import FedAvg
    from fedmerge.strategies.arrays import to_array
    from flwr.app import ArrayRecord
    from replies import reply

    fed = load_suite("causal-lm", 2, options(assets, lora_r=4, lora_alpha=8), 0)
    names = fed.trained_names
    assert len(names) == 2 * 2 * 2 and all(".lora_A." in n or ".lora_B." in n for n in names)  # 2 layers × q, v × A, B
    load_suite.cache_clear()  # another process builds the suite again: the same θ0, adapters included
    again = load_suite("causal-lm", 2, options(assets, lora_r=4, lora_alpha=8), 0)
    assert all(torch.equal(fed.pretrained[n], again.pretrained[n]) for n in names)
    states = []
    for task in fed.tasks:
        model = fed.model_from(fed.pretrained)
        before = fed.evaluate(model, task, "val")["loss"]
        train(model, task, fed.loss, TrainConfig(optimizer="adamw", lr=1e-2, steps=20, batch_size=8))
        state = model.state_dict()
        frozen = [n for n in state if n not in names]
        assert all(torch.equal(state[n], fed.pretrained[n]) for n in frozen)  # the base stays at θ0
        assert any(not torch.equal(state[n], fed.pretrained[n]) for n in names if ".lora_B." in n)
        assert fed.evaluate(model, task, "val")["loss"] < before  # the adapters learn the task
        states.append({n: state[n].numpy() for n in names})
    base = ArrayRecord({n: to_array(fed.pretrained[n]) for n in names})
    merged, _ = FedAvg().merge_replies(1, [reply(t + 1, s, num_examples=10) for t, s in enumerate(states)], base)
    assert set(merged) == set(names)  # only the adapters are merged ("factors": A and B averaged apart)
    for n in names:
        np.testing.assert_allclose(merged[n].numpy(), (states[0][n] + states[1][n]) / 2, rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize(
    "change, message",
    [
        ({"lora_r": 0}, "'lora_r' must be a positive integer"),
        ({"lora_r": 4, "lora_target_modules": ["qkv"]}, "the model has no module named 'qkv'"),
        ({"lora_r": 4, "lora_dropout": 1.0}, r"'lora_dropout' must be a number in \[0, 1\)"),
    ],
)
def test_lora_mistakes_are_named(assets, change, message):
    with pytest.raises(FedmergeError, match=message):
        load_suite("causal-lm", 2, options(assets, **change), 0)


@pytest.mark.slow
def test_fedmerge_evaluate_merges_peft_adapters_on_the_language_model_suite(assets, tmp_path):
    """LoRA fine-tunes saved by peft (with a Trainer-style trainer_state.json) are merged and evaluated in place of
    full checkpoints; FedNova's a_t come from the trainer states."""
    from fedmerge.simulations.evaluate import evaluate_checkpoints

    lora = load_suite("causal-lm", 2, options(assets, lora_r=4, lora_alpha=8), 0)
    adapters = []
    for t, task in enumerate(lora.tasks):
        model = lora.model_from(lora.pretrained)
        train(model, task, lora.loss, TrainConfig(optimizer="adamw", lr=1e-2, steps=30, batch_size=8))
        folder = tmp_path / f"adapter{t}"
        model.save_pretrained(folder)
        history = [{"step": k, "learning_rate": 0.01} for k in range(1, 30 + 10 * t + 1)]
        (folder / "trainer_state.json").write_text(json.dumps({"global_step": 30 + 10 * t, "log_history": history}))
        adapters.append(folder)
    load_suite.cache_clear()
    spec = Spec.from_dict(
        {
            "name": "adapters",
            "suite": "causal-lm",
            "clients": 2,
            "strategies": ["fedavg", "fednova"],
            "suite_options": options(assets),
        }
    )
    run_dir = evaluate_checkpoints(spec, assets[0], adapters, tmp_path / "out")
    results = json.loads((run_dir / "results.json").read_text())
    assert [r["strategy"] for r in results["runs"]] == ["fedavg", "fednova"]
    assert [c["reply"]["num-steps"] for c in results["clients"]] == [30, 40]  # global_step from trainer_state.json
    assert [c["reply"]["lr-sum"] for c in results["clients"]] == pytest.approx([0.3, 0.4])
    own, pretrained = [c["own"]["test"]["loss"] for c in results["clients"]], results["pretrained"]["tasks"]
    assert all(o < p["loss"] for o, p in zip(own, pretrained))  # each adapter learned its task


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_lora_clients_train_on_cuda_like_on_the_cpu(assets):
    """The suite's LoRA model trains on a GPU (a client given one by Ray) and scores there, as on the CPU."""
    fed = load_suite("causal-lm", 2, options(assets, lora_r=4, lora_alpha=8), 0)
    losses = {}
    for device in ("cpu", "cuda"):
        model = fed.model_from(fed.pretrained, device)
        train(model, fed.tasks[1], fed.loss, TrainConfig(optimizer="adamw", lr=1e-2, steps=20, batch_size=8))
        losses[device] = fed.evaluate(model, fed.tasks[1], "val")["loss"]
        state = model.state_dict()
        assert all(torch.equal(state[n].cpu(), fed.pretrained[n]) for n in state if n not in fed.trained_names)
    assert losses["cuda"] == pytest.approx(losses["cpu"], rel=0.05)
