"""Merging fine-tuned checkpoints that already exist, with evaluation: the Python API of ``fedmerge evaluate``.

A base θ0 and T fine-tuned checkpoints θ_1..θ_T (safetensors files or Hugging Face model directories, read by
:mod:`fedmerge.checkpoints.reader`) stand in for a simulation's one-shot round: each checkpoint becomes the
training reply of client t (a real Flower :class:`~flwr.app.Message`), and
:meth:`fedmerge.simulations.experiment.Experiment.merge_one_shot` does the rest exactly as ``fedmerge run``
does after its one-shot round: each fine-tune's own val/test figures, the diagnostics, and every strategy's
merge of the same replies with Task Arithmetic's λ (and FedGMA's and CCLIP's ρ) chosen on the validation
splits by mean normalized accuracy, tested at the choice. No Ray and no Grid: everything runs in this process,
on ``engine.server_device``.

From each checkpoint exactly the suite model's trained tensors (``Federation.trained_names``: frozen
parameters, such as the clip suite's zero-shot heads, stay the suite's θ0) are taken, by the same names;
other tensors in the checkpoint (a CLIPModel's text tower) are ignored.
"""

import dataclasses
import datetime as dt
import time
from collections.abc import Mapping, Sequence
from contextlib import ExitStack
from pathlib import Path

import torch
from flwr.app import ArrayRecord, Message, MessageType, Metadata, MetricRecord, RecordDict

from fedmerge import contract
from fedmerge.checkpoints.adapters import open_model
from fedmerge.checkpoints.reader import Checkpoint
from fedmerge.checkpoints.trainer_state import global_step, lr_sum, read_state, state_file
from fedmerge.errors import FedmergeError
from fedmerge.files import check_output_dir
from fedmerge.merging.validate import check_like, describe
from fedmerge.simulations.experiment import Experiment, Progress
from fedmerge.simulations.results import write_results
from fedmerge.simulations.spec import Spec
from fedmerge.tasks import Federation, load_suite


def checkpoint_reply(client_id: int, arrays: ArrayRecord, num_examples: int, num_steps: int = 1,
                     lr_sum: float = 1.0) -> Message:
    """A training reply of client ``client_id`` carrying ``arrays`` (θ_t) and the contract's metrics, as a
    ClientApp would send it; built outside a running app, so its Metadata is explicit."""
    content = RecordDict({
        contract.ARRAYS: arrays,
        contract.METRICS: MetricRecord(contract.train_reply_metrics(num_examples, num_steps, lr_sum, client_id=client_id)),
    })
    metadata = Metadata(
        run_id=0, message_id=f"checkpoint-{client_id}", src_node_id=client_id + 1, dst_node_id=0,
        reply_to_message_id=f"train-{client_id}", group_id="1", created_at=time.time(), ttl=3600.0,
        message_type=MessageType.TRAIN,
    )
    return Message(content=content, metadata=metadata)


class _Trained(Mapping[str, torch.Tensor]):
    """The tensors of ``checkpoint`` among ``names`` (read when indexed); ``specs`` lets checks read metadata only."""

    def __init__(self, checkpoint: Checkpoint, names: Sequence[str]) -> None:
        self.checkpoint = checkpoint
        self.specs = {name: checkpoint.specs[name] for name in names if name in checkpoint.specs}

    def __getitem__(self, name: str) -> torch.Tensor:
        if name not in self.specs:
            raise KeyError(name)
        return self.checkpoint[name]

    def __iter__(self):
        return iter(self.specs)

    def __len__(self) -> int:
        return len(self.specs)


def _check(checkpoint: Checkpoint, expected: dict, suite: str) -> _Trained:
    """The checkpoint's trained tensors, after checking that it holds every one in the suite model's shape
    and dtype (metadata only: nothing is read yet)."""
    trained = _Trained(checkpoint, list(expected))
    missing = [name for name in expected if name not in trained.specs]
    if missing:
        raise FedmergeError(
            f"{checkpoint.path}: tensor {missing[0]!r} is missing ({len(missing)} of the {len(expected)} tensors that "
            f"suite {suite!r}'s model trains are); give a checkpoint of the suite's model, with its tensor names."
        )
    check_like(str(checkpoint.path), trained, expected, f"suite {suite!r}'s model")
    return trained


def _read(trained: _Trained) -> ArrayRecord:
    return ArrayRecord({name: trained[name] for name in trained})


def _from_trainer_state(models: Sequence[Path], what: str) -> list[float] | None:
    """Each model's a_t from the trainer_state.json beside it (``steps``: its global_step; ``lr-sum``: its logged
    learning rates summed), when every model has one that holds it; else None."""
    files = [state_file(model) for model in models]
    if any(file is None for file in files):
        return None
    states = [(read_state(file), file) for file in files]
    if what == "steps":
        return [global_step(state, file) for state, file in states]
    try:
        return [lr_sum(state, file) for state, file in states]
    except FedmergeError:  # no learning rate logged: FedNova by lr-sum needs --lr-sums
        return None


