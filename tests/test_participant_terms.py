"""A participant enforces its own Federation terms, never the aggregator's word.

Each test plays a deviating aggregator against real participant processes
(``python -m fedcrm_node``, mutual TLS, their own copy of the Federation) and
checks that the attack fails: nothing weaker than the participant's own terms
is trained or sent.

- an aggregator that serves weaker terms outright (secure aggregation off);
- an aggregator that announces the agreed terms, then asks for unmasked statistics or updates;
- an aggregator that announces the agreed terms, then runs more rounds than the
  privacy budget was planned for.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml
from inprocess_aggregator import aggregators, finish, identities, start_nodes

from fedcrm.cli.launcher import load_federation_inputs, run_federation
from fedcrm.data.synthetic import SynthResult
from fedcrm.exit_codes import NodeExitCode
from fedcrm.spec.loading import load_federation
from fedcrm.spec.terms import terms_differences, terms_digest

pytestmark = pytest.mark.slow


def _edited(source: Path, out: Path, change: Any) -> Path:
    doc = yaml.safe_load(source.read_text())
    change(doc["spec"])
    out.write_text(yaml.safe_dump(doc, sort_keys=False))
    return out


def _secure(spec: dict[str, Any]) -> None:
    spec.setdefault("privacy", {})["secureAggregation"] = {"enabled": True, "threshold": 0.6}


class _Silent:
    """A progress sink: these tests read the report and the logs."""

    def feed_events(self, path: Path, offset: int) -> int:
        return offset

    def __getattr__(self, name: str) -> Any:
        return lambda *args, **kwargs: None


def test_terms_differences_name_every_weakened_field(small_federation: SynthResult, tmp_path: Path) -> None:
    own_path = _edited(small_federation.federation_path, tmp_path / "own.yaml", _secure)
    own = load_federation(own_path)

    def weaken(spec: dict[str, Any]) -> None:
        spec["privacy"]["secureAggregation"]["enabled"] = False
        spec["training"]["rounds"] = own.spec.training.rounds + 5
        spec["participants"]["namespaces"].append("elsewhere")  # not a term: who joins is the coordinator's

    weak = load_federation(_edited(own_path, tmp_path / "weak.yaml", weaken)).spec
    assert terms_differences(own.spec, weak) == [
        "spec.privacy.secureAggregation.enabled: own true, served false",
        f"spec.training.rounds: own {own.spec.training.rounds}, served {own.spec.training.rounds + 5}",
    ]
    assert terms_differences(own.spec, load_federation(own_path).spec) == []
    assert terms_digest(own.spec) != terms_digest(weak)


def test_an_aggregator_serving_weaker_terms_gets_nothing(small_federation: SynthResult, tmp_path: Path) -> None:
    """The aggregator runs with secure aggregation off; each participant's own manifest requires it."""
    own = _edited(small_federation.federation_path, tmp_path / "own.yaml", _secure)
    weak = _edited(own, tmp_path / "weak.yaml", lambda s: s["privacy"]["secureAggregation"].update(enabled=False))
    served = load_federation_inputs(weak, small_federation.participant_paths)
    inputs = dataclasses.replace(served, federation_path=own)  # the participants keep their own copy
    result = run_federation(inputs, tmp_path / "out", test_data=None, progress=_Silent())

    assert result.report["status"] == "failed" and result.report["rounds_completed"] == 0
    events = (tmp_path / "out" / "events.jsonl").read_text()
    assert '"event": "statistics"' not in events  # not even the statistics vector left a participant
    for p in result.report["participants"]:
        assert p["identity"] in result.crashed, result.crashed
        assert result.crashed[p["identity"]].startswith(f"exit code {int(NodeExitCode.TERMS_REFUSED)}")
    log = next((tmp_path / "out" / "logs").glob("tenant-01*.log")).read_text()
    assert "spec.privacy.secureAggregation.enabled: own true, served false" in log


# --------------------------------------------------------------------------- an aggregator that lies after WELCOME


@pytest.fixture()
def lying_aggregator(tmp_path: Path) -> Iterator[Any]:
    """Start an in-process aggregator that announces ``announced`` but runs ``actual``; yield a starter."""
    with aggregators(tmp_path) as start:
        yield start


def test_an_aggregator_that_asks_for_unmasked_updates_gets_none(small_federation: SynthResult, tmp_path: Path,
                                                                lying_aggregator: Any) -> None:
    own_path = _edited(small_federation.federation_path, tmp_path / "own.yaml", _secure)
    own = load_federation(own_path)
    actual = load_federation(_edited(own_path, tmp_path / "actual.yaml",
                                     lambda s: s["privacy"]["secureAggregation"].update(enabled=False)))
    coordinator, port, ca = lying_aggregator(own, actual, identities(small_federation))
    results = finish(start_nodes(small_federation, own_path, port, ca, tmp_path))

    assert coordinator.plain_fits == []  # the spy on the aggregator's receiver of plain updates saw nothing
    assert coordinator.statistics_received == []  # nor did it get any statistics: they come first, and are refused
    for code, log in results:
        assert code == NodeExitCode.TERMS_REFUSED, log[-2000:]
        assert "an unmasked statistics result was asked for, but this participant's Federation requires secure " \
               "aggregation" in log


def _two_private_rounds(spec: dict[str, Any]) -> None:
    """Secure aggregation and DP-SGD with a budget planned for two releases."""
    _secure(spec)
    spec["training"]["rounds"] = 2
    spec["privacy"]["differentialPrivacy"] = {"mode": "sample", "epsilon": 8, "delta": 1e-5}


