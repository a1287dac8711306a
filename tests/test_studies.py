"""fedmerge.studies: the claim-1 check, the FedNova update-size study (real digits training, no Ray), the findings
command's wiring, and the report layer's independence from everything that runs things."""

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from fedmerge.cli import main
from fedmerge.merging import FedAvgRule, merged_model
from fedmerge.studies import exactness, fednova
from processes import seconds

ROOT = Path(__file__).resolve().parents[1]


def test_the_report_layer_imports_nothing_that_runs_things():
    code = (
        "import sys, fedmerge.report, fedmerge.report.findings, fedmerge.report.command; "
        "bad = [m for m in sys.modules if m.split('.')[0] in ('flwr', 'ray') "
        "or m.startswith(('fedmerge.simulations', 'fedmerge.studies', 'fedmerge.strategies', 'fedmerge.clients'))]; "
        "print(bad); sys.exit(1 if bad else 0)"
    )
    done = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=seconds(120))
    assert done.returncode == 0, done.stdout + done.stderr
    for path in (ROOT / "fedmerge" / "report").glob("*.py"):
        imports = re.findall(r"^\s*(?:from|import)\s+([\w.]+)", path.read_text(), re.M)
        assert not [
            m
            for m in imports
            if m.split(".")[0] in ("flwr", "ray") or m.startswith(("fedmerge.simulations", "fedmerge.studies"))
        ], f"{path.name} imports {imports}"


def test_claim_1_holds_through_the_core_and_the_flower_strategy_and_the_check_can_fail():
    result = exactness.check()
    cases = result["cases"]
    assert len(cases) == 24 and {c["dtype"] for c in cases} == {"float32", "float64"}
    assert all(max(c["core_error"], c["strategy_error"]) <= c["tolerance"] for c in cases)
    assert any(c["core_error"] > 0 for c in cases if c["dtype"] == "float32")  # rounding is visible: the check measures
    assert all(c["tolerance"] < 1e-3 for c in cases)  # a wrong β (say λ instead of λT) would differ by ~0.1


def test_mean_direction_is_lr_sum_where_updates_grow_linearly_and_none_is_fedavg():
    gen = torch.Generator().manual_seed(0)
    base = {"w": torch.randn(5, 3, generator=gen, dtype=torch.float64)}
    directions = [torch.randn(5, 3, generator=gen, dtype=torch.float64) for _ in range(3)]
    lr_sums = [0.5, 2.0, 8.0]
    units = [d / d.norm() for d in directions]
    models = [{"w": base["w"] + 0.1 * a * u} for a, u in zip(lr_sums, units)]  # ‖τ_t‖ = 0.1 · Σ η_t exactly
    assert [fednova.norm(m, base) for m in models] == pytest.approx([0.1 * a for a in lr_sums])
    by_norm = merged_model(fednova.rule_for("mean-direction", [1, 1, 1], lr_sums), base, models)
    by_lr = merged_model(fednova.rule_for("lr-sum", [1, 1, 1], lr_sums), base, models)
    assert torch.allclose(by_norm["w"], by_lr["w"], atol=1e-12)
    none = merged_model(fednova.rule_for("none", [10, 20, 40], lr_sums), base, models)
    assert torch.equal(none["w"], merged_model(FedAvgRule(), base, models)["w"])
    saturated = [{"w": base["w"] + (m["w"] - base["w"]) * (1 if i == 0 else 0.5)} for i, m in enumerate(models)]
    assert not torch.allclose(
        merged_model(fednova.rule_for("mean-direction", [1] * 3, lr_sums), base, saturated)["w"],
        merged_model(fednova.rule_for("lr-sum", [1] * 3, lr_sums), base, saturated)["w"],
    )


def test_the_held_out_study_shares_no_recipe_and_no_seed_with_the_one_mean_direction_was_designed_on():
    design, held_out = fednova.UPDATE_SIZE, fednova.HELD_OUT
    assert not set(design.seeds) & set(held_out.seeds)
    assert not set(design.recipes) & set(held_out.recipes)
    assert not {(r.suite, r.optimizer, r.lr, r.steps, r.schedule) for r in design.recipes.values()} & {
        (r.suite, r.optimizer, r.lr, r.steps, r.schedule) for r in held_out.recipes.values()
    }
    assert any(r.suite != "digits" for r in held_out.recipes.values())  # another suite too


