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
other tensors in the checkpoint (a CLIPModel's text tower) are ignored. A tensor holding NaN or ±inf is refused
as ``fedmerge merge`` refuses it, before anything is evaluated: a broken fine-tune's accuracy would otherwise be
its task's reference for normalized accuracy.

FedNova's a_t follow ``fedmerge merge``'s one rule (:func:`fedmerge.checkpoints.trainer_state.effective_steps`):
by ``strategy.fednova.normalize_by`` when the experiment sets it, else by the one of ``--steps`` and ``--lr-sums``
given, else by FedNova's default; their values as given, else read from every model's trainer_state.json; else
refused. A reply carries ``num-steps`` and ``lr-sum`` only when they are known: never a made-up 1.
"""

import dataclasses
import datetime as dt
import time
from collections.abc import Callable, Mapping, Sequence
from contextlib import ExitStack
from pathlib import Path

import torch
from flwr.app import ArrayRecord, Message, MessageType, Metadata, MetricRecord, RecordDict

from fedmerge import contract
from fedmerge.checkpoints.adapters import open_model
from fedmerge.checkpoints.reader import Checkpoint
from fedmerge.checkpoints.trainer_state import GIVE, EffectiveSteps, effective_steps, from_trainer_state
from fedmerge.checkpoints.validate import finite, non_finite
from fedmerge.errors import FedmergeError
from fedmerge.files import check_output_dir
from fedmerge.merging import METHODS
from fedmerge.merging.rules.fednova import NORMALIZE_BY
from fedmerge.merging.validate import check_like, describe
from fedmerge.simulations.experiment import Experiment, Progress
from fedmerge.simulations.results import write_results
from fedmerge.simulations.spec import Spec
from fedmerge.tasks import Federation, load_suite


WAYS = (
    f"{GIVE} (FedNova then normalises by the one given), or --set strategy.fednova.normalize_by="
    f"{'|'.join(NORMALIZE_BY)} to choose what each trainer_state.json gives, or leave fednova out (--strategy)"
)
"""How ``fedmerge evaluate`` takes FedNova's a_t, for its refusals."""


def checkpoint_reply(
    client_id: int, arrays: ArrayRecord, num_examples: int, num_steps: int | None = None, lr_sum: float | None = None
) -> Message:
    """A training reply of client ``client_id`` carrying ``arrays`` (θ_t) and the contract's metrics, as a
    ClientApp would send it (``num-steps`` and ``lr-sum`` only when given); built outside a running app, so its
    Metadata is explicit."""
    metrics = contract.train_reply_metrics(num_examples, num_steps or 0, lr_sum or 0.0, client_id=client_id)
    unknown = {key for key, value in ((contract.NUM_STEPS, num_steps), (contract.LR_SUM, lr_sum)) if value is None}
    content = RecordDict(
        {
            contract.ARRAYS: arrays,
            contract.METRICS: MetricRecord({key: value for key, value in metrics.items() if key not in unknown}),
        }
    )
    metadata = Metadata(
        run_id=0,
        message_id=f"checkpoint-{client_id}",
        src_node_id=client_id + 1,
        dst_node_id=0,
        reply_to_message_id=f"train-{client_id}",
        group_id="1",
        created_at=time.time(),
        ttl=3600.0,
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


def _read(trained: _Trained, role: str | None = None) -> ArrayRecord:
    """The checkpoint's trained tensors; one holding NaN or ±inf is refused, naming its file, as ``fedmerge merge``
    refuses it."""
    tensors = {name: trained[name] for name in trained}
    bad = next((name for name, tensor in tensors.items() if not finite(tensor)), None)
    if bad is not None:
        fix = (
            "Give the base the models were fine-tuned from"
            if role
            else "Repair or replace that fine-tune: its own accuracy is its task's reference for normalized accuracy"
        )
        raise FedmergeError(f"{non_finite(trained.checkpoint, bad, role)}; nothing was evaluated or written. {fix}.")
    return ArrayRecord(tensors)


def _per_model(option: str, values: Sequence | None, count: int, whole: bool = False) -> list | None:
    """Given per-model values, checked: one per model, each positive (and ``whole``)."""
    if values is None:
        return None
    if len(values) != count:
        raise FedmergeError(f"{option} gives {len(values)} values for {count} models; give one per model, in order.")
    bad = [v for v in values if not v > 0 or (whole and v != int(v))]
    if bad:
        raise FedmergeError(f"{option} values must be positive{' whole numbers' if whole else ''}, got {bad[0]!r}.")
    return list(values)


def _effective_steps(
    spec: Spec, models: Sequence[Path], steps: Sequence[int] | None, lr_sums: Sequence[float] | None
) -> tuple[Spec, list[dict], EffectiveSteps | None]:
    """The spec, with FedNova's normaliser set when it runs; each model's ``num_steps`` and ``lr_sum`` (given, else
    read from every model's trainer_state.json, else None: left out of its reply); and FedNova's a_t
    (:func:`~fedmerge.checkpoints.trainer_state.effective_steps`; None when fednova does not run)."""
    known = {"steps": steps, "lr-sum": lr_sums}
    fednova = None
    if "fednova" in spec.strategies:
        options = spec.strategy.get("fednova", {})
        asked = None if "normalize_by" not in options else (options["normalize_by"], "strategy.fednova.normalize_by")
        fednova = effective_steps(models, steps, lr_sums, asked, WAYS)
        known[fednova.normalize_by] = fednova.values
        spec = dataclasses.replace(
            spec, strategy={**spec.strategy, "fednova": {**options, "normalize_by": fednova.normalize_by}}
        )
    known = {by: _readable(models, by) if values is None else values for by, values in known.items()}
    per_model = [
        {
            "num_steps": None if known["steps"] is None else int(known["steps"][t]),
            "lr_sum": None if known["lr-sum"] is None else float(known["lr-sum"][t]),
        }
        for t in range(len(models))
    ]
    return spec, per_model, fednova


def _readable(models: Sequence[Path], normalize_by: str) -> list[float] | None:
    """Every model's a_t by ``normalize_by`` from its trainer_state.json, or None where they do not all hold it."""
    try:
        return from_trainer_state(models, normalize_by)
    except FedmergeError:
        return None


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
    note: Callable[[str], None] | None = None,
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
    steps, lr_sums : each model's local step count and sum of learning rates, one per model. FedNova normalises by
        ``strategy.fednova.normalize_by`` when the spec sets it, else by the one of these given, else by its default
        (:data:`fedmerge.merging.rules.fednova.DEFAULT_NORMALIZE_BY`); what is not given is read from each model
        directory's trainer_state.json (its global_step; its logged learning rates summed) when every model has
        one. FedNova's a_t obtainable neither way is refused; the others are left out of the replies. Each
        reply's ``num-examples`` is the size of its task's train split.
    progress : called with a short message after each merge.
    note : called with one line saying which a_t FedNova uses and where they came from, before any work.

    Returns the results directory (``fedmerge report`` reads it; ``checkpoints.fednova`` records FedNova's a_t and
    their source). Raises :class:`FedmergeError`, before anything is evaluated and with nothing written, naming the
    file and tensor when a checkpoint lacks a tensor of the suite's model, holds it in another shape or dtype, or
    holds NaN or ±inf, and when FedNova's a_t cannot be obtained.
    """
    started_at, started = dt.datetime.now(), time.perf_counter()
    spec = dataclasses.replace(spec, rounds=(1,))
    models = [Path(m) for m in models]
    if len(models) != spec.clients:
        raise FedmergeError(
            f"{len(models)} models given but experiment {spec.name!r} has {spec.clients} clients (one task per model, "
            f"in order); give {spec.clients} models, or --set clients={len(models)} with the suite's options to match."
        )
    needing = [name for name in spec.strategies if METHODS[name].statistics]
    if needing:
        raise FedmergeError(
            f"strategy {needing[0]!r} merges by statistics of each client's training data "
            f"({', '.join(METHODS[needing[0]].statistics)}), which checkpoints do not hold: leave it out (--strategy), "
            f"or merge with `fedmerge merge --method {needing[0]} --statistics ...`."
        )
    spec, per_model, fednova = _effective_steps(
        spec,
        models,
        _per_model("--steps", steps, len(models), whole=True),
        _per_model("--lr-sums", lr_sums, len(models)),
    )
    if run_dir is not None and Path(run_dir).exists():
        raise FedmergeError(f"results directory {run_dir} exists already; choose another --out or remove it.")
    check_output_dir(Path(run_dir).parent if run_dir is not None else Path(out), "--out")
    if fednova is not None and note is not None:
        note(str(fednova))

    timings = {}
    fed = load_suite(spec.suite, spec.clients, spec.suite_options, spec.seed)
    try:
        fed.check_fits()
    except FedmergeError as error:
        raise FedmergeError(f"suite {spec.suite!r}: {error}") from None
    timings["suite"] = time.perf_counter() - started

    loading = time.perf_counter()
    base_arrays, replies = _load(fed, spec.suite, Path(base), models, per_model)
    timings["checkpoints"] = time.perf_counter() - loading

    experiment = Experiment(spec, None, progress)
    experiment.timings.update(timings)
    settings = [{"checkpoint": str(path), **values} for path, values in zip(models, per_model)]
    results = experiment.merge_one_shot(fed, base_arrays, replies, settings)
    results["checkpoints"] = {
        "base": str(base),
        "models": [str(m) for m in models],
        **({"fednova": fednova.record()} if fednova is not None else {}),
    }
    results["timings"] = {k: round(v, 3) for k, v in experiment.timings.items()}
    results["timings"]["total"] = round(time.perf_counter() - started, 3)
    return write_results(spec, results, Path(out), started=started_at, run_dir=run_dir)


def _load(
    fed: Federation, suite: str, base: Path, models: Sequence[Path], per_model: Sequence[dict]
) -> tuple[ArrayRecord, list[Message]]:
    """θ0's trained tensors and one reply per model (its ``num_steps`` and ``lr_sum`` from ``per_model``); every
    checkpoint is checked before any tensor is read, and every tensor read is checked to be finite."""
    names = fed.trained_names
    expected = describe({name: fed.pretrained[name] for name in names})
    with ExitStack() as stack:
        source = stack.enter_context(Checkpoint(base))
        checkpoints = [source, *(stack.enter_context(open_model(path, source)) for path in models)]
        trained = [_check(checkpoint, expected, suite) for checkpoint in checkpoints]
        base_arrays = _read(trained[0], "the base")
        replies = [
            checkpoint_reply(t, _read(tensors), len(fed.tasks[t].train), **per_model[t])
            for t, tensors in enumerate(trained[1:])
        ]
    return base_arrays, replies
