"""LoRA updates merged exactly: every rule applied to each adapted layer's dense update; and peft's tensor names.

A LoRA client's update of a layer is ΔW = s·(B_t A_t − B A), s = α/r and (B, A) the factors it started from; for
an embedding, whose factors peft stores as A (r, vocabulary) and B (width, r), ΔW = s·(B_t A_t − B A)ᵀ (peft's
``Embedding.get_delta_weight``). Averaging the A's and the B's apart (what Flower's flowertune-llm and FedIT do)
is not the average of the ΔW's, so every rule would compute something else. :class:`DenseUpdate` presents a
client's update with each adapted layer's dense ΔW under its base weight's name (``….base_layer.weight``, peft's
naming) and the factors left out, so any rule merges the dense updates; the merged Δ is then folded into the base
weights and the factors restart (B = 0). ΔW is made when read, one layer at a time: memory holds one layer's ΔW
per client. For rules that are weighted sums (FedAvg, FedNova by steps or Σ lr), :func:`stacked_delta` gives the
same Δ from the stacked factors, without any client's dense ΔW.

:func:`parse_lora_name` is the one reader of peft's names, for these aggregations and for adapter files
(:mod:`fedmerge.checkpoints.adapters`).
"""

import re
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass

import torch

from fedmerge.errors import FedmergeError
from fedmerge.merging.tensors import Tensors, accumulation_dtype
from fedmerge.merging.validate import spec_of

# peft's names: a linear layer's factors `<module>.lora_A.<adapter>.weight`, an embedding's
# `<module>.lora_embedding_A.<adapter>` (no `.weight`), the wrapped layer's weight `<module>.base_layer.weight`;
# adapter files leave the adapter's name out (`<module>.lora_A.weight`).
_NAME = re.compile(
    r"^(?P<module>.+?)\.(?:lora_(?P<linear>[AB])(?:\.[^.]+)?\.weight"
    r"|lora_embedding_(?P<embedding>[AB])(?:\.[^.]+)?|base_layer\.weight)$"
)
_LORA_SEGMENT = re.compile(r"(?:^|\.)lora_")  # any LoRA tensor of peft's: factors, DoRA magnitudes, ...


@dataclass(frozen=True)
class LoraName:
    """A tensor name of peft's LoRA layers: the adapted module, which part (``A``, ``B`` or ``base``, the wrapped
    layer's weight) and whether it is an embedding's factor."""

    module: str
    part: str
    embedding: bool = False


def parse_lora_name(name: str) -> LoraName | None:
    """What peft's ``name`` is (:class:`LoraName`), or None for a name that is no LoRA factor or wrapped weight."""
    match = _NAME.match(name)
    if match is None:
        return None
    return LoraName(match["module"], match["linear"] or match["embedding"] or "base", bool(match["embedding"]))