def _per_model(option: str, values: Sequence | None, count: int, default: float) -> list:
    if values is None:
        return [default] * count
    if len(values) != count:
        raise FedmergeError(f"{option} gives {len(values)} values for {count} models; give one per model, in order.")
    bad = [v for v in values if not v > 0]
    if bad:
        raise FedmergeError(f"{option} values must be positive, got {bad[0]!r}.")
    return list(values)


def evaluate_checkpoints(
    spec: Spec,
    base: str | Path,
    models: Sequence[str | Path],
    out: str | Path = "results",
    *,
    steps: Sequence[int] | None = None,
    lr_sums: Sequence[float] | None = None,
    run_dir: str | Path | None = None,
    progress: Progress | None = None,
) -> Path:
    """Merge the fine-tunes ``models`` of ``base`` with every strategy of ``spec`` and evaluate them on its suite.

    Parameters
    ----------
    spec : the experiment: its suite (and suite options) define the tasks, one per model, in order, so
        ``spec.clients`` must equal ``len(models)``; its strategies, strategy options, ``server.weighting``,
        ``select`` and ``engine.server_device`` are used as in a simulation. Only the one-shot protocol runs
        (``rounds`` is taken as [1]); the training table is not used.
    base, models : θ0 and θ_1..θ_T: ``.safetensors`` files or Hugging Face model directories (sharded or not); a
        model may also be a PEFT LoRA adapter directory of ``base`` (θ_t = θ0 + s·B·A).
    out : the parent directory of the results directory (``<name>-<timestamp>``), unless ``run_dir`` names it.
    steps, lr_sums : each model's local step count and sum of learning rates (FedNova's a_t); by default read
        from each model directory's trainer_state.json (its global_step; its logged learning rates summed) when
        every model has one, else 1 each (FedNova then equals FedAvg). Each reply's ``num-examples`` is the size of its task's train split.
    progress : called with a short message after each merge.

    Returns the results directory (``fedmerge report`` reads it). Raises :class:`FedmergeError` naming the file
    and tensor when a checkpoint lacks a tensor of the suite's model or holds it in another shape or dtype;
    nothing is written then.
    """
    started_at, started = dt.datetime.now(), time.perf_counter()
    spec = dataclasses.replace(spec, rounds=(1,))
    models = [Path(m) for m in models]
    if len(models) != spec.clients:
        raise FedmergeError(
            f"{len(models)} models given but experiment {spec.name!r} has {spec.clients} clients (one task per model, "
            f"in order); give {spec.clients} models, or --set clients={len(models)} with the suite's options to match."
        )
    steps = _per_model("--steps", steps if steps is not None else _from_trainer_state(models, "steps"), len(models), 1)
    lr_sums = _per_model("--lr-sums", lr_sums if lr_sums is not None else _from_trainer_state(models, "lr-sum"),
                         len(models), 1.0)
    if run_dir is not None and Path(run_dir).exists():
        raise FedmergeError(f"results directory {run_dir} exists already; choose another --out or remove it.")
    check_output_dir(Path(run_dir).parent if run_dir is not None else Path(out), "--out")

    timings = {}
    fed = load_suite(spec.suite, spec.clients, spec.suite_options, spec.seed)
    try:
        fed.check_fits()
    except FedmergeError as error:
        raise FedmergeError(f"suite {spec.suite!r}: {error}") from None
    timings["suite"] = time.perf_counter() - started

    loading = time.perf_counter()
    base_arrays, replies = _load(fed, spec.suite, Path(base), models, steps, lr_sums)
    timings["checkpoints"] = time.perf_counter() - loading

    experiment = Experiment(spec, None, progress)
    experiment.timings.update(timings)
    settings = [{"checkpoint": str(path), "num_steps": int(k), "lr_sum": float(s)} for path, k, s in zip(models, steps, lr_sums)]
    results = experiment.merge_one_shot(fed, base_arrays, replies, settings)
    results["checkpoints"] = {"base": str(base), "models": [str(m) for m in models]}
    results["timings"] = {k: round(v, 3) for k, v in experiment.timings.items()}
    results["timings"]["total"] = round(time.perf_counter() - started, 3)
    return write_results(spec, results, Path(out), started=started_at, run_dir=run_dir)


def _load(fed: Federation, suite: str, base: Path, models: Sequence[Path], steps: Sequence[int],
          lr_sums: Sequence[float]) -> tuple[ArrayRecord, list[Message]]:
    """θ0's trained tensors and one reply per model; every checkpoint is checked before any tensor is read."""
    names = fed.trained_names
    expected = describe({name: fed.pretrained[name] for name in names})
    with ExitStack() as stack:
        source = stack.enter_context(Checkpoint(base))
        checkpoints = [source, *(stack.enter_context(open_model(path, source)) for path in models)]
        trained = [_check(checkpoint, expected, suite) for checkpoint in checkpoints]
        base_arrays = _read(trained[0])
        replies = [checkpoint_reply(t, _read(tensors), len(fed.tasks[t].train), steps[t], lr_sums[t])
                   for t, tensors in enumerate(trained[1:])]
    return base_arrays, replies
