"""TSV-M, Iso-C and Iso-CTS against their papers' rules written out here in NumPy on whole matrices; the driver's
whole-tensor path (one client's tensor at a time, θ + β·Δ, non-finite clients); their strategies, `fedmerge merge` and
their records."""

import gc
import weakref

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file

from fedmerge.checkpoints import merge_checkpoints
from fedmerge.errors import FedmergeError
from fedmerge.merging import METHODS, TaskVector, iter_merge, iter_merged_model, merge, merged_model
from fedmerge.merging.rule import WholeTensors
from fedmerge.merging.rules.isotropic import IsoCRule, IsoCtsRule, common_size
from fedmerge.merging.rules.tsv import TsvRule
from fedmerge.strategies import TSVM, IsoC, IsoCTS
from replies import arrays_record, reply

SHAPES = {"attn": (23, 11), "wide": (8, 30), "bias": (11,), "conv": (4, 3, 2, 2), "scale": ()}
MATRICES = ("attn", "wide")


def setup(num_clients=3, seed=0, dtype=torch.float64):
    """A base and fine-tunes sharing part of their update."""
    gen = torch.Generator().manual_seed(seed)
    randn = lambda shape: torch.randn(shape, generator=gen, dtype=torch.float64)
    base = {k: randn(s) for k, s in SHAPES.items()}
    shared = {k: randn(s) for k, s in SHAPES.items()}
    models = [{k: base[k] + 0.3 * (shared[k] + randn(s)) for k, s in SHAPES.items()} for _ in range(num_clients)]
    return {k: v.to(dtype) for k, v in base.items()}, [{k: v.to(dtype) for k, v in m.items()} for m in models]


def taus(base, models, name) -> list[np.ndarray]:
    return [(m[name].double() - base[name].double()).numpy() for m in models]


def polar(a: np.ndarray) -> np.ndarray:
    p, _, qh = np.linalg.svd(a, full_matrices=False)
    return p @ qh


