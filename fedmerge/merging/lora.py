"""LoRA updates merged exactly: every rule applied to each adapted layer's dense update.

A LoRA client's update of a layer is ΔW = s·(B_t A_t − B A), s = α/r and (B, A) the factors it started from.
Averaging the A's and the B's apart (what Flower's flowertune-llm and FedIT do) is not the average of the
ΔW's, so every rule would compute something else. :class:`DenseUpdate` presents a client's update with each
adapted layer's dense ΔW under its base weight's name (``….base_layer.weight``, peft's naming) and the
factors left out, so any rule merges the dense updates; the merged Δ is then folded into the base weights and
the factors restart (B = 0). ΔW is made when read, one layer at a time: memory holds one layer's ΔW per client.
For rules that are weighted sums (FedAvg, FedNova by steps or Σ lr), :func:`stacked_delta` gives the same Δ
from the stacked factors, without any client's dense ΔW.
"""

import re
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass

import torch

from fedmerge.errors import FedmergeError
from fedmerge.merging.tensors import Tensors, accumulation_dtype

_FACTOR = re.compile(r"^(?P<module>.+)\.lora_(?P<factor>[AB])\.(?P<adapter>[^.]+)\.weight$")


@dataclass(frozen=True)
class AdaptedLayer:
    """One layer with a LoRA adapter: its base weight's name and its factors' (peft's naming)."""

    weight: str
    a: str
    b: str


def has_adapters(names: Sequence[str]) -> bool:
    """Whether ``names`` hold LoRA factors (peft's ``<module>.lora_A|B.<adapter>.weight``)."""
    return any(_FACTOR.match(name) for name in names)


def adapted_layers(names: Sequence[str]) -> list[AdaptedLayer]:
    """The LoRA layers among ``names``: each ``<module>.lora_A.<adapter>.weight`` with its ``lora_B`` and
    ``<module>.base_layer.weight``. A factor without its partner or its base weight is refused, naming it."""
    found: dict[str, dict[str, str]] = {}
    for name in names:
        match = _FACTOR.match(name)
        if match:
            found.setdefault(match["module"], {})[match["factor"]] = name
    layers, present = [], set(names)
    for module, factors in found.items():
        weight = f"{module}.base_layer.weight"
        if set(factors) != {"A", "B"} or weight not in present:
            lacking = "its lora_A or lora_B partner" if set(factors) != {"A", "B"} else f"its base weight {weight!r}"
            raise FedmergeError(
                f"LoRA layer {module!r} lacks {lacking}; merging dense updates needs both factors and the base weight "
                "among the arrays sent (a suite with lora_r sends them when server.lora is \"stack\" or \"dense\")."
            )
        layers.append(AdaptedLayer(weight, factors["A"], factors["B"]))
    return layers


def dense_delta(model: Tensors, base: Tensors, layer: AdaptedLayer, scaling: float) -> torch.Tensor:
    """s·(B_t A_t − B A): the change the client's factors make to the layer's weight, in the accumulation dtype on
    the base weight's device."""
    weight = base[layer.weight]
    dtype, device = accumulation_dtype(weight.dtype), weight.device
    trained = model[layer.b].to(device, dtype) @ model[layer.a].to(device, dtype)
    start = base[layer.b].to(device, dtype) @ base[layer.a].to(device, dtype)
    return (trained - start).mul_(scaling)


class DenseUpdate(Mapping[str, torch.Tensor]):
    """A client's update τ_t with each adapted layer's dense ΔW under its base weight's name and the factors
    left out; every other tensor is θ_t − θ. Tensors are made when read."""

    def __init__(self, model: Tensors, base: Tensors, layers: Sequence[AdaptedLayer], scaling: float) -> None:
        self.model, self.base, self.scaling = model, base, scaling
        self.layers = {layer.weight: layer for layer in layers}
        factors = {name for layer in layers for name in (layer.a, layer.b)}
        self.names = [name for name in base if name not in factors]
        self.specs = {name: _meta(base[name]) for name in self.names}  # shapes and dtypes, for checks without reading

    def __getitem__(self, name: str) -> torch.Tensor:
        if name in self.layers:
            return dense_delta(self.model, self.base, self.layers[name], self.scaling)
        base = self.base[name]
        dtype = accumulation_dtype(base.dtype) if base.is_floating_point() else torch.int64
        return self.model[name].to(base.device, dtype) - base.to(dtype)

    def __iter__(self) -> Iterator[str]:
        return iter(self.names)

    def __len__(self) -> int:
        return len(self.names)


def stacked_delta(models: Sequence[Tensors], base: Tensors, layer: AdaptedLayer, scaling: float,
                  coefficients: Sequence[float]) -> torch.Tensor:
    """Σ_t c_t·s·(B_t A_t − B A) as one product of the stacked factors [c_1 B_1 … c_T B_T]·[A_1; …; A_T] (rank T·r),
    minus (Σ_t c_t)·s·B A: the weighted sum of the clients' dense updates, exactly, without making any of them."""
    weight = base[layer.weight]
    dtype, device = accumulation_dtype(weight.dtype), weight.device
    left = torch.cat([c * model[layer.b].to(device, dtype) for c, model in zip(coefficients, models)], dim=1)
    right = torch.cat([model[layer.a].to(device, dtype) for model in models], dim=0)
    start = base[layer.b].to(device, dtype) @ base[layer.a].to(device, dtype)
    return (left @ right).sub_(start, alpha=float(sum(coefficients))).mul_(scaling)


def _meta(tensor: torch.Tensor) -> torch.Tensor:
    dtype = accumulation_dtype(tensor.dtype) if tensor.is_floating_point() else torch.int64
    return torch.empty(tensor.shape, dtype=dtype, device="meta")


def fold(base: Tensors, layer: AdaptedLayer, delta: torch.Tensor, scaling: float, server_lr: float) -> dict[str, torch.Tensor]:
    """The layer after a round: W + s·B A + β·Δ folded into its base weight (in W's dtype), A kept, B = 0, so the
    adapted layer computes W + s·B A + β·Δ and the next round's adapters start from zero."""
    weight = base[layer.weight]
    dtype = accumulation_dtype(weight.dtype)
    start = base[layer.b].to(weight.device, dtype) @ base[layer.a].to(weight.device, dtype)
    folded = weight.to(dtype) + scaling * start + server_lr * delta.to(weight.device, dtype)
    return {layer.weight: folded.to(weight.dtype), layer.a: base[layer.a], layer.b: torch.zeros_like(base[layer.b])}
