"""fedmerge's TSV-M, Iso-C, Iso-CTS, Fisher merging and RegMean against FusionBench's on the same tensors.

FusionBench is no dependency of fedmerge: it runs in a Python of its own, the one ``FEDMERGE_FUSIONBENCH_PYTHON`` names
(e.g. a scratch venv with ``pip install fusion-bench==0.2.33``); without it these tests are skipped. Inputs and outputs
travel as safetensors files; both sides compute in float64. FusionBench's functions are called on whole state dicts:
``iso_c``, ``iso_cts``, ``compute_and_sum_svd_mem_reduction`` (TSV-M), ``merging_with_fisher_weights`` (without its
optional normalisation, which is not the paper's) and ``merging_with_regmean_weights``.
"""

import os
from pathlib import Path

import numpy as np
import pytest
import torch
from scratch_python import outputs_of

from fedmerge.merging import merged_model
from fedmerge.merging.rules.fisher import FisherRule
from fedmerge.merging.rules.isotropic import IsoCRule, IsoCtsRule
from fedmerge.merging.rules.regmean import RegMeanRule
from fedmerge.merging.rules.tsv import TsvRule

FUSIONBENCH_PYTHON = Path(os.environ.get("FEDMERGE_FUSIONBENCH_PYTHON", "/nonexistent"))
pytestmark = pytest.mark.skipif(
    not FUSIONBENCH_PYTHON.exists(),
    reason="FusionBench's scratch environment is absent: set FEDMERGE_FUSIONBENCH_PYTHON to a Python with fusion-bench",
)

# Runs in FusionBench's environment: each job merges the models' state dicts with one of its functions.
RUNNER = """
import json, sys, torch
from safetensors.torch import load_file, save_file
from fusion_bench.method.isotropic_merging.iso_utils import iso_c, iso_cts
from fusion_bench.method.task_singular_vector.utils.TSVM_utils import compute_and_sum_svd_mem_reduction
from fusion_bench.method.fisher_merging.fisher_merging import merging_with_fisher_weights
from fusion_bench.method.regmean.regmean import merging_with_regmean_weights
inputs, jobs = load_file(sys.argv[1]), json.loads(open(sys.argv[2]).read())
def part(prefix):
    return {k[len(prefix):]: v for k, v in inputs.items() if k.startswith(prefix)}
base, count, out = part("base/"), jobs["count"], {}
models = [part(f"m{t}/") for t in range(count)]
taus = [{k: m[k] - base[k] for k in base} for m in models]
merged = {
    "tsv-m": compute_and_sum_svd_mem_reduction(taus, accelerator="cpu"),
    "iso-c": iso_c(taus, accelerator="cpu"),
    "iso-cts": iso_cts(taus, common_space_fraction=jobs["common_fraction"], accelerator="cpu"),
}
for name, tau in merged.items():
    out.update({f"{name}/{k}": base[k] + jobs["alpha"] * v for k, v in tau.items()})
params = {k: [m[k] for m in models] for k in base}
fisher = merging_with_fisher_weights(params, [part(f"fisher{t}/") for t in range(count)],
                                     torch.tensor(jobs["weights"], dtype=torch.float64), normalize_fisher_weight=False,
                                     minimal_fisher_weight=jobs["floor"])
out.update({f"fisher/{k}": v for k, v in fisher.items()})
grams = [{k[:-len(".weight")]: v for k, v in part(f"grams{t}/").items()} for t in range(count)]
regmean = merging_with_regmean_weights(params, grams, reduce_non_diagonal_ratio=jobs["alpha_regmean"])
out.update({f"regmean/{k}": v for k, v in regmean.items()})
save_file({k: v.contiguous() for k, v in out.items()}, sys.argv[3])
"""

SHAPES = {
    "layer.q.weight": (48, 32),
    "layer.q.bias": (48,),
    "layer.fc.weight": (24, 48),
    "norm.weight": (32,),
    "wide.weight": (6, 40),
}
COUNT, ALPHA, FRACTION, FLOOR, WEIGHTS, ALPHA_REGMEAN = 4, 0.9, 0.8, 1e-6, [1.0, 2.0, 0.5, 1.5], 0.75
# RegMean's α exact in float32: FusionBench builds its off-diagonal mask in float32 (0.7 would differ by ~1e-9).


def inputs():
    """A float64 base, fine-tunes sharing part of their update, Fishers of every tensor and Grams of the matrices."""
    gen = torch.Generator().manual_seed(5)
    randn = lambda shape: torch.randn(shape, generator=gen, dtype=torch.float64)
    base = {k: randn(s) for k, s in SHAPES.items()}
    shared = {k: randn(s) for k, s in SHAPES.items()}
    models = [{k: base[k] + 0.1 * (shared[k] + randn(s)) for k, s in SHAPES.items()} for _ in range(COUNT)]
    fishers = [{k: randn(s) ** 2 for k, s in SHAPES.items()} for _ in range(COUNT)]
    grams = []
    for _ in range(COUNT):
        grams.append({})
        for k, s in SHAPES.items():
            if len(s) == 2:
                x = randn((3 * s[1], s[1]))
                grams[-1][k] = x.T @ x / len(x)
    return base, models, fishers, grams


@pytest.fixture(scope="module")
def fusionbench(tmp_path_factory) -> dict[str, torch.Tensor]:
    work = tmp_path_factory.mktemp("fusionbench")
    base, models, fishers, grams = inputs()
    tensors = {f"base/{k}": v for k, v in base.items()}
    for t in range(COUNT):
        tensors |= {f"m{t}/{k}": v for k, v in models[t].items()}
        tensors |= {f"fisher{t}/{k}": v for k, v in fishers[t].items()}
        tensors |= {f"grams{t}/{k}": v for k, v in grams[t].items()}
    jobs = {
        "count": COUNT,
        "alpha": ALPHA,
        "common_fraction": FRACTION,
        "floor": FLOOR,
        "weights": WEIGHTS,
        "alpha_regmean": ALPHA_REGMEAN,
    }
    return outputs_of(FUSIONBENCH_PYTHON, RUNNER, work, tensors, jobs)


CASES = {  # name: (fedmerge rule from (fishers, grams), β)
    "tsv-m": (lambda f, g: TsvRule(), ALPHA),
    "iso-c": (lambda f, g: IsoCRule(), ALPHA),
    "iso-cts": (lambda f, g: IsoCtsRule(FRACTION), ALPHA),
    "fisher": (lambda f, g: FisherRule(f, FLOOR, WEIGHTS), 1.0),
    "regmean": (lambda f, g: RegMeanRule(g, ALPHA_REGMEAN), 1.0),
}


@pytest.mark.parametrize("case", CASES)
def test_fedmerge_agrees_with_fusionbench(fusionbench, case):
    """The same merged models up to float64 rounding: TSV-M, Iso-C and Iso-CTS (θ0 + α·Δ, FusionBench's scaling_factor /
    alpha), Fisher merging with per-model coefficients, RegMean with its off-diagonal factor."""
    make, server_lr = CASES[case]
    base, models, fishers, grams = inputs()
    ours = merged_model(make(fishers, grams), base, models, server_lr)
    for name in SHAPES:
        np.testing.assert_allclose(
            ours[name].numpy(), fusionbench[f"{case}/{name}"].numpy(), rtol=1e-9, atol=1e-11, err_msg=f"{case}/{name}"
        )
