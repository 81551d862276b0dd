"""Privacy settings are a contract: impossible or meaningless budgets are refused with their path."""

from __future__ import annotations

import numpy as np
import pytest
from test_manifests import FEDERATION, _error, _with

from fedcrm.privacy.audit import attack_metrics
from fedcrm.privacy.plans import survivors_min
from fedcrm.spec import parse_manifest
from fedcrm.spec.manifests import Federation

DP = "spec.privacy.differentialPrivacy"


def _dp(**fields: object) -> dict:
    return _with(FEDERATION, "spec.privacy", {"differentialPrivacy": fields})


@pytest.mark.parametrize(
    ("fields", "expected"),
    [
        ({"mode": "client", "epsilon": 0, "delta": 1e-5}, f"{DP}.epsilon: epsilon must be a positive number (got 0.0)"),
        ({"mode": "client", "epsilon": -1, "delta": 1e-5}, f"{DP}.epsilon: epsilon must be a positive number"),
        ({"mode": "sample", "epsilon": 1, "delta": 0}, f"{DP}.delta: delta must be between 0 and 1, exclusive"),
        ({"mode": "sample", "epsilon": 1, "delta": 1}, f"{DP}.delta: delta must be between 0 and 1, exclusive"),
        ({"mode": "sample", "epsilon": 1, "delta": 1e-5, "clippingNorm": 0}, f"{DP}.clippingNorm: clippingNorm must be"),
        ({"mode": "sample", "epsilon": 1, "delta": 1e-5, "noiseMultiplier": -2}, f"{DP}.noiseMultiplier"),
        ({"mode": "sample"}, f"{DP}: mode 'sample' needs epsilon and delta"),
        ({"mode": "none", "epsilon": 1}, f"{DP}: epsilon only apply with mode 'sample', 'client' or 'pooled'"),
        ({"mode": "client", "epsilon": 1, "delta": 1e-5, "noiseMultiplier": 0.5},
         "cannot fund even one round at noiseMultiplier 0.5"),
        ({"mode": "client", "epsilon": 1, "delta": 1e-5, "clipingNorm": 1}, "unknown field (did you mean 'clippingNorm'?)"),
    ],
)
def test_impossible_settings_are_refused_with_what_to_fix(fields: dict, expected: str) -> None:
    assert expected in _error(_dp(**fields), Federation)


def test_dp_sgd_refuses_fedprox() -> None:
    doc = _with(_dp(mode="sample", epsilon=1, delta=1e-5), "spec.training.algorithm", "fedprox")
    doc["spec"]["training"]["proximalMu"] = 0.1
    assert "mode 'sample' clips per-record gradients" in _error(doc, Federation)


def test_a_valid_budget_parses() -> None:
    fed = parse_manifest(_dp(mode="client", epsilon=1.0, delta=1e-5, clippingNorm=0.5), Federation, "f")
    dp = fed.spec.privacy.differential_privacy
    assert (dp.mode, dp.epsilon, dp.delta, dp.clip, dp.noise_multiplier) == ("client", 1.0, 1e-5, 0.5, None)


def test_survivors_min_follows_the_secure_aggregation_threshold() -> None:
    doc = _dp(mode="client", epsilon=1.0, delta=1e-5)
    doc["spec"]["training"]["minParticipants"] = 2
    doc["spec"]["privacy"]["secureAggregation"] = {"enabled": True, "neighbours": "complete", "threshold": 0.6}
    assert survivors_min(parse_manifest(doc, Federation, "f").spec, 10) == 6
    doc["spec"]["privacy"]["secureAggregation"]["enabled"] = False
    assert survivors_min(parse_manifest(doc, Federation, "f").spec, 10) == 2


def test_attack_metrics_on_known_separations() -> None:
    rng = np.random.default_rng(0)
    same = attack_metrics(rng.normal(size=20_000), rng.normal(size=20_000))
    assert same.auc == pytest.approx(0.5, abs=0.01) and same.tpr_at_1pct_fpr < 0.02
    apart = attack_metrics(np.arange(100) + 1000.0, np.arange(100, dtype=float))
    assert (apart.auc, apart.advantage, apart.tpr_at_1pct_fpr) == (1.0, 1.0, 1.0)
    ties = attack_metrics(np.zeros(10), np.zeros(10))
    assert ties.auc == 0.5 and ties.advantage == 0.0


def test_an_inflated_participant_count_cannot_shrink_a_participants_noise_share() -> None:
    """The aggregator's claimed count sizes client-level noise shares (more participants, less noise each);
    a participant never sizes its share for more than its own Federation's allow-list admits."""
    from fedcrm.privacy.plans import client_noise, noise_participants

    doc = _dp(mode="client", epsilon=1.0, delta=1e-5)
    doc["spec"]["privacy"]["secureAggregation"] = {"enabled": True, "neighbours": "logarithmic", "threshold": 0.6}
    spec = parse_manifest(doc, Federation, "f").spec
    allowed = len(spec.participants.namespaces)
    assert allowed >= 2
    honest = client_noise(spec, participants=noise_participants(spec, allowed), dimension=10)
    inflated = client_noise(spec, participants=noise_participants(spec, 1000), dimension=10)
    believed = client_noise(spec, participants=1000, dimension=10)  # what obeying the aggregator would do
    assert noise_participants(spec, 1000) == allowed and noise_participants(spec, 1) == 1
    assert inflated.survivors_min == honest.survivors_min
    assert believed.survivors_min > honest.survivors_min  # the attack would have cut each share's variance