def test_fednova_clients_train_their_own_head_and_the_merge_touches_shared_tensors_only():
    clients = fednova.Clients(fednova.UPDATE_SIZE.recipes["sgd-small"], 0)
    fed = clients.fed
    assert set(clients.shared) == set(fed.shared_names) and not set(clients.shared) & set(fed.private_names)
    shared, heads, _ = clients.train(clients.theta0, clients.heads0, [(0, 5)] * fednova.CLIENTS)
    for t, head in enumerate(heads):
        assert set(head) == {k for k, owner in fed.private_names.items() if owner == t}
        assert any(not torch.equal(head[k], clients.heads0[t][k]) for k in head)  # client t trained its head
    merged = merged_model(fednova.rule_for("lr-sum", [1] * 4, [1, 2, 3, 4]), clients.theta0, shared)
    assert set(merged) == set(clients.shared)
    model = fed.model_from({**merged, **{k: v for h in heads for k, v in h.items()}}, "cpu").state_dict()
    for t, head in enumerate(heads):  # every client's head in the merged model is its own, as it trained it
        assert all(torch.equal(model[k], v) for k, v in head.items())


@pytest.mark.slow
def test_the_fednova_study_trains_real_digits_clients_and_reuses_its_cells(tmp_path):
    study = fednova.UPDATE_SIZE
    folder = fednova.run_study(
        tmp_path, study, recipes=("sgd-small",), seeds=(0,), log=lambda line: None, fingerprint="code A"
    )
    path = folder / "sgd-small-seed0.json"
    cell = json.loads(path.read_text())
    assert cell["steps"] == [25, 63, 159, 400] and cell["lr_sum"] == pytest.approx(
        [lr * k for lr, k in zip(cell["lr"], cell["steps"])]
    )
    assert all(n > 0 for n in cell["norm"]) and cell["norm"] == sorted(cell["norm"])  # more work, larger updates
    assert cell["tensors"] == {"shared": 4, "private": 8} and cell["evaluation"]["test"] == [269] * 4
    # the suite the page relies on: fine-tuning moves θ0 (≈ 0.5) a long way; the least-trained client (lr 0.0025,
    # 25 steps) least of all, by design of the spread
    gains = [own - zero for own, zero in zip(cell["own_accuracy"], cell["theta0_accuracy"])]
    assert all(g > 0 for g in gains) and gains[-1] > 0.3 and max(cell["theta0_accuracy"]) < 0.65, gains
    assert set(cell["one_shot"]) == set(fednova.NORMALISERS) == set(cell["multi_round"])
    assert all(len(cell["multi_round"][n]["history"]) == fednova.ROUNDS for n in fednova.NORMALISERS)
    assert 0.3 < cell["one_shot"]["none"]["normalized_accuracy"] <= 1.2
    assert cell["code"] == "code A" and cell["shipped_default"] in ("steps", "lr-sum")
    stamp = path.stat().st_mtime_ns
    fednova.run_study(tmp_path, study, recipes=("sgd-small",), seeds=(0,), log=lambda line: None, fingerprint="code A")
    assert path.stat().st_mtime_ns == stamp  # reused
    (folder / "gone-seed0.json").write_text("{}")  # a recipe the study no longer has
    lines = []  # cells made by other code are made again
    fednova.run_study(tmp_path, study, recipes=("sgd-small",), seeds=(0,), log=lines.append, fingerprint="code B")
    again = json.loads(path.read_text())
    assert again["key"] == fednova.cell_key(study.recipes["sgd-small"], 0, "code B") and len(lines) == 1
    assert again["one_shot"] == cell["one_shot"] and again["norm"] == cell["norm"]  # same seed, same numbers
    assert sorted(p.name for p in folder.iterdir()) == ["sgd-small-seed0.json"]


def test_findings_and_sweep_commands_live_side_by_side(capsys):
    assert main(["sweep", "--list"]) == 0
    assert "training-heterogeneity" in capsys.readouterr().out
    with pytest.raises(SystemExit) as done:
        main(["findings", "--help"])
    assert done.value.code == 0 and "--no-run" in capsys.readouterr().out
    assert os.path.exists(ROOT / "fedmerge" / "studies" / "command.py")
