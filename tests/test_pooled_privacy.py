"""Pooled DP-SGD: one central DP-SGD step per round over every participant's records, its noise shared out under
secure aggregation; the server optimisers that apply a noisy aggregate; and the small-tenant failure it fixes."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
import yaml
from hypothesis import given, settings
from hypothesis import strategies as st
from opacus.accountants import RDPAccountant as OpacusRDP
from pydantic import ValidationError

from fedcrm.data.synthetic import generate_federation
from fedcrm.models.layout import ModelLayout
from fedcrm.models.mlp import TabularMLP
from fedcrm.privacy.mechanisms import POOLED_RESOLUTION, PooledNoise, takes_part
from fedcrm.privacy.plans import (client_accountant, client_noise_multiplier, pooled_accountant, pooled_noise_multiplier,
                                  statistics_noise_multiplier)
from fedcrm.privacy.pooled_gradients import clipped_gradient_sum
from fedcrm.privacy.rdp import DEFAULT_ORDERS
from fedcrm.spec.manifests import Federation, ModelSpec, ServerOptimizer
from fedcrm.training.preprocessing import CategoricalVocab, EncodedData, NumericStats, Preprocessing
from fedcrm.training.server_optimizers import ServerOptimizerState

PREP = Preprocessing(numeric=[NumericStats("a", 0.0, 1.0, "none"), NumericStats("b", 0.0, 1.0, "none")],
                     boolean=[], categorical=[CategoricalVocab("c", ["p", "q", "r"])], target="y", rows=40,
                     positive_rate=0.5)


def _model_and_data(n: int = 40) -> tuple[TabularMLP, EncodedData]:
    rng = np.random.default_rng(0)
    layout = ModelLayout.build(ModelSpec(hidden=[6]), PREP)
    torch.manual_seed(0)
    model = TabularMLP(layout)
    data = EncodedData(dense=rng.normal(size=(n, layout.dense_width)).astype(np.float32),
                       categorical=rng.integers(0, 4, size=(n, 1)).astype(np.int64),
                       labels=rng.integers(0, 2, size=n).astype(np.float32))
    return model, data


def _manual_clipped_sum(model: TabularMLP, data: EncodedData, clip: float) -> np.ndarray:
    """Record by record with plain autograd: the reference the vectorised version must match."""
    total = np.zeros(model.layout.size)
    names = [name for name, _ in model.layout.shapes()]
    params = dict(model.named_parameters())
    for i in range(len(data)):
        model.zero_grad()
        logit = model(torch.from_numpy(data.dense[i : i + 1]), torch.from_numpy(data.categorical[i : i + 1]))
        torch.nn.functional.binary_cross_entropy_with_logits(logit, torch.from_numpy(data.labels[i : i + 1])).backward()
        flat = torch.cat([params[name].grad.reshape(-1) for name in names]).double().numpy()  # type: ignore[union-attr]
        total += flat * min(1.0, clip / (np.linalg.norm(flat) + 1e-12))
    return total


# ----------------------------------------------------------------- one participant's part

def test_the_vectorised_clipped_sum_is_the_per_record_one() -> None:
    model, data = _model_and_data()
    for clip in (0.01, 1.0, 100.0):  # mostly clipped, some, none
        got = clipped_gradient_sum(model, data, rate=1.0, clip=clip)
        assert got.sampled == len(data)
        assert np.allclose(got.gradient_sum, _manual_clipped_sum(model, data, clip), rtol=1e-4, atol=1e-6)
    assert clipped_gradient_sum(model, data, rate=1e-12, clip=1.0).sampled == 0


@settings(max_examples=20, deadline=None)
@given(drop=st.integers(0, 39), clip=st.floats(0.01, 10.0))
def test_one_record_moves_the_sum_by_at_most_the_clipping_norm(drop: int, clip: float) -> None:
    model, data = _model_and_data()
    keep = np.arange(len(data)) != drop
    without = EncodedData(dense=data.dense[keep], categorical=data.categorical[keep], labels=data.labels[keep])
    a = clipped_gradient_sum(model, data, rate=1.0, clip=clip).gradient_sum
    b = clipped_gradient_sum(model, without, rate=1.0, clip=clip).gradient_sum
    assert np.linalg.norm(a - b) <= clip * (1 + 1e-5)


def test_poisson_sampling_takes_each_record_at_the_rate() -> None:
    model, data = _model_and_data(n=400)
    taken = [clipped_gradient_sum(model, data, rate=0.25, clip=1.0).sampled for _ in range(30)]
    assert abs(np.mean(taken) / 400 - 0.25) < 0.03  # 12,000 Bernoulli draws: sd 0.004
    assert len(set(taken)) > 5  # a Poisson sample, not a fixed batch


def test_each_share_of_the_noise_is_one_over_t_min_of_a_central_step() -> None:
    noise = PooledNoise(clipping_norm=2.0, noise_multiplier=3.0, survivors_min=4, contributors_max=10,
                        dimension=10_000)
    assert noise.scale * noise.clipping_norm == POOLED_RESOLUTION
    assert noise.sensitivity == POOLED_RESOLUTION + 100
    draws = np.stack([noise.privatize(np.zeros(10_000)) for _ in range(4)])
    # Four shares carry one central step's noise: sigma * sensitivity, in integer steps.
    assert draws.sum(axis=0).std() == pytest.approx(3.0 * noise.sensitivity, rel=0.03)
    assert np.all(draws == np.rint(draws))
    assert np.all(np.abs(draws) <= noise.element_bound)
    decoded = noise.decode(noise.privatize(np.full(10_000, 0.5)))
    assert abs(decoded.mean() - 0.5) < 4 * 3.0 * noise.sensitivity / noise.scale / math.sqrt(4) / 100


# ----------------------------------------------------------------- accounting

def _federation(extra: dict[str, Any] | None = None, **dp: Any) -> Federation:
    doc = {"apiVersion": "fedcrm.io/v1alpha1", "kind": "Federation", "metadata": {"name": "f", "namespace": "c"},
           "spec": {"task": {"target": "y", "features": [{"name": "a", "type": "numeric"}]},
                    "training": {"rounds": 30},
                    "privacy": {"secureAggregation": {"enabled": True},
                                "differentialPrivacy": {"mode": "pooled", "epsilon": 1.0, "delta": 1e-5, **dp}}}}
    if extra:
        doc["spec"].update(extra)
    return Federation.model_validate(doc)


def test_the_central_accountant_is_opacus_rdp_for_the_same_steps() -> None:
    spec = _federation(samplingRate=0.1).spec
    accountant = pooled_accountant(spec)
    for r in range(30):
        accountant.record(f"{r + 1}@1")
    opacus = OpacusRDP()
    opacus.history = [(statistics_noise_multiplier(spec), 1.0, 1), (pooled_noise_multiplier(spec), 0.1, 30)]
    ours = accountant.spent()
    assert ours == pytest.approx(opacus.get_epsilon(delta=1e-5, alphas=list(DEFAULT_ORDERS)), rel=1e-6)
    assert 0.99 <= ours <= 1.0  # calibrated to the budget, never over it


def test_client_mode_with_participant_sampling_is_opacus_rdp_at_that_rate() -> None:
    """samplingRate in client mode: the sampled Gaussian over participants (no statistics in this accountant: they
    are record-level and reported beside the participant-level spend)."""
    spec = _federation(mode="client", samplingRate=0.2).spec
    accountant = client_accountant(spec)
    for r in range(30):
        accountant.record(f"{r + 1}@1")
    opacus = OpacusRDP()
    opacus.history = [(client_noise_multiplier(spec), 0.2, 30)]
    ours = accountant.spent()
    assert ours == pytest.approx(opacus.get_epsilon(delta=1e-5, alphas=list(DEFAULT_ORDERS)), rel=1e-6)
    assert 0.99 <= ours <= 1.0
    assert client_noise_multiplier(spec) < 0.3 * client_noise_multiplier(_federation(mode="client").spec)


def test_a_participant_coin_comes_up_at_its_rate_and_is_refused_outside_zero_to_one() -> None:
    draws = [takes_part(0.3) for _ in range(20_000)]
    assert abs(sum(draws) / len(draws) - 0.3) < 6 * math.sqrt(0.3 * 0.7 / len(draws))
    assert all(takes_part(1.0) for _ in range(100))
    for bad in (0.0, -0.1, 1.5):
        with pytest.raises(ValueError, match="sampling rate"):
            takes_part(bad)


def test_pooled_mode_needs_secure_aggregation_and_says_so() -> None:
    with pytest.raises(ValidationError, match="only a secure sum can hide"):
        _federation({"privacy": {"differentialPrivacy": {"mode": "pooled", "epsilon": 1.0, "delta": 1e-5}}})
    with pytest.raises(ValidationError, match="samplingRate applies to modes 'pooled' and 'client'"):
        _federation(mode="sample", samplingRate=0.1)


# ----------------------------------------------------------------- server optimisers

def test_no_server_optimiser_is_plain_fedavg_to_the_bit() -> None:
    rng = np.random.default_rng(1)
    w, d = rng.normal(size=50).astype(np.float32), rng.normal(size=50)
    state = ServerOptimizerState(ServerOptimizer())
    assert np.array_equal(state.step(w, d), (w.astype(np.float64) + d).astype(np.float32))
    assert state.arrays() == {}


def test_momentum_and_adam_follow_their_definitions_and_survive_a_checkpoint() -> None:
    w = np.zeros(3, dtype=np.float32)
    momentum = ServerOptimizerState(ServerOptimizer(name="momentum", learning_rate=0.5, momentum=0.9))
    w1 = momentum.step(w, np.ones(3))
    w2 = momentum.step(w1, np.ones(3))
    assert np.allclose(w2, 0.5 * 1 + 0.5 * 1.9)
    adam = ServerOptimizerState(ServerOptimizer(name="adam", learning_rate=0.1, epsilon=1e-9))
    # FedAdam normalises per coordinate: a huge and a tiny coordinate move by the same step.
    step = adam.step(w, np.array([1e4, 1e-4, -1.0]))
    assert np.allclose(step, [0.1, 0.1, -0.1], rtol=1e-4)
    restored = ServerOptimizerState(ServerOptimizer(name="adam", learning_rate=0.1, epsilon=1e-9))
    restored.restore(adam.arrays())
    assert restored.steps == 1 and np.array_equal(restored.step(step, np.ones(3)), adam.step(step, np.ones(3)))
    with pytest.raises(ValueError, match="finite"):
        adam.step(w, np.array([np.nan, 0, 0]))


# ----------------------------------------------------------------- the small-tenant failure, and its fix

def _run(tmp: Path, name: str, fed: Path, participants: list[Path]) -> tuple[dict[str, Any], str]:
    """``fedcrm run`` as a user runs it: its report and what it printed."""
    out = tmp / name
    proc = subprocess.run([sys.executable, "-m", "fedcrm.cli.main", "run", "--federation", str(fed),
                           "--participant", *map(str, participants), "--out", str(out)],
                          capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:] + proc.stdout[-3000:]
    return json.loads((out / "report.json").read_text()), " ".join(proc.stdout.split())  # unwrapped


@pytest.mark.slow
def test_a_plan_that_drowns_small_tenants_is_named_and_pooled_dp_learns_on_them(tmp_path: Path) -> None:
    """Ten tenants of 30 to 1,600 rows with label skew, batch 32, learning rate 0.001, 20 rounds, epsilon 1: each
    tenant's own DP-SGD drowns its few rows, so the plan is refused before training; accepted anyway, the run names
    the drowned tenants (and the model often ends near one class); one pooled step per round learns."""
    synth = generate_federation(tmp_path / "data", clients=10, rows=1600, min_rows=30, alpha=0.5, seed=0)
    doc = yaml.safe_load(synth.federation_path.read_text())
    doc["spec"]["training"].update(rounds=20, batchSize=32, learningRate=0.001)
    budget = {"epsilon": 1.0, "delta": 1e-5}

    doc["spec"]["privacy"]["differentialPrivacy"] = {"mode": "sample", **budget}
    (tmp_path / "refused.yaml").write_text(yaml.safe_dump(doc))
    refused = subprocess.run([sys.executable, "-m", "fedcrm.cli.main", "run", "--federation", str(tmp_path / "refused.yaml"), "--participant",
                              *map(str, synth.participant_paths), "--out", str(tmp_path / "refused")],
                             capture_output=True, text=True, timeout=600)
    # Refused before training: the plan drowns the small tenants, and pooling is the suggested fix.
    said = " ".join((refused.stdout + refused.stderr).split())  # unwrapped
    assert refused.returncode != 0 and "refused before training" in said and "mode: pooled" in said, said[-3000:]

    doc["spec"]["privacy"]["differentialPrivacy"] = {"mode": "sample", **budget, "acceptNoisyPlan": True}
    (tmp_path / "sample.yaml").write_text(yaml.safe_dump(doc))
    sample, printed = _run(tmp_path, "sample", tmp_path / "sample.yaml", synth.participant_paths)
    # Accepted for the experiment: still named before training.
    assert "noise over the whole run" in printed and "mode: pooled" in printed
    if sample["metrics"]["recall"] < 0.1:  # when it ends predicting one class, the run says so too
        assert any("close to a constant" in w for w in sample["warnings"]), sample["warnings"]

    doc["spec"]["privacy"]["differentialPrivacy"] = {"mode": "pooled", **budget}
    doc["spec"]["training"]["serverOptimizer"] = {"name": "none", "learningRate": 2.0}
    (tmp_path / "pooled.yaml").write_text(yaml.safe_dump(doc))
    pooled, printed = _run(tmp_path, "pooled", tmp_path / "pooled.yaml", synth.participant_paths)
    assert "noise over the whole run" not in printed
    assert not any("predicts" in w for w in pooled["warnings"]), pooled["warnings"]
    assert pooled["privacy"]["mode"] == "pooled" and pooled["privacy"]["epsilon_spent"] <= 1.0
    # Per-tenant DP-SGD's outcome varies run to run (test-set F1 0.2 on average over the benchmark's runs, one class
    # in a third of them, one run here reached 0.59): the comparison over repeated runs is make bench-dp-utility's.
    # What holds every run: pooled DP-SGD finds the minority class and beats it.
    final, before = pooled["metrics"], sample["metrics"]
    assert final["f1"] > 0.5 and final["recall"] > 0.3 and final["auc"] > 0.75, final
    assert final["accuracy"] > before["accuracy"], (final, before)
