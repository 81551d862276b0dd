"""The aggregator's side of the member-list agreement when a member goes silent at one of its three steps.

The participants are real :class:`~fedcrm.secagg.member_lists.MemberAgreement`
objects answering through the node's own :func:`answer_members`; only the task
streams are replaced by a runner of stages that calls them directly and lets
chosen members fall silent at a chosen step (a hung pod: no answer before the
round timeout).
"""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
from fedcrm_aggregator import secure_sums
from fedcrm_aggregator.secure_sums import SecureSums
from fedcrm_node.secure_sums import answer_members
from secagg_harness import FEDERATION, identity_of, signer_for, verifier

from fedcrm.errors import FederationFailed
from fedcrm.protocol import pb
from fedcrm.secagg.member_lists import MemberAgreement
from fedcrm.secagg.server import BelowThreshold
from fedcrm.spec.manifests import SecureAggregation

TERMS = "terms-v1"


class _Session:
    def __init__(self, identity: str) -> None:
        self.identity = identity


class _Runner:
    """Runs each SECAGG_MEMBERS step against the members' agreements; ``silent`` maps an identity to the step
    ("sign", "echo" or "reveal") from which it no longer answers."""

    def __init__(self, out_dir: Path, n: int, silent: dict[str, str], minimum: int = 2) -> None:
        self.expected = [identity_of(cid) for cid in range(n)]
        self.out_dir = out_dir
        self.federation = SimpleNamespace(key=FEDERATION)
        self.spec = SimpleNamespace(training=SimpleNamespace(min_participants=minimum))
        self.silent = silent
        self.events: list[tuple[str, dict[str, Any]]] = []
        self.asked: list[tuple[str, list[str]]] = []
        self.agreements = {
            identity: MemberAgreement(federation=FEDERATION, terms=TERMS, client_id=cid, signer=signer_for(identity),
                                      verifier=verifier(), minimum=minimum)
            for cid, identity in enumerate(self.expected)}
        self.refusals: list[str] = []

    def emit(self, event: str, **fields: Any) -> None:
        self.events.append((event, fields))

    def usable(self) -> list[str]:
        return sorted(self.expected)

    def run_stage(self, kind: int, round_: int, receiver: Any, *, cohort: Any = None, customize: Any = None) -> dict[str, Any]:
        assert kind == pb.Task.SECAGG_MEMBERS
        results: dict[str, Any] = {}
        step = None
        for identity in sorted(cohort):
            task = pb.Task(kind=kind, round=round_)
            customize(_Session(identity), task)
            step = "reveal" if task.secagg.member_echoes else "echo" if task.secagg.member_signatures else "sign"
            if _STEPS.index(step) >= _STEPS.index(self.silent.get(identity, "never")):
                continue
            try:
                answer = answer_members(self.agreements[identity], task)
            except ValueError as err:  # the node would exit
                self.refusals.append(f"{identity}: {err}")
                continue
            results[identity] = receiver(identity, answer)
        self.asked.append((step or "", sorted(cohort)))
        return results


_STEPS = ("sign", "echo", "reveal", "never")


@pytest.fixture(autouse=True)
def _fixed_terms(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(secure_sums, "terms_digest", lambda spec: TERMS)


def _sums(runner: _Runner) -> SecureSums:
    return SecureSums(runner, SecureAggregation(enabled=True), "incarnation-1")  # type: ignore[arg-type]


def _settled(runner: _Runner, sums: SecureSums, cids: range) -> set[bytes]:
    """Each member's salt from the reveals its first secure sum brings (as SecureContribution settles it)."""
    return {runner.agreements[identity_of(cid)].settle(sums.member_reveals) for cid in cids}


@pytest.mark.parametrize("step", ["sign", "echo"])
def test_a_member_silent_before_anyone_revealed_is_left_out_and_the_others_agree(tmp_path: Path, step: str) -> None:
    runner = _Runner(tmp_path, 4, {identity_of(3): step})
    sums = _sums(runner)
    salt = sums._agree(1)
    others = {cid: identity_of(cid) for cid in range(3)}
    assert sums.member_ids == [0, 1, 2]
    assert _settled(runner, sums, range(3)) == {salt}
    assert all(runner.agreements[i].agreed == others for i in others.values())
    assert not runner.agreements[identity_of(3)].bound
    assert not runner.refusals
    assert ("secagg_members_restarted", {"left_out": [identity_of(3)], "step": {"sign": "signature over the member list",
            "echo": "signature over the transcript"}[step], "members": 3}) in runner.events
    # A restarted aggregator serves the smaller list and its salt.
    assert _sums(runner).salt == salt


def test_a_member_silent_at_the_reveal_stalls_the_agreement_and_is_named(tmp_path: Path) -> None:
    runner = _Runner(tmp_path, 4, {identity_of(3): "reveal"})
    sums = _sums(runner)
    with pytest.raises(BelowThreshold, match=f"no revealed bytes from {identity_of(3)}, which stalled the agreement"):
        sums._agree(1)
    assert sums.member_ids == [0, 1, 2, 3]  # not left out: the others revealed and are bound to this list
    assert all(runner.agreements[identity_of(cid)].bound for cid in range(3))
    # Tried again (the coordinator's next attempt), it asks the silent member only; if it is back, the list settles.
    runner.silent = {}
    salt = sums._agree(1)
    assert runner.asked[-1] == ("reveal", [identity_of(3)])
    assert _settled(runner, sums, range(4)) == {salt}


def test_left_out_below_min_participants_fails_the_federation(tmp_path: Path) -> None:
    runner = _Runner(tmp_path, 3, {identity_of(1): "sign", identity_of(2): "echo"}, minimum=2)
    with pytest.raises(FederationFailed, match="minParticipants is 2"):
        _sums(runner)._agree(1)


def test_members_silent_one_after_another_are_each_left_out(tmp_path: Path) -> None:
    runner = _Runner(tmp_path, 6, {identity_of(5): "sign", identity_of(4): "echo"})
    sums = _sums(runner)
    salt = sums._agree(1)
    assert sums.member_ids == [0, 1, 2, 3]
    assert [e for e, _ in runner.events].count("secagg_members_restarted") == 2
    assert _settled(runner, sums, range(4)) == {salt}