def tsv_paper(vectors: list[np.ndarray]) -> np.ndarray:
    """Gargiulo et al.: each τ_t's top ⌊r/T⌋ singular triplets side by side, U and V replaced by their polar factors."""
    k = max(1, min(vectors[0].shape) // len(vectors))
    svds = [np.linalg.svd(tau, full_matrices=False) for tau in vectors]
    u = np.hstack([u[:, :k] for u, _, _ in svds])
    s = np.concatenate([s[:k] for _, s, _ in svds])
    vh = np.vstack([vh[:k] for _, _, vh in svds])
    return polar(u) @ np.diag(s) @ polar(vh)


def iso_c_paper(vectors: list[np.ndarray]) -> np.ndarray:
    """Marczak et al.: Σ_t τ_t = U Σ Vᵀ → σ̄·U Vᵀ."""
    u, s, vh = np.linalg.svd(sum(vectors), full_matrices=False)
    return s.mean() * u @ vh


def iso_cts_paper(vectors: list[np.ndarray], fraction: float) -> np.ndarray:
    """Marczak et al.: the sum's top k directions and each τ_t's top (r − k)/T outside them, orthogonalised, at the mean
    singular value."""
    r, count = min(vectors[0].shape), len(vectors)
    common = r - round((r - int(r * fraction)) / count) * count
    per_task = (r - common) // count
    u, s, vh = np.linalg.svd(sum(vectors), full_matrices=False)
    us, ss, vhs = [u[:, :common]], [s[:common]], [vh[:common]]
    for tau in vectors:
        ut, st, vht = np.linalg.svd(tau - us[0] @ (us[0].T @ tau), full_matrices=False)
        us.append(ut[:, :per_task]), ss.append(st[:per_task]), vhs.append(vht[:per_task])
    return np.concatenate(ss).mean() * polar(np.hstack(us)) @ polar(np.vstack(vhs))


PAPERS = {
    "tsv-m": (TsvRule, tsv_paper),
    "iso-c": (IsoCRule, iso_c_paper),
    "iso-cts": (lambda: IsoCtsRule(0.8), lambda v: iso_cts_paper(v, 0.8)),
    "iso-cts-0.5": (lambda: IsoCtsRule(0.5), lambda v: iso_cts_paper(v, 0.5)),
}


@pytest.mark.parametrize("num_clients", [2, 3, 5])
@pytest.mark.parametrize("method", PAPERS)
def test_each_is_its_papers_rule_on_matrices_and_the_mean_elsewhere(method, num_clients):
    make, paper = PAPERS[method]
    base, models = setup(num_clients)
    merged = merged_model(make(), base, models, 0.7)  # θ0 + α·Δ, α the paper's scaling
    for name in SHAPES:
        vectors = taus(base, models, name)
        delta = paper(vectors) if name in MATRICES else np.mean(vectors, axis=0)
        np.testing.assert_allclose(
            merged[name].numpy(), base[name].numpy() + 0.7 * delta, rtol=1e-10, atol=1e-12, err_msg=f"{method}/{name}"
        )


def test_the_common_subspace_leaves_the_rest_divisible_by_the_clients():
    assert common_size(11, 3, 0.8) == 11 - round((11 - 8) / 3) * 3 == 8
    assert common_size(768, 8, 0.8) == 768 - round(154 / 8) * 8 == 616  # the paper's ViT-B widths
    assert common_size(10, 4, 0.5) == 10 - round(5 / 4) * 4 == 6
    assert common_size(5, 8, 0.5) == 5  # fewer directions than clients: all common (Iso-C's subspace)


def test_one_client_keeps_its_update_under_tsv_and_iso_cts_with_f_1_is_iso_c():
    base, models = setup(1)
    alone = merge(TsvRule(), [TaskVector(models[0], base)])  # k = r: every direction, already orthonormal
    for name in SHAPES:
        np.testing.assert_allclose(alone[name].numpy(), taus(base, models, name)[0], rtol=1e-10, atol=1e-12)
    base, models = setup(4)
    tvs = [TaskVector(m, base) for m in models]
    iso, cts = merge(IsoCRule(), tvs), merge(IsoCtsRule(1.0), tvs)
    assert all(torch.allclose(iso[k], cts[k], rtol=1e-10, atol=1e-12) for k in SHAPES)


def test_iso_c_flattens_the_spectrum_and_tsv_orthogonalises_the_tasks_directions():
    base, models = setup(3)
    tvs = [TaskVector(m, base) for m in models]
    iso = merge(IsoCRule(), tvs)["attn"].numpy()
    singular = np.linalg.svd(iso, compute_uv=False)
    summed = np.linalg.svd(sum(taus(base, models, "attn")), compute_uv=False)
    np.testing.assert_allclose(singular, np.full(11, summed.mean()), rtol=1e-10)
    tsv = merge(TsvRule(), tvs)["attn"].numpy()  # 3 clients × k = 3 directions: rank 9, its σ the clients' top ones
    kept = np.sort(np.concatenate([np.linalg.svd(t, compute_uv=False)[:3] for t in taus(base, models, "attn")]))
    np.testing.assert_allclose(np.sort(np.linalg.svd(tsv, compute_uv=False))[-9:], kept, rtol=1e-10)
    assert np.linalg.matrix_rank(tsv) == 9


def test_rank_deficient_updates_keep_their_own_directions():
    """Two rank-1 updates of a 10 × 8 matrix: Iso-C's Δ is rank 2 at the mean of the two singular values (the
    directions of zero singular values are no directions of the updates); TSV-M's the two updates' own parts."""
    gen = torch.Generator().manual_seed(4)
    a, b = (
        torch.randn(10, 1, generator=gen, dtype=torch.float64) @ torch.randn(1, 8, generator=gen, dtype=torch.float64)
        for _ in range(2)
    )
    base = {"w": torch.zeros(10, 8, dtype=torch.float64)}
    tvs = [TaskVector({"w": a}, base), TaskVector({"w": b}, base)]
    iso = merge(IsoCRule(), tvs)["w"].numpy()
    top = np.linalg.svd((a + b).numpy(), compute_uv=False)[:2]
    np.testing.assert_allclose(np.linalg.svd(iso, compute_uv=False)[:3], [top.mean(), top.mean(), 0.0], atol=1e-10)
    tsv = merge(TsvRule(), tvs)["w"].numpy()
    assert np.linalg.matrix_rank(tsv, tol=1e-9) == 2
    zero = merge(IsoCRule(), [TaskVector(base, base)] * 2)["w"]
    assert torch.equal(zero, torch.zeros(10, 8, dtype=torch.float64))


@pytest.mark.parametrize("make", [TsvRule, IsoCRule, lambda: IsoCtsRule(0.8)])
def test_a_matrix_is_read_one_client_at_a_time(monkeypatch, make):
    """Memory holds a few tensors of a matrix's size whatever T: when a client's tensor is read, at most one tensor read
    before is still alive (Iso-C's running sum)."""
    alive, most = [], [0]
    read = WholeTensors.__getitem__

    def watched(self, t):
        gc.collect(0)  # the youngest generation: a full collection per read costs seconds in a large test run
        most[0] = max(most[0], sum(ref() is not None for ref in alive))
        tensor = read(self, t)
        alive.append(weakref.ref(tensor))
        return tensor

    monkeypatch.setattr(WholeTensors, "__getitem__", watched)
    base, models = setup(8)
    merged_model(make(), base, models)
    assert len(alive) >= 2 * 8 and most[0] <= 1


@pytest.mark.parametrize("make", [TsvRule, IsoCRule, lambda: IsoCtsRule(0.8)])
def test_the_whole_tensor_path_writes_theta_plus_beta_delta_in_thetas_dtype(make):
    base, models = setup(3, dtype=torch.bfloat16)
    delta = merge(make(), [TaskVector(m, base) for m in models])
    merged = merged_model(make(), base, models, 1.5)
    for name in SHAPES:
        assert merged[name].dtype == torch.bfloat16
        expected = (base[name].float() + 1.5 * delta[name].float()).to(torch.bfloat16)
        torch.testing.assert_close(merged[name], expected, rtol=0, atol=0)


def test_a_client_holding_nan_in_a_matrix_is_refused_or_flagged_not_decomposed():
    base, models = setup(3)
    models[1]["attn"][2, 3] = float("nan")
    with pytest.raises(FedmergeError, match="client 1: tensor 'attn' holds NaN or infinite values; nothing was merged"):
        merged_model(IsoCRule(), base, models)
    norms = np.zeros(3)
    dict(iter_merge(TsvRule(), [TaskVector(m, base) for m in models], squared_norms=norms))
    assert np.isfinite(norms[[0, 2]]).all() and not np.isfinite(norms[1])


def test_the_records():
    tsv, iso, cts = METHODS["tsv-m"], METHODS["iso-c"], METHODS["iso-cts"]
    for method in (tsv, iso, cts):
        assert method.scale == "mean" and not method.weighted and not method.no_lambda and not method.statistics
        assert method.server_lr(1.3, 8) == 1.3  # the paper's α is β
    assert tsv.tuned is None and iso.tuned is None and not tsv.params and not iso.params
    assert cts.tuned == "common_fraction" and cts.grid([]) == [0.5, 0.6, 0.7, 0.8, 0.9]
    with pytest.raises(FedmergeError, match=r"'Iso-CTS common_fraction' must be a number in \(0, 1\], got 0"):
        IsoCtsRule(0)


def numpy(tensors):
    return {k: v.numpy() for k, v in tensors.items()}


@pytest.mark.parametrize(
    "strategy, rule",
    [
        (TSVM(server_lr=1.5), TsvRule()),
        (IsoC(server_lr=1.5), IsoCRule()),
        (IsoCTS(common_fraction=0.6, server_lr=1.5), IsoCtsRule(0.6)),
    ],
)
def test_each_is_a_flower_strategy_that_merges_like_its_rule(strategy, rule):
    base, models = setup(3)
    replies = [reply(i + 1, numpy(m), num_examples=10 * (i + 1), client_id=i) for i, m in enumerate(models)]
    arrays, _ = strategy.merge_replies(1, replies[::-1], arrays_record(numpy(base)))
    expected = merged_model(rule, base, models, 1.5)
    for key in SHAPES:
        np.testing.assert_allclose(arrays[key].numpy(), expected[key].numpy(), rtol=1e-12, atol=1e-14)
    assert strategy.rounds[0].rule == rule.params()


def checkpoints(tmp_path, num_models=3):
    """A float32/bfloat16 base with an integer buffer and its fine-tunes, as safetensors files."""
    gen = torch.Generator().manual_seed(3)
    base = {
        "a.weight": torch.randn(12, 8, generator=gen),
        "b.weight": torch.randn(6, 9, generator=gen).to(torch.bfloat16),
        "c.bias": torch.randn(9, generator=gen),
        "steps": torch.tensor(4),
    }
    models = [
        {
            k: (v.float() + 0.3 * torch.randn(v.shape, generator=gen)).to(v.dtype) if v.is_floating_point() else v + t
            for k, v in base.items()
        }
        for t in range(num_models)
    ]
    save_file(base, tmp_path / "base.safetensors")
    for t, m in enumerate(models):
        save_file(m, tmp_path / f"m{t}.safetensors")
    return base, models, str(tmp_path / "base.safetensors"), [str(tmp_path / f"m{t}.safetensors") for t in range(3)]


@pytest.mark.parametrize(
    "options, rule, server_lr",
    [
        (dict(method="tsv-m"), TsvRule(), 1.0),
        (dict(method="iso-c", scaling=1.3), IsoCRule(), 1.3),
        (dict(method="iso-cts", common_fraction=0.5, server_lr=0.9), IsoCtsRule(0.5), 0.9),
    ],
)
def test_fedmerge_merge_equals_the_in_memory_rule(tmp_path, options, rule, server_lr):
    base, models, base_path, paths = checkpoints(tmp_path)
    out = merge_checkpoints(base_path, paths, tmp_path / "merged.safetensors", **options)
    merged, expected = load_file(out), merged_model(rule, base, models, server_lr)
    assert merged.keys() == expected.keys()
    for k in expected:
        assert merged[k].dtype == expected[k].dtype
        torch.testing.assert_close(merged[k], expected[k], rtol=1e-6, atol=1e-6)


@pytest.mark.cuda
@pytest.mark.parametrize("make", [TsvRule, IsoCRule, lambda: IsoCtsRule(0.8)])
def test_on_cuda_as_on_the_cpu(make):
    base, models = setup(4)
    on_cpu = merged_model(make(), base, models, 0.8)
    on_gpu = dict(iter_merged_model(make(), base, models, 0.8, device="cuda"))
    for name in SHAPES:
        assert on_gpu[name].device.type == "cuda"
        torch.testing.assert_close(on_gpu[name].cpu(), on_cpu[name], rtol=1e-10, atol=1e-10)