def test_an_aggregator_running_more_rounds_than_the_budget_planned_is_refused(
        small_federation: SynthResult, tmp_path: Path, lying_aggregator: Any) -> None:
    own_path = _edited(small_federation.federation_path, tmp_path / "own.yaml", _two_private_rounds)
    own = load_federation(own_path)
    # Two more releases than each participant's epsilon was planned for.
    actual = load_federation(_edited(own_path, tmp_path / "actual.yaml", lambda s: s["training"].update(rounds=4)))
    coordinator, port, ca = lying_aggregator(own, actual, identities(small_federation))
    results = finish(start_nodes(small_federation, own_path, port, ca, tmp_path))

    assert len(coordinator.history) == 2  # the planned rounds completed; the third was never trained
    for code, log in results:
        assert code == NodeExitCode.TERMS_REFUSED, log[-2000:]
        assert "round 3: this participant has already released 2 training results" in log
        assert "trained on" in log and log.count("trained on") == 2


def test_client_level_noise_is_never_released_from_fewer_than_t_min_participants(
        small_federation: SynthResult, tmp_path: Path, lying_aggregator: Any) -> None:
    """Five participants planned (t_min = 4 at threshold 0.8), three show up: their sum would carry 3/4 of the
    noise the epsilon assumes. No unmasking share is ever asked for: the member list agreed before the first secure
    sum holds the three that came, so the aggregator's own t_min check stops the round before unmasking (and with
    this complete graph each participant would refuse to unmask it too)."""
    def planned_five(spec: dict[str, Any]) -> None:
        spec["participants"]["namespaces"] += ["tenant-98", "tenant-99"]  # two tenants that never come
        spec["training"].update(rounds=2, minParticipants=2, roundTimeoutSeconds=20)  # node processes import torch first
        spec["privacy"] = {"differentialPrivacy": {"mode": "client", "epsilon": 4, "delta": 1e-5, "acceptNoisyPlan": True},
                           "secureAggregation": {"enabled": True, "threshold": 0.8, "neighbours": "complete"}}

    own_path = _edited(small_federation.federation_path, tmp_path / "own.yaml", planned_five)
    own = load_federation(own_path)
    expected = identities(small_federation) + ["tenant-98/absent", "tenant-99/absent"]
    coordinator, port, ca = lying_aggregator(own, own, expected)  # an honest aggregator this time
    results = finish(start_nodes(small_federation, own_path, port, ca, tmp_path))

    assert coordinator.history == []  # no round's sum was released
    events = (tmp_path / "aggregator" / "events.jsonl").read_text()
    assert ("only 3 noised updates survived" in events and "t_min = 4" in events) or (
        "stage advertise: participant 0 has 3 holders, 4 needed" in events)
    assert all(code == NodeExitCode.STOPPED for code, _ in results), [log[-500:] for _, log in results]


def test_a_restarted_participant_keeps_its_count_of_releases(small_federation: SynthResult, tmp_path: Path) -> None:
    """The planned releases are spent in a first run; a second one (an aggregator that lost its checkpoint, or lies
    about it) finds every participant refusing before it trains: the count was kept in --state-dir."""
    own_path = _edited(small_federation.federation_path, tmp_path / "own.yaml", _two_private_rounds)
    own = load_federation(own_path)
    states = [tmp_path / f"state-{i}" for i in range(len(small_federation.participant_paths))]
    for state in states:
        state.mkdir()
    extra = [["--state-dir", str(state)] for state in states]
    runs = []
    for attempt in ("first", "again"):
        (tmp_path / attempt).mkdir()
        with aggregators(tmp_path / attempt) as start:
            coordinator, port, ca = start(own, own, identities(small_federation))
            runs.append((coordinator, finish(start_nodes(small_federation, own_path, port, ca, tmp_path / attempt,
                                                         extra=extra))))
    (first, first_results), (again, again_results) = runs
    assert len(first.history) == 2 and all(code == NodeExitCode.SUCCEEDED for code, _ in first_results)
    for state in states:
        [ledger] = state.glob("releases-*.json")
        assert json.loads(ledger.read_text())["releases"] == 2
    assert again.history == []  # nothing trained again
    for code, log in again_results:
        assert code == NodeExitCode.TERMS_REFUSED, log[-2000:]
        assert "privacy releases already counted" in log
        assert "round 1: this participant has already released 2 training results" in log
        assert "trained on" not in log


def test_the_release_count_is_kept_per_terms_and_never_guessed(tmp_path: Path) -> None:
    from fedcrm_node.release_ledger import ReleaseLedger

    from fedcrm.errors import ManifestError

    ledger = ReleaseLedger(tmp_path, federation="coord/churn", terms="a" * 64)
    ledger.record()
    ledger.record()
    assert ReleaseLedger(tmp_path, federation="coord/churn", terms="a" * 64).count == 2  # a restart continues
    assert ReleaseLedger(tmp_path, federation="coord/churn", terms="b" * 64).count == 0  # re-consented terms: anew
    assert ReleaseLedger(None, federation="coord/churn", terms="a" * 64).durable is False
    ledger.path.write_text("{not json")  # type: ignore[union-attr]
    with pytest.raises(ManifestError, match="unreadable"):
        ReleaseLedger(tmp_path, federation="coord/churn", terms="a" * 64)
    with pytest.raises(ManifestError, match="not a directory"):
        ReleaseLedger(tmp_path / "missing", federation="coord/churn", terms="a" * 64)
