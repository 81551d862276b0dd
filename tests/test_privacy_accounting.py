"""RDP accounting: agreement with Opacus, calibration, persistence and the stop before overspending."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from opacus.accountants import RDPAccountant as OpacusRDP
from opacus.accountants.analysis import rdp as opacus_rdp
from opacus.accountants.utils import get_noise_multiplier

from fedcrm.privacy.accounting import (
    BudgetExhausted,
    RdpAccountant,
    calibrate_noise_multiplier,
    epsilon_for,
    rounds_funded,
)
from fedcrm.privacy.rdp import DEFAULT_ORDERS, compute_rdp, epsilon_from_rdp
from fedcrm.spec.manifests import Federation
from fedcrm_aggregator.privacy import PrivacyLedger

KNOWN = [(0.008, 1.1, 6250), (1.0, 28.6, 50), (0.01, 0.8, 1000), (0.3, 2.0, 100), (0.2, 3.58, 15), (0.05, 0.6, 10)]


@pytest.mark.parametrize(("q", "sigma", "steps"), KNOWN)
def test_rdp_and_epsilon_match_opacus_for_known_parameters(q: float, sigma: float, steps: int) -> None:
    orders = list(DEFAULT_ORDERS)
    ours = compute_rdp(q=q, noise_multiplier=sigma, steps=steps, orders=orders)
    theirs = opacus_rdp.compute_rdp(q=q, noise_multiplier=sigma, steps=steps, orders=orders)
    for a, b in zip(ours, theirs):
        assert a == pytest.approx(b, rel=1e-8, abs=1e-12)
    eps_theirs, _ = opacus_rdp.get_privacy_spent(orders=orders, rdp=theirs, delta=1e-5)
    assert epsilon_from_rdp(ours, 1e-5, orders) == pytest.approx(eps_theirs, rel=1e-9)


def test_epsilon_matches_opacus_accountant_with_its_default_orders() -> None:
    acc = OpacusRDP()
    acc.history = [(1.1, 0.008, 6250)]
    orders = [1 + x / 10.0 for x in range(1, 100)] + list(range(12, 64))
    ours = epsilon_from_rdp(compute_rdp(q=0.008, noise_multiplier=1.1, steps=6250, orders=orders), 1e-5, orders)
    assert ours == pytest.approx(acc.get_epsilon(delta=1e-5), rel=1e-9)


def test_calibration_agrees_with_opacus_and_never_overspends() -> None:
    ours = calibrate_noise_multiplier(epsilon=1.0, delta=1e-5, q=0.008, steps=6250)
    theirs = get_noise_multiplier(target_epsilon=1.0, target_delta=1e-5, sample_rate=0.008, steps=6250,
                                  accountant="rdp", epsilon_tolerance=0.001)
    assert ours == pytest.approx(theirs, rel=0.01)
    assert epsilon_for(q=0.008, noise_multiplier=ours, steps=6250, delta=1e-5) <= 1.0
    assert epsilon_for(q=0.008, noise_multiplier=ours * 0.99, steps=6250, delta=1e-5) > 1.0


def test_gaussian_mechanism_closed_form() -> None:
    # q = 1: RDP is alpha / (2 sigma^2) per step.
    assert compute_rdp(q=1.0, noise_multiplier=2.0, steps=3, orders=[2.0, 8.0]) == [3 * 2 / 8, 3 * 8 / 8]


@settings(max_examples=15, deadline=None)
@given(q=st.floats(0.001, 1.0), sigma=st.floats(0.5, 50), steps=st.integers(1, 500))
def test_epsilon_grows_with_steps_and_shrinks_with_noise(q: float, sigma: float, steps: int) -> None:
    eps = epsilon_for(q=q, noise_multiplier=sigma, steps=steps, delta=1e-5)
    assert eps <= epsilon_for(q=q, noise_multiplier=sigma, steps=steps + 1, delta=1e-5) + 1e-12
    assert eps >= epsilon_for(q=q, noise_multiplier=sigma * 1.5, steps=steps, delta=1e-5) - 1e-12


def test_accountant_stops_before_the_release_that_would_overspend() -> None:
    sigma = calibrate_noise_multiplier(epsilon=1.0, delta=1e-5, q=1.0, steps=5)
    acc = RdpAccountant(epsilon=1.0, delta=1e-5, noise_multiplier=sigma)
    assert rounds_funded(epsilon=1.0, delta=1e-5, q=1.0, noise_multiplier=sigma, steps_per_round=1, limit=100) == 5
    for r in range(1, 6):
        acc.check_next()
        acc.record(f"{r}@1")
    assert acc.spent() <= 1.0
    with pytest.raises(BudgetExhausted, match="over the budget of 1"):
        acc.check_next()


def test_state_round_trips_is_checked_and_never_double_counts() -> None:
    acc = RdpAccountant(epsilon=2.0, delta=1e-5, noise_multiplier=3.0, q=0.1, steps_per_release=10)
    acc.record("1@1")
    acc.record("1@1")  # the same release again: counted once
    acc.record("1@2")  # the same round re-run by a restarted aggregator: a second look, counted
    state = json.loads(json.dumps(acc.state_dict()))
    back = RdpAccountant.from_state(state, expected=RdpAccountant(epsilon=2.0, delta=1e-5, noise_multiplier=3.0,
                                                                   q=0.1, steps_per_release=10))
    assert back.steps == 20 and back.spent() == acc.spent()
    with pytest.raises(ValueError, match="noise_multiplier"):
        RdpAccountant.from_state(state, expected=RdpAccountant(epsilon=2.0, delta=1e-5, noise_multiplier=2.0,
                                                                q=0.1, steps_per_release=10))
    with pytest.raises(ValueError, match="format"):
        RdpAccountant.from_state({**state, "format": "other"})


def _federation(mode: str, **dp: object) -> Federation:
    if mode == "client":  # three participants cannot carry client-level noise: these test the ledger's mechanics
        dp = {"acceptNoisyPlan": True, **dp}
    return Federation.model_validate({
        "metadata": {"name": "f", "namespace": "ns"},
        "spec": {"task": {"target": "y", "features": [{"name": "x", "type": "numeric"}]},
                 "training": {"rounds": 4, "minParticipants": 2},
                 "privacy": {"differentialPrivacy": {"mode": mode, "epsilon": 1.0, "delta": 1e-5, **dp},
                             "secureAggregation": {"enabled": True, "neighbours": "complete", "threshold": 0.6}}},
    })


def test_a_restarted_ledger_continues_the_spend(tmp_path: Path) -> None:
    fed = _federation("client")
    people = ["a/p1", "a/p2", "a/p3"]
    first = PrivacyLedger(fed, people, tmp_path)
    first.setup(dimension=100, train_rows={})
    first.record("1@1", people)
    first.record("2@1", people)
    spent = first.spent()
    # A new aggregator process (incarnation 2) reads the ledger back: nothing forgotten...
    second = PrivacyLedger(fed, people, tmp_path)
    second.setup(dimension=100, train_rows={})
    assert second.spent() == spent and second.accountants["*"].releases == ["1@1", "2@1"]
    # ...and it re-runs round 3 under its own incarnation, then round 4: the budget funded 4 rounds, so the
    # round that was interrupted costs one: round 5 would overspend.
    second.record("3@2", people)
    second.record("4@2", people)
    assert second.spent() <= 1.0
    with pytest.raises(BudgetExhausted):
        second.check_round(people)


def test_a_release_a_participant_showed_mid_round_stops_the_round_before_its_sum_is_seen(tmp_path: Path) -> None:
    """The budget funds 4 releases. Rounds 1 to 3 are counted; then, during round 4, one participant reports the
    update it sent to the crashed aggregator (a release this ledger missed): the budget is now full, so round 4's
    noised sum may not be seen, even though another participant's own ledger still lets it send."""
    fed = _federation("client")
    people = ["a/p1", "a/p2", "a/p3"]
    ledger = PrivacyLedger(fed, people, tmp_path)
    ledger.setup(dimension=100, train_rows={})
    for r in range(1, 4):
        ledger.expose(f"{r}@2")
    assert ledger.expose("3@2") == ledger.spent()  # seeing the same sum again costs nothing
    ledger.check_round(people)  # round 4 is funded when it begins...
    assert ledger.reconcile("a/p1", 4, incarnation=2) == 1
    with pytest.raises(BudgetExhausted):  # ...but not once p1's count is in
        ledger.expose("4@2")
    assert ledger.accountants["*"].releases == ["1@2", "2@2", "3@2", "unseen-4@2"]
    assert ledger.spent() <= 1.0


