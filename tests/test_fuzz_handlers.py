"""Hostile bytes at every door: the aggregator's receivers, both sides of the secure-sum stage machines, the member list.

Whatever a participant (or, for the client, an aggregator) sends, the handlers may refuse it only with the
protocol's own errors — ValueError (and its ProtocolViolation) for a bad message, BelowThreshold when too few are
left — which the round loop turns into a dropped participant or an abandoned round. Anything else (IndexError,
KeyError, TypeError, OverflowError, a numpy error) would be a crash of the handler, and is a failure here.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from secagg_harness import AFTER_ADVERTISE, FEDERATION, Round, identity_of, signer_for, verifier

from fedcrm.protocol import pb
from fedcrm.secagg.client import AdvertisedKeys, SecAggClient, UnmaskReply
from fedcrm.secagg.member_lists import MemberAgreement
from fedcrm.secagg.params import SecAggParams
from fedcrm.secagg.server import BelowThreshold
from fedcrm.spec.loading import load_federation

ALLOWED = (ValueError, BelowThreshold)
FUZZ = settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture,
                                                                          HealthCheck.too_slow])

ids = st.integers(-3, 40)
blobs = st.binary(max_size=96)
vectors = st.builds(
    lambda dtype, length, data: pb.Vector(dtype=dtype, length=length, data=data),
    st.integers(0, 12), st.integers(0, 2**31), st.binary(max_size=256))


def _calls_allowed(fn: Any, *args: Any, **kwargs: Any) -> None:
    try:
        fn(*args, **kwargs)
    except ALLOWED:
        pass


# --------------------------------------------------------------------------- the aggregator's receivers


@pytest.fixture(scope="module")
def coordinator(small_federation: Any, tmp_path_factory: pytest.TempPathFactory) -> Any:
    """A coordinator past its statistics: every receiver has the layouts it checks against."""
    from fedcrm_aggregator.coordinator import Coordinator

    from fedcrm.data.loaders import load_participant_data
    from fedcrm.models.layout import ModelLayout
    from fedcrm.spec.loading import load_participant

    federation = load_federation(small_federation.federation_path)
    c = Coordinator(federation, ["tenant-a/crm"], tmp_path_factory.mktemp("fuzz-aggregator"))
    path = small_federation.participant_paths[0]
    frame = load_participant_data(load_participant(path), federation.spec.task, base_dir=path.parent).frame
    c.preprocessing = c.stats_layout.preprocessing(c.stats_layout.local(frame))
    c.layout = ModelLayout.build(federation.spec.model, c.preprocessing)
    yield c
    c.close()


@FUZZ
@given(statistics=vectors, counts=vectors, delta=vectors, examples=st.floats(allow_nan=True), loss=st.floats())
def test_the_aggregators_receivers_refuse_any_result_with_a_protocol_error(
        coordinator: Any, statistics: pb.Vector, counts: pb.Vector, delta: pb.Vector, examples: float,
        loss: float) -> None:
    _calls_allowed(coordinator._receive_statistics, "tenant-a/crm", pb.StatisticsResult(round=0, statistics=statistics))
    _calls_allowed(coordinator._receive_plain_evaluation, "tenant-a/crm", pb.EvaluationResult(round=1, counts=counts))
    _calls_allowed(coordinator._receive_plain_fit, "tenant-a/crm",
                   pb.FitResult(round=1, delta=delta, examples=examples, loss_sum=loss))


@FUZZ
@given(data=st.binary(max_size=512))
def test_undecodable_bytes_never_reach_a_receiver_as_anything_but_an_error(coordinator: Any, data: bytes) -> None:
    """gRPC hands the servicer whatever parses; what parses from random bytes must still be refused cleanly."""
    for message_type, receiver in ((pb.StatisticsResult, coordinator._receive_statistics),
                                   (pb.FitResult, coordinator._receive_plain_fit),
                                   (pb.EvaluationResult, coordinator._receive_plain_evaluation)):
        try:
            message = message_type.FromString(data)
        except Exception:  # noqa: BLE001 - gRPC's deserializer fails the call before any handler runs
            continue
        _calls_allowed(receiver, "tenant-a/crm", message)


# --------------------------------------------------------------------------- the secure sum, server side

PARAMS = SecAggParams(threshold=0.6, neighbours="complete", bits=32)


@FUZZ
@given(shares=st.dictionaries(ids, blobs, max_size=6), masked_len=st.integers(0, 12),
       masked_dtype=st.sampled_from([np.uint32, np.uint64, np.float64, np.int8]), signature=blobs,
       self_shares=st.dictionaries(ids, blobs, max_size=6), key_shares=st.dictionaries(ids, blobs, max_size=6),
       who=st.sampled_from([2, 5, 8, 11, 14, 99, -1]))
def test_the_server_stage_machine_refuses_garbage_at_every_stage(
        shares: dict[int, bytes], masked_len: int, masked_dtype: Any, signature: bytes,
        self_shares: dict[int, bytes], key_shares: dict[int, bytes], who: int) -> None:
    """One member (or a stranger) sends garbage at each stage, in or out of turn; the others follow the protocol.
    The round ends in a sum or in BelowThreshold / ProtocolViolation, never in another exception."""
    r = Round(5, 8, PARAMS, drop={who: AFTER_ADVERTISE} if who in (2, 5, 8, 11, 14) else {})
    server = r.server
    garbage = {
        "shares": lambda: server.receive_shares(who, shares),
        "masked": lambda: server.receive_masked(who, np.zeros(masked_len, dtype=masked_dtype)),
        "signature": lambda: server.receive_signature(who, signature),
        "unmask": lambda: server.receive_unmask(who, UnmaskReply(self_mask_shares=self_shares, key_shares=key_shares)),
    }
    try:
        r.advertise()
        for send in garbage.values():
            _calls_allowed(send)  # every kind of message, out of turn
        r.share_keys()
        _calls_allowed(garbage["shares"])
        r.masked_input()
        _calls_allowed(garbage["masked"])
        r.consistency()
        _calls_allowed(garbage["signature"])
        r.unmask()
        _calls_allowed(garbage["unmask"])
        server.finish()
    except ALLOWED:
        pass


# --------------------------------------------------------------------------- the secure sum, participant side


@FUZZ
@given(c_pk=st.binary(min_size=32, max_size=32), s_pk=st.binary(min_size=32, max_size=32), signature=blobs,
       certificate=blobs, holder=ids, inbox=st.dictionaries(ids, blobs, max_size=4),
       survivors=st.lists(ids, max_size=6), signatures=st.dictionaries(ids, blobs, max_size=6))
def test_a_participant_refuses_whatever_an_aggregator_relays_with_a_protocol_error(
        c_pk: bytes, s_pk: bytes, signature: bytes, certificate: bytes, holder: int, inbox: dict[int, bytes],
        survivors: list[int], signatures: dict[int, bytes], tmp_path_factory: Any) -> None:
    r = Round(4, 8, PARAMS)
    r.advertise()
    me = r.ids[0]
    client: SecAggClient = r.clients[me]
    roster = dict(r.server.roster_for(me))
    roster[holder] = AdvertisedKeys(c_pk=c_pk, s_pk=s_pk, signature=signature, certificate=certificate)
    _calls_allowed(client.share_keys, roster)
    if client.stage == "advertise":  # the forged roster was refused: go on with the honest one
        client.share_keys(r.server.roster_for(me))
    _calls_allowed(client.masked_input, inbox, r.inputs[me])
    _calls_allowed(client.sign_survivors, survivors)
    _calls_allowed(client.unmask, survivors=survivors, signatures=signatures)



# --------------------------------------------------------------------------- the member-list agreement, participant side


@FUZZ
@given(names=st.lists(st.sampled_from([identity_of(i) for i in range(6)]) | st.text(max_size=4), max_size=6),
       member_ids=st.lists(st.integers(0, 8), max_size=6),
       signatures=st.dictionaries(st.integers(0, 8), st.tuples(blobs, blobs, blobs), max_size=5),
       echoes=st.dictionaries(st.integers(0, 8), blobs, max_size=5),
       reveals=st.dictionaries(st.integers(0, 8), blobs, max_size=5), honest_first=st.booleans())
def test_the_member_list_agreement_refuses_garbage_with_a_protocol_error(
        names: list[str], member_ids: list[int], signatures: dict[int, tuple[bytes, bytes, bytes]],
        echoes: dict[int, bytes], reveals: dict[int, bytes], honest_first: bool) -> None:
    """An aggregator relays anything in the three SECAGG_MEMBERS steps and the first sum's agreement fields; the
    participant's side answers or refuses with a ProtocolViolation, never another exception."""
    from fedcrm_node.secure_sums import answer_members

    agreement = MemberAgreement(federation=FEDERATION, terms="t", client_id=0, signer=signer_for(identity_of(0)),
                                verifier=verifier(), minimum=2)
    task = pb.Task(kind=pb.Task.SECAGG_MEMBERS, round=1)
    task.secagg.members.extend([identity_of(i) for i in range(3)] if honest_first else names)
    task.secagg.member_ids.extend([0, 1, 2] if honest_first else member_ids)
    _calls_allowed(answer_members, agreement, task)  # step 1: sign
    for cid, (signature, certificate, commitment) in signatures.items():
        task.secagg.member_signatures[cid].CopyFrom(
            pb.MemberSignature(signature=signature, certificate=certificate, commitment=commitment))
    _calls_allowed(answer_members, agreement, task)  # step 2: accept and echo
    for cid, echo in echoes.items():
        task.secagg.member_echoes[cid] = echo
    _calls_allowed(answer_members, agreement, task)  # step 3: check the echoes and reveal
    _calls_allowed(agreement.settle, reveals)
    assert agreement.salt is None  # nothing relayed here was signed by the members it names
