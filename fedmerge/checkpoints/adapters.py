"""PEFT LoRA adapters as fine-tuned models: a lazy ``name → tensor`` mapping presenting θ_t = θ + ΔW.

An adapter directory (``adapter_config.json`` + ``adapter_model.safetensors``, as ``PeftModel.save_pretrained``
writes it) fine-tunes a base θ by a low-rank update of some of its layers. Per adapted layer

    ΔW = s · B·A,  s = lora_alpha / r  (``use_rslora``: lora_alpha / √r),

transposed where the base stores the weight as (in, out) (``fan_in_fan_out``) and for embeddings
(``lora_embedding_A``/``_B``), with r and lora_alpha per layer from ``rank_pattern``/``alpha_pattern`` where
they match (peft's rule). Every tensor of the base the adapter does not touch is θ's own, so its task vector
τ = θ_t − θ is 0 there and ΔW on the adapted layers: exactly what ``PeftModel.merge_and_unload()`` folds in.

:class:`Adapter` offers the base's names, ``specs`` and ``reader(name)`` like
:class:`~fedmerge.checkpoints.reader.Checkpoint`, so the merging core streams it unchanged under every rule,
beside full checkpoints. Nothing is held: a chunk of an adapted tensor is θ's chunk plus the rows of s·B·A
it covers, computed when the chunk is read (in float32, float64 for a float64 base, so that τ is ΔW and not
ΔW rounded to θ's dtype); only a layer's factors A and B (r·(in + out) numbers) are read whole.

An adapter made for another base (a layer or module the base lacks, another shape) or using what a
plain ΔW cannot express (DoRA, trained biases, ``modules_to_save``, other LoRA variants, initialisations
that change the base's weights) is refused when opened, naming the adapter and the tensor. One whose
``base_model_name_or_path`` names another model than the base given, every shape matching (a chat model's
adapter on its base model), merges with a :class:`BaseMismatch` warning: a path may differ and still name the
same model, so that is no refusal.
"""

import math
import os
import re
import warnings
from dataclasses import dataclass, replace
from pathlib import Path

import torch

from fedmerge.errors import FedmergeError
from fedmerge.merging.lora import factors, parse_lora_name
from fedmerge.merging.tensors import accumulation_dtype, read_into
from fedmerge.checkpoints.reader import Checkpoint, SafetensorsFile, StoredTensors, TorchFile, read_json_object

ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_FILES = ("adapter_model.safetensors", "adapter_model.bin")
PEFT_PREFIX = "base_model.model."

# Options that make a LoRA adapter more than ΔW = s·B·A on the base as given, with what each does.
UNSUPPORTED = {
    "use_dora": "DoRA rescales each column by a learned magnitude",
    "use_qalora": "QA-LoRA pools its input by groups",
    "use_bdlora": "BD-LoRA uses block-diagonal factors",
    "alora_invocation_tokens": "activated LoRA applies only after its invocation tokens",
    "arrow_config": "Arrow routes between several adapters",
    "kasa_config": "KaSA truncates the base's singular values",
    "monteclora_config": "MonteCLoRA samples its factors",
    "lora_bias": "it trains a bias for lora_B",
    "layer_replication": "it replicates layers of the base",
    "target_parameters": "it adapts parameters of modules (e.g. MoE experts) rather than layers",
    "trainable_token_indices": "it trains token embeddings beside the LoRA factors",
    "modules_to_save": "it saves whole modules beside the LoRA factors",
}
# Initialisations that subtract the initial adapter from the base's weights: the adapter fits that changed base.
BASE_CHANGING_INITS = ("pissa", "olora", "corda", "loftq", "lora_ga")


class BaseMismatch(UserWarning):
    """An adapter's ``adapter_config.json`` names another base model than the one given (shapes matching)."""


def is_adapter(path: str | os.PathLike) -> bool:
    """Whether ``path`` is a PEFT adapter directory (it holds ``adapter_config.json``)."""
    return (Path(path) / ADAPTER_CONFIG).is_file()


def open_model(path: str | os.PathLike, base: Checkpoint, pin_memory: bool = False) -> "Checkpoint | Adapter":
    """A fine-tuned model of ``base``: an :class:`Adapter` for an adapter directory, else a :class:`Checkpoint`."""
    return Adapter(path, base) if is_adapter(path) else Checkpoint(path, pin_memory)