def factors(a: torch.Tensor, b: torch.Tensor, transposed: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """(L, R) with ΔW = s·L·R: (B, A), or (Aᵀ, Bᵀ) where ΔW is (B·A)ᵀ (embeddings, peft's ``fan_in_fan_out``)."""
    return (a.T, b.T) if transposed else (b, a)


@dataclass(frozen=True)
class AdaptedLayer:
    """One layer with a LoRA adapter: its base weight's name, its factors' (peft's naming), and whether ΔW is
    (B·A)ᵀ (an embedding)."""

    weight: str
    a: str
    b: str
    transposed: bool = False

    def product(self, tensors: Tensors, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
        """B·A (or its transpose) of the factors in ``tensors``, in ``dtype`` on ``device``."""
        left, right = factors(tensors[self.a].to(device, dtype), tensors[self.b].to(device, dtype), self.transposed)
        return left @ right


def has_adapters(names: Sequence[str]) -> bool:
    """Whether ``names`` hold LoRA factors (peft's ``<module>.lora_A|B.<adapter>.weight`` or
    ``<module>.lora_embedding_A|B.<adapter>``)."""
    return any(parsed is not None and parsed.part != "base" for parsed in map(parse_lora_name, names))


def adapted_layers(names: Sequence[str], only_factors: bool = False) -> list[AdaptedLayer]:
    """The LoRA layers among ``names``: each module's ``lora_A``/``lora_B`` (or ``lora_embedding_A``/``_B``) with
    its ``<module>.base_layer.weight``. A factor without its partner or its base weight is refused, naming it; with
    ``only_factors``, so is any other LoRA tensor (a DoRA magnitude, ...), which the dense and stacked
    aggregations would merge as a plain tensor."""
    found: dict[str, dict[str, str]] = {}
    embeddings = set()
    for name in names:
        parsed = parse_lora_name(name)
        if parsed is not None and parsed.part != "base":
            found.setdefault(parsed.module, {})[parsed.part] = name
            if parsed.embedding:
                embeddings.add(parsed.module)
        elif parsed is None and only_factors and _LORA_SEGMENT.search(name):
            raise FedmergeError(
                f"tensor {name!r} belongs to a LoRA adapter but is neither a factor (lora_A/lora_B, lora_embedding_A/B) "
                "nor a wrapped base weight: merging the layers' dense updates cannot account for it (a DoRA or other "
                'LoRA variant). Use a plain LoRA adapter, or server.lora = "factors" to merge every tensor apart.'
            )
    layers, present = [], set(names)
    for module, parts in found.items():
        weight = f"{module}.base_layer.weight"
        if set(parts) != {"A", "B"} or weight not in present:
            lacking = "its lora_A or lora_B partner" if set(parts) != {"A", "B"} else f"its base weight {weight!r}"
            raise FedmergeError(
                f"LoRA layer {module!r} lacks {lacking}; merging dense updates needs both factors and the base weight "
                'among the arrays sent (a suite with lora_r sends them when server.lora is "stack" or "dense").'
            )
        layers.append(AdaptedLayer(weight, parts["A"], parts["B"], module in embeddings))
    return layers


def check_layer(base: Tensors, layer: AdaptedLayer) -> None:
    """The layer's factors are a rank-r pair whose product has its base weight's shape (read from metadata)."""
    (a_shape, _), (b_shape, _) = spec_of(base, layer.a), spec_of(base, layer.b)
    weight, _ = spec_of(base, layer.weight)
    made = None
    if len(a_shape) == 2 and len(b_shape) == 2 and a_shape[0] == b_shape[1]:
        made = (a_shape[1], b_shape[0]) if layer.transposed else (b_shape[0], a_shape[1])
    if made != weight:
        raise FedmergeError(
            f"LoRA layer {layer.weight.removesuffix('.base_layer.weight')!r}: factors {layer.a!r} {list(a_shape)} and "
            f"{layer.b!r} {list(b_shape)} do not make its base weight's shape {list(weight)}; the dense and stacked "
            "aggregations take linear and embedding adapters only (not convolutions, nor fan_in_fan_out layers such "
            'as GPT-2\'s Conv1D): use server.lora = "factors" for those.'
        )


def dense_delta(model: Tensors, base: Tensors, layer: AdaptedLayer, scaling: float, dtype: torch.dtype) -> torch.Tensor:
    """s·(B_t A_t − B A) (transposed for an embedding): the change the client's factors make to the layer's weight,
    in ``dtype`` on the device of the base's factors."""
    device = base[layer.b].device
    return layer.product(model, dtype, device).sub_(layer.product(base, dtype, device)).mul_(scaling)


class DenseUpdate(Mapping[str, torch.Tensor]):
    """A client's update τ_t with each adapted layer's dense ΔW under its base weight's name and the factors
    left out; every other tensor is θ_t − θ. Tensors are made when read; ``specs`` (shapes and accumulation dtypes,
    for the checks) come from the base's metadata, without reading a tensor."""

    def __init__(self, model: Tensors, base: Tensors, layers: Sequence[AdaptedLayer], scaling: float) -> None:
        self.model, self.base, self.scaling = model, base, scaling
        self.layers = {layer.weight: layer for layer in layers}
        for layer in layers:
            check_layer(base, layer)
        factor_names = {name for layer in layers for name in (layer.a, layer.b)}
        self.names = [name for name in base if name not in factor_names]
        self.specs = {name: _meta(*spec_of(base, name)) for name in self.names}

    def __getitem__(self, name: str) -> torch.Tensor:
        dtype = self.specs[name].dtype
        if name in self.layers:
            return dense_delta(self.model, self.base, self.layers[name], self.scaling, dtype)
        base = self.base[name]
        return self.model[name].to(base.device, dtype) - base.to(dtype)

    def __iter__(self) -> Iterator[str]:
        return iter(self.names)

    def __len__(self) -> int:
        return len(self.names)


def _meta(shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
    """A shape-only tensor in the dtype a task vector of ``dtype`` accumulates in (int64 for integer buffers)."""
    dtype = accumulation_dtype(dtype) if dtype.is_floating_point else torch.int64
    return torch.empty(shape, dtype=dtype, device="meta")


def stacked_delta(
    models: Sequence[Tensors], base: Tensors, layer: AdaptedLayer, scaling: float, coefficients: Sequence[float]
) -> torch.Tensor:
    """Σ_t c_t·s·(B_t A_t − B A) as one product of the stacked factors [c_1 L_1 … c_T L_T]·[R_1; …; R_T] (rank T·r,
    (L, R) = (B, A), or (Aᵀ, Bᵀ) for an embedding), minus (Σ_t c_t)·s·B A: the weighted sum of the clients' dense
    updates, exactly, without making any of them."""
    check_layer(base, layer)
    dtype, device = accumulation_dtype(spec_of(base, layer.weight)[1]), base[layer.b].device
    pairs = [
        factors(model[layer.a].to(device, dtype), model[layer.b].to(device, dtype), layer.transposed)
        for model in models
    ]
    lefts = torch.cat([c * left for c, (left, _) in zip(coefficients, pairs)], dim=1)
    rights = torch.cat([right for _, right in pairs], dim=0)
    start = layer.product(base, dtype, device)
    return (lefts @ rights).sub_(start, alpha=float(sum(coefficients))).mul_(scaling)


def fold(
    base: Tensors, layer: AdaptedLayer, delta: torch.Tensor, scaling: float, server_lr: float
) -> dict[str, torch.Tensor]:
    """The layer after a round: W + s·B A + β·Δ folded into its base weight (in W's dtype), A kept, B = 0, so the
    adapted layer computes W + s·B A + β·Δ and the next round's adapters start from zero."""
    weight = base[layer.weight]
    dtype = accumulation_dtype(weight.dtype)
    start = layer.product(base, dtype, weight.device)
    folded = weight.to(dtype) + scaling * start + server_lr * delta.to(weight.device, dtype)
    return {layer.weight: folded.to(weight.dtype), layer.a: base[layer.a], layer.b: torch.zeros_like(base[layer.b])}