def test_a_ledger_refuses_state_from_other_settings(tmp_path: Path) -> None:
    people = ["a/p1", "a/p2"]
    PrivacyLedger(_federation("client"), people, tmp_path).setup(dimension=10, train_rows={})
    with pytest.raises(ValueError, match="fresh output folder"):
        PrivacyLedger(_federation("client", noiseMultiplier=50.0), people, tmp_path).setup(dimension=10, train_rows={})
    with pytest.raises(ValueError, match="mode 'client', not 'sample'"):
        PrivacyLedger(_federation("sample"), people, tmp_path).setup(dimension=10, train_rows={"a/p1": 100})


def test_sample_mode_accounts_each_participant_from_its_rows(tmp_path: Path) -> None:
    fed = _federation("sample")
    ledger = PrivacyLedger(fed, ["a/big", "a/small"], tmp_path)
    ledger.setup(dimension=10, train_rows={"a/big": 8000, "a/small": 500})
    for r in range(1, 5):
        ledger.check_round(["a/big", "a/small"])
        ledger.record(f"{r}@1", ["a/big", "a/small"])
    summary = ledger.summary()
    assert summary["epsilon_spent"] <= 1.0
    assert all(math.isclose(p["epsilon_spent"], 1.0, rel_tol=0.01) for p in summary["participants"].values())
    with pytest.raises(BudgetExhausted, match="a/big"):
        ledger.check_round(["a/big"])