@dataclass(frozen=True)
class LoraLayer:
    """One adapted base tensor: stored = θ (or ``replaced``, a weight the adapter saved for it) + s·L·R with
    (L, R) = (B, A), or (Aᵀ, Bᵀ) when the base stores it transposed (``fan_in_fan_out``, embeddings)."""

    target: str
    a: str | None = None
    b: str | None = None
    scale: float = 1.0
    transposed: bool = False
    replaced: str | None = None


class AdapterSliceReader:
    """One adapted tensor of θ_t, read a flat slice at a time (the merging core's slice reader): θ's slice plus
    the rows of s·L·R that cover it, in ``dtype`` (θ's accumulation dtype)."""

    def __init__(
        self, base, left: torch.Tensor | None, right: torch.Tensor | None, shape: torch.Size, dtype: torch.dtype
    ) -> None:
        self.base, self.left, self.right = base, left, right
        self.shape, self.dtype = shape, dtype
        self.columns = shape[-1] if len(shape) else 1

    def read(self, s: slice) -> torch.Tensor:
        out = read_into(self.base, s, torch.empty(s.stop - s.start, dtype=self.dtype))
        if self.left is not None:
            first, last = s.start // self.columns, (s.stop - 1) // self.columns + 1
            rows = (self.left[first:last] @ self.right).reshape(-1)
            offset = s.start - first * self.columns
            out += rows[offset : offset + out.numel()]
        return out


