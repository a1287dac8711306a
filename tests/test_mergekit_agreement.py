"""fedmerge's Model Breadcrumbs, DELLA, Model Stock, SLERP and Karcher mean against mergekit's on the same tensors.

mergekit is no dependency of fedmerge: it runs in its own virtual environment, ``benchmarks/.mergekit-venv`` (made by
``python benchmarks/merge.py``), or the Python that ``FEDMERGE_MERGEKIT_PYTHON`` names; without one these tests are
skipped. Inputs and outputs travel as safetensors files; both sides compute in float32.
"""

import os
from pathlib import Path

import numpy as np
import pytest
import torch
from scratch_python import outputs_of

from fedmerge.merging import merged_model
from fedmerge.merging.rules.breadcrumbs import BreadcrumbsRule
from fedmerge.merging.rules.della import keep_probabilities, row_length
from fedmerge.merging.rules.karcher import KarcherRule
from fedmerge.merging.rules.model_stock import ModelStockRule
from fedmerge.merging.rules.slerp import SlerpRule

MERGEKIT_PYTHON = Path(
    os.environ.get("FEDMERGE_MERGEKIT_PYTHON")
    or Path(__file__).resolve().parents[1] / "benchmarks" / ".mergekit-venv" / "bin" / "python"
)
pytestmark = pytest.mark.skipif(
    not MERGEKIT_PYTHON.exists(),
    reason=f"mergekit's scratch environment is absent: no {MERGEKIT_PYTHON} (FEDMERGE_MERGEKIT_PYTHON, default "
    "benchmarks/.mergekit-venv/bin/python, which python benchmarks/merge.py makes)",
)

# Runs in mergekit's environment: each job merges one tensor with mergekit.merge_methods.merge_tensors, or, for
# "della_keep", runs mergekit's DELLA pruning with torch.bernoulli replaced by its argument (so the result is
# τ ⊙ q, q the keep probabilities) and no rescaling.
RUNNER = """
import json, sys, torch
from safetensors.torch import load_file, save_file
from mergekit.merge_methods import merge_tensors
from mergekit.sparsify import della_magprune
inputs, jobs = load_file(sys.argv[1]), json.loads(open(sys.argv[2]).read())
bernoulli, out = torch.bernoulli, {}
for key, job in jobs.items():
    tensors = [inputs[name] for name in job["inputs"]]
    if job["method"] == "della_keep":
        torch.bernoulli = lambda probabilities, *args, **kwargs: probabilities
        out[key] = della_magprune(tensors[0], job["density"], job["epsilon"])
        torch.bernoulli = bernoulli
    else:
        out[key] = merge_tensors(tensors, job["method"], parameters=job["parameters"], base_index=job["base_index"],
                                 dtype=torch.float32)
save_file({k: v.contiguous() for k, v in out.items()}, sys.argv[3])
"""

SHAPES = {"attn.weight": (48, 32), "mlp.weight": (40, 24), "norm.weight": (32,), "bias": (5,)}
NUM_MODELS = 3


def models() -> tuple[dict, list[dict]]:
    """A float32 base and fine-tunes sharing part of their update (positive cosines, as fine-tunes of one base)."""
    gen = torch.Generator().manual_seed(11)
    base = {k: torch.randn(s, generator=gen) for k, s in SHAPES.items()}
    shared = {k: torch.randn(s, generator=gen) for k, s in SHAPES.items()}
    return base, [
        {k: base[k] + 0.2 * (shared[k] + torch.randn(s, generator=gen)) for k, s in SHAPES.items()}
        for _ in range(NUM_MODELS)
    ]


def near_colinear(model: dict) -> dict:
    """A model within |cos| > 0.9995 of ``model`` in every tensor: SLERP interpolates it linearly."""
    gen = torch.Generator().manual_seed(12)
    return {k: 1.1 * v + 1e-3 * v.abs().mean() * torch.randn(v.shape, generator=gen) for k, v in model.items()}