def test_delta_above_one_over_records_is_warned(tmp_path: Path) -> None:
    fed = _federation("sample", delta=0.05)
    warnings = PrivacyLedger(fed, ["a/p1", "a/p2"], tmp_path).setup(dimension=10, train_rows={"a/p1": 50, "a/p2": 900})
    assert warnings and "larger than 1/50" in warnings[0] and "guarantee is weak" in warnings[0]


def _swamp_federation(mode: str, rounds: int, **dp: object) -> Federation:
    doc: dict[str, Any] = {
        "metadata": {"name": "f", "namespace": "ns"},
        "spec": {"task": {"target": "y", "features": [{"name": "x", "type": "numeric", "bound": 10.0}]},
                 "training": {"rounds": rounds, "batchSize": 32, "minParticipants": 2},
                 "privacy": {"secureAggregation": {"enabled": True},
                             "differentialPrivacy": {"mode": mode, "epsilon": 1.0, "delta": 1e-5, **dp}}}}
    return Federation.model_validate(doc)


def test_a_plan_whose_noise_drowns_the_run_is_refused_or_named_before_training(tmp_path: Path) -> None:
    """The small-tenant case: tenants of 24 and 100 rows drown in their own DP-SGD noise, a 1,280-row tenant does
    not; pooled DP-SGD over the same rows does not; client-level DP with ten participants does. Above DROWNED the
    plan is refused, with the fix; accepted for an experiment, it is named."""
    d = 4364  # the synthetic task's model
    rows = {"t/a": 24, "t/b": 100, "t/c": 1280}
    refusing = PrivacyLedger(_swamp_federation("sample", 20), ["t/a", "t/b", "t/c"], tmp_path / "r")
    with pytest.raises(ValueError, match=r"refused before training: .*worst t/a: 1\d\.\dx.*mode: pooled.*acceptNoisyPlan"):
        refusing.setup(dimension=d, train_rows=rows)
    sample = PrivacyLedger(_swamp_federation("sample", 20, acceptNoisyPlan=True), ["t/a", "t/b", "t/c"], tmp_path / "s")
    (warning,) = [w for w in sample.setup(dimension=d, train_rows=rows) if "noise over the whole run" in w]
    assert "at 2 participant(s)" in warning and "worst t/a" in warning and "mode: pooled" in warning
    pooled = PrivacyLedger(_swamp_federation("pooled", 20), ["t/a", "t/b", "t/c"], tmp_path / "p")
    assert not [w for w in pooled.setup(dimension=d, train_rows={}, pooled_rows=2668) if "whole run" in w]
    people = [f"t/{i}" for i in range(10)]
    client = PrivacyLedger(_swamp_federation("client", 50), people, tmp_path / "c")
    with pytest.raises(ValueError, match="add participants"):
        client.setup(dimension=d, train_rows={})
    # Between SWAMPED and DROWNED: named, not refused (50 participants, a 667-parameter model, 20 rounds).
    many = PrivacyLedger(_swamp_federation("client", 20), [f"t/{i}" for i in range(50)], tmp_path / "m")
    (named,) = [w for w in many.setup(dimension=667, train_rows={}) if "whole run" in w]
    assert "2.1x" in named and "50 participants' updates per round" in named
    # The papers' scale: 8,000 rows per tenant, 50 rounds, batch 64: DP-SGD that works is not warned about.
    papers = PrivacyLedger(_swamp_federation("sample", 50), ["t/a"], tmp_path / "big")
    assert not [w for w in papers.setup(dimension=d, train_rows={"t/a": 8000}) if "whole run" in w]