class Adapter(StoredTensors):
    """A PEFT LoRA adapter directory as the full fine-tuned model θ_t = θ + ΔW of ``base``, read lazily.

    Parameters
    ----------
    path : the adapter directory (``adapter_config.json`` and ``adapter_model.safetensors`` or ``.bin``).
    base : the opened base checkpoint θ the adapter was trained on.

    Attributes, as :class:`Checkpoint`: ``path``, ``directory``, ``config`` (None: an adapter has no model
    config), ``specs`` (the base's; an adapted tensor's ``file`` is the adapter file), and ``layers`` (base
    tensor name → :class:`LoraLayer`). Indexing gives a whole tensor of θ_t (adapted ones in θ's accumulation
    dtype); :meth:`reader` gives it a slice at a time. Raises :class:`FedmergeError` on an adapter that does not
    fit ``base``; warns (:class:`BaseMismatch`) when it fits but names another base model.
    """

    def __init__(self, path: str | os.PathLike, base: Checkpoint) -> None:
        self.path = Path(path)
        self.directory = self.path
        self.config = None
        self.base = base
        self.adapter_config = self._read_config()
        self.file = self._find_file()
        self._file = SafetensorsFile(self.file) if self.file.suffix == ".safetensors" else TorchFile(self.file)
        try:
            self.layers = self._plan()
            self._check_named_base()  # a warning a filter may turn into an error
        except BaseException:
            self.close()
            raise
        self.specs = {
            name: spec if name not in self.layers else replace(spec, file=self.file)
            for name, spec in base.specs.items()
        }

    # -- opening and checking ------------------------------------------------------------------------------

    def _fail(self, what: str, fix: str) -> FedmergeError:
        return FedmergeError(f"adapter {self.path}: {what}; {fix}")

    def _read_config(self) -> dict:
        file = self.path / ADAPTER_CONFIG
        config = read_json_object(file, "PEFT adapter config")
        kind = str(config.get("peft_type", "")).upper()
        if kind != "LORA":
            raise self._fail(
                f"it is a {config.get('peft_type')!r} adapter, and fedmerge merges LoRA adapters only",
                "fold it into the base with peft's merge_and_unload() and merge the saved model instead.",
            )
        for key, what in UNSUPPORTED.items():
            if config.get(key):
                raise self._fail(
                    f"adapter_config.json sets {key}={config[key]!r}, which a low-rank ΔW = s·B·A cannot "
                    f"express ({what})",
                    "fold it into the base with peft's merge_and_unload() and merge the saved model instead.",
                )
        if config.get("bias", "none") != "none":
            raise self._fail(
                f"adapter_config.json sets bias={config['bias']!r}: it trains the base's biases too",
                "fold it into the base with peft's merge_and_unload() and merge the saved model instead.",
            )
        init = str(config.get("init_lora_weights", "")).lower()
        if init.startswith(BASE_CHANGING_INITS):
            raise self._fail(
                f"init_lora_weights={config['init_lora_weights']!r} changed the base's weights when "
                "training began, so the adapter does not fit the base as saved",
                "save it converted to a plain LoRA (peft's save_pretrained(..., "
                "path_initial_model_for_weight_conversion=...)) and merge that.",
            )
        for key in ("r", "lora_alpha"):
            if not _positive_number(config.get(key)):
                raise FedmergeError(f"{file}: {key} must be a positive number, got {config.get(key)!r}.")
        for key in ("rank_pattern", "alpha_pattern"):
            pattern = config.get(key) or {}
            if not isinstance(pattern, dict) or not all(_positive_number(v) for v in pattern.values()):
                raise FedmergeError(f"{file}: {key} must map module names to positive numbers, got {pattern!r}.")
        return config

    def _find_file(self) -> Path:
        for name in ADAPTER_FILES:
            if (self.path / name).is_file():
                return self.path / name
        raise FedmergeError(
            f"adapter {self.path}: no {' or '.join(ADAPTER_FILES)} beside its {ADAPTER_CONFIG}; "
            "save the adapter with peft's save_pretrained()."
        )

    def _target(self, module: str, key: str) -> str:
        """The base tensor that adapter module ``module`` adapts: ``<module>.weight``, its peft prefix removed; a
        base saved with or without its head's prefix (``model.``) is matched by the unique name ending alike."""
        stem = module[len(PEFT_PREFIX) :] if module.startswith(PEFT_PREFIX) else module
        name = stem + ".weight"
        if name in self.base.specs:
            return name
        found = [n for n in self.base.specs if n.endswith("." + name) or name.endswith("." + n)]
        if len(found) == 1:
            return found[0]
        if found:
            raise self._fail(
                f"tensor {key!r} could adapt any of the base's tensors {found[:3]}",
                "give the base whose tensor names the adapter's were saved from.",
            )
        raise self._fail(
            f"tensor {key!r} adapts {name!r}, which the base {self.base.path} lacks: the adapter was "
            f"made for another model (another architecture, more layers, or other target modules)"
            f"{self._trained_on()}",
            "give the base it was trained on.",
        )

    def _pattern(self, key: str, module: str, default: float) -> float:
        """peft's rule: the first key of ``rank_pattern``/``alpha_pattern`` matching the module's name's end."""
        stem = module[len(PEFT_PREFIX) :] if module.startswith(PEFT_PREFIX) else module
        for pattern, value in (self.adapter_config.get(key) or {}).items():
            if re.match(rf"(.*\.)?({pattern})$", stem):
                return value
        return default

    def _plan(self) -> dict[str, LoraLayer]:
        found: dict[str, dict[str, str]] = {}
        for key in self._file.specs:
            parsed = parse_lora_name(key)
            if parsed is None:
                raise self._fail(
                    f"tensor {key!r} is neither a LoRA factor (lora_A, lora_B, lora_embedding_A/B) nor "
                    "a saved base weight",
                    "fedmerge merges plain LoRA adapters only; fold this one into "
                    "the base with peft's merge_and_unload() and merge the saved model instead.",
                )
            parts = found.setdefault(parsed.module, {})
            parts[parsed.part] = key
            if parsed.embedding:
                parts["embedding"] = key
        if not found:
            raise self._fail(f"{self.file.name} holds no tensors", "save the adapter again with save_pretrained().")
        layers: dict[str, LoraLayer] = {}
        for module, parts in found.items():
            any_key = next(iter(parts.values()))
            target = self._target(module, any_key)
            if target in layers:
                raise self._fail(
                    f"tensor {any_key!r} adapts {target!r} a second time",
                    "give an adapter saved by peft, with one set of factors per layer.",
                )
            layers[target] = self._layer(module, parts, target)
        return layers

    def _layer(self, module: str, parts: dict[str, str], target: str) -> LoraLayer:
        spec = self.base.specs[target]
        replaced = parts.get("base")
        if replaced is not None and tuple(self._file.specs[replaced].shape) != tuple(spec.shape):
            raise self._shape_error(replaced, self._file.specs[replaced].shape, target, spec.shape)
        if "A" not in parts and "B" not in parts:
            return LoraLayer(target, replaced=replaced)
        for have, lack in (("A", "B"), ("B", "A")):
            if have in parts and lack not in parts:
                raise self._fail(
                    f"tensor {parts[have]!r} has no lora_{lack} beside it",
                    "the adapter file is incomplete; save the adapter again with save_pretrained().",
                )
        a_shape, b_shape = tuple(self._file.specs[parts["A"]].shape), tuple(self._file.specs[parts["B"]].shape)
        r = self._pattern("rank_pattern", module, self.adapter_config["r"])
        alpha = self._pattern("alpha_pattern", module, self.adapter_config["lora_alpha"])
        if len(a_shape) != 2 or len(b_shape) != 2 or a_shape[0] != r or b_shape[1] != r:
            raise self._fail(
                f"tensors {parts['A']!r} {list(a_shape)} and {parts['B']!r} {list(b_shape)} are not LoRA "
                f"factors of rank r={r} (adapter_config.json)",
                "only linear and embedding layers' LoRA factors can be merged; give a plain LoRA adapter.",
            )
        transposed = "embedding" in parts or bool(self.adapter_config.get("fan_in_fan_out"))
        shape = (a_shape[1], b_shape[0]) if transposed else (b_shape[0], a_shape[1])
        if tuple(spec.shape) != shape:
            raise self._shape_error(parts["B"], shape, target, spec.shape)
        scale = alpha / math.sqrt(r) if self.adapter_config.get("use_rslora") else alpha / r
        return LoraLayer(target, parts["A"], parts["B"], float(scale), transposed, replaced)

    def _shape_error(self, key: str, shape, target: str, base_shape) -> FedmergeError:
        return self._fail(
            f"tensor {key!r} makes {target!r} of shape {list(shape)}, but the base {self.base.path} "
            f"holds it as {list(base_shape)}: the adapter was made for another base (another size)"
            f"{self._trained_on()}",
            "give the base it was trained on.",
        )

    def _trained_on(self) -> str:
        named = self.adapter_config.get("base_model_name_or_path")
        return f"; its adapter_config.json names the base {named!r}" if named else ""

    def _check_named_base(self) -> None:
        """Warn when the base the adapter names is, by none of its names, the base given."""
        named = self.adapter_config.get("base_model_name_or_path")
        if not isinstance(named, str) or not named:
            return
        known = (self.base.config or {}).get("_name_or_path")
        given = model_names(str(self.base.path)) | (model_names(known) if isinstance(known, str) and known else set())
        if not model_names(named) & given:
            warnings.warn(
                BaseMismatch(
                    f"adapter {self.path}: its adapter_config.json names the base {named!r}, which is not the base given "
                    f"({self.base.path}) by any of its names; every shape matches, so it is merged. If the adapter was "
                    "trained on another model of this architecture (a chat model and its base, say), the merge is wrong: "
                    "give the base it was trained on."
                ),
                stacklevel=2,
            )

    # -- reading ---------------------------------------------------------------------------------------------

    def _factors(self, layer: LoraLayer, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """(L, R) of the layer in ``dtype``, s folded into L, so that its stored ΔW is L·R."""
        a, b = (self._file.read(k).to(dtype, copy=True) for k in (layer.a, layer.b))
        left, right = factors(a, b, layer.transposed)
        return (left * layer.scale).contiguous(), right.contiguous()

    def reader(self, name: str):
        """Tensor ``name`` of θ_t a flat slice at a time: θ's own reader where the adapter leaves it, else an
        :class:`AdapterSliceReader` (θ's slice + the rows of ΔW covering it)."""
        layer = self.layers.get(name)
        if layer is None:
            return self.base.reader(name)
        spec = self.base.specs[name]
        dtype = accumulation_dtype(spec.dtype)
        base = self._file.reader(layer.replaced) if layer.replaced else self.base.reader(name)
        left, right = self._factors(layer, dtype) if layer.a else (None, None)
        return AdapterSliceReader(base, left, right, torch.Size(spec.shape), dtype)

    def __getitem__(self, name: str) -> torch.Tensor:
        if name not in self.specs:
            raise KeyError(f"{self.path}: no tensor {name!r}")
        if name not in self.layers:
            return self.base[name]
        reader = self.reader(name)
        return reader.read(slice(0, reader.shape.numel())).reshape(reader.shape)

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None

    def __repr__(self) -> str:
        return f"Adapter({str(self.path)!r}, {len(self.layers)} adapted tensors of {len(self.specs)})"


def model_names(name: str) -> set[str]:
    """The names a model path or Hub id goes by, lowercased: itself and its folder's name, its resolved path and that
    one's folder's name when it exists here, and the Hub id of a Hugging Face cache snapshot
    (``…/models--org--name/snapshots/…``)."""
    path = Path(name)
    names = {path.as_posix(), path.name}
    if path.exists():
        names |= {path.resolve().as_posix(), path.resolve().name}
    cached = re.search(r"models--([^/]+?)--([^/]+)/snapshots", path.as_posix())
    if cached:
        names |= {f"{cached[1]}/{cached[2]}", cached[2]}
    return {n.lower() for n in names}


def _positive_number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value) and value > 0