FEDMERGE = {  # name: (inputs, fedmerge rule, β, mergekit method, mergekit parameters, base_index)
    "breadcrumbs": (
        "base+models",
        BreadcrumbsRule(0.3, 0.05),
        0.5 * NUM_MODELS,  # λ = 0.5: β = λ·T
        "breadcrumbs",
        {"weight": 0.5, "density": 0.3, "gamma": 0.05},
        0,
    ),
    "breadcrumbs-ties": (
        "base+models",
        BreadcrumbsRule(0.2, 0.1, True, [1, 2, 3]),
        1.0,
        "breadcrumbs_ties",
        {"weight": [1.0, 2.0, 3.0], "density": 0.2, "gamma": 0.1, "normalize": True},
        0,
    ),
    "slerp": ("2 models", SlerpRule(0.3), 1.0, "slerp", {"t": 0.3}, 0),
    "slerp-colinear": ("colinear", SlerpRule(0.7), 1.0, "slerp", {"t": 0.7}, 0),
    "karcher": ("models", KarcherRule(), 1.0, "karcher", {}, None),
    "model-stock": ("base+models", ModelStockRule(), 1.0, "model_stock", {}, 0),
}


@pytest.fixture(scope="module")
def mergekit(tmp_path_factory) -> dict[str, torch.Tensor]:
    """Every job's output from mergekit, keyed ``<case>/<tensor>``."""
    work = tmp_path_factory.mktemp("mergekit")
    base, fine_tunes = models()
    inputs = {f"base/{k}": v for k, v in base.items()}
    inputs |= {f"m{t}/{k}": v for t, model in enumerate(fine_tunes) for k, v in model.items()}
    inputs |= {f"colinear/{k}": v for k, v in near_colinear(fine_tunes[0]).items()}
    names = {
        "base+models": ["base", *(f"m{t}" for t in range(NUM_MODELS))],
        "models": [f"m{t}" for t in range(NUM_MODELS)],
        "2 models": ["m0", "m1"],
        "colinear": ["m0", "colinear"],
    }
    jobs = {
        f"{case}/{k}": {
            "method": method,
            "inputs": [f"{m}/{k}" for m in names[which]],
            "parameters": params,
            "base_index": base_index,
        }
        for case, (which, _, _, method, params, base_index) in FEDMERGE.items()
        for k in SHAPES
    }
    jobs |= {
        f"della-keep/{t}/{k}": {"method": "della_keep", "inputs": [f"tau{t}/{k}"], "density": 0.3, "epsilon": 0.2}
        for t in range(NUM_MODELS)
        for k in SHAPES
    }
    inputs |= {f"tau{t}/{k}": model[k] - base[k] for t, model in enumerate(fine_tunes) for k in SHAPES}
    return outputs_of(MERGEKIT_PYTHON, RUNNER, work, inputs, jobs)


@pytest.mark.parametrize("case", FEDMERGE)
def test_fedmerge_agrees_with_mergekit(mergekit, case):
    """Breadcrumbs (θ0 + λ·Σ_t m_t ⊙ τ_t; with TIES, weighted, mergekit's normalize: true), SLERP (both branches),
    the Karcher mean and Model Stock: the same numbers up to float32 rounding."""
    which, rule, server_lr, *_ = FEDMERGE[case]
    base, fine_tunes = models()
    chosen = {"2 models": fine_tunes[:2], "colinear": [fine_tunes[0], near_colinear(fine_tunes[0])]}.get(
        which, fine_tunes
    )
    ours = merged_model(rule, base, chosen, server_lr)
    for name in SHAPES:
        theirs = mergekit[f"{case}/{name}"]
        np.testing.assert_allclose(ours[name].numpy(), theirs.numpy(), rtol=2e-5, atol=2e-6, err_msg=f"{case}/{name}")


def test_della_keep_probabilities_are_mergekits(mergekit):
    """DELLA's keep probabilities q_j = k − ε + 2ε·r_j/(n − 1), by rank in each row, are mergekit's (its random draws
    and L1 rescaling aside: mergekit's della_magprune with its Bernoulli draws replaced by their probabilities)."""
    base, fine_tunes = models()
    for t, model in enumerate(fine_tunes):
        for name, shape in SHAPES.items():
            tau = model[name] - base[name]
            n = row_length(torch.Size(shape))
            q = keep_probabilities(tau.abs().reshape(-1, n), 0.3, 0.2).view(shape)
            np.testing.assert_allclose(
                (tau * q).numpy(),
                mergekit[f"della-keep/{t}/{name}"].numpy(),
                rtol=1e-6,
                atol=1e-7,
                err_msg=f"model {t}: {name}",
            )
