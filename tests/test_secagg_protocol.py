"""Whole secure-aggregation rounds in one process.

Exact sums under dropouts, refusals, checkpoints, and what the aggregator sees. The attacks of an
aggregator that deviates from the protocol are in test_secagg_deviating_aggregator.py.
"""

from __future__ import annotations

import hashlib
from collections.abc import Mapping

import numpy as np
from uniformity import chi_square_p
import pytest
from hypothesis import event, given, settings
from hypothesis import strategies as st

from fedcrm.secagg import crypto
from fedcrm.secagg.client import AdvertisedKeys, ProtocolViolation, SecAggClient
from fedcrm.secagg.params import SecAggParams
from fedcrm.secagg.quantization import choose_scale, dequantize, quantize, vector_dtype
from fedcrm.secagg.server import BelowThreshold, SecAggServer
from secagg_harness import (
    AFTER_ADVERTISE,
    AFTER_MASKED_INPUT,
    AFTER_SHARE_KEYS,
    DROP_STAGES,
    DURING_UNMASK,
    NEVER,
    Round,
)

def should_finish(r: Round, graph: Mapping[int, tuple[int, ...]] | None) -> bool:
    """The oracle, from the protocol's definition: can every needed secret get its threshold of shares?

    ``graph`` is the public graph's neighbourhoods of the participants that advertised (absent members count
    as holders that never answer).
    """
    alive = lambda stage: {c for c in r.ids if r._alive_after(c, stage)}  # noqa: E731
    if graph is None:
        return False
    t = {c: r.params.shares_needed(len(graph[c])) for c in graph}
    u2, u3 = alive(AFTER_ADVERTISE), alive(AFTER_SHARE_KEYS)
    signers, replied = alive(AFTER_MASKED_INPUT), alive(DURING_UNMASK)
    if len(u2) < 2 or not u3:
        return False
    if any(len(set(graph[c]) & u2) + 1 < t[c] for c in u2):
        return False
    for c in u3:  # self-masks of survivors: signed by t of the neighbourhood, rebuilt from those that replied
        whole = set(graph[c]) | {c}
        if len(set(graph[c]) & u3) + 1 < t[c] or len(whole & signers) < t[c] or len(whole & replied) < t[c]:
            return False
    for c in u2 - u3:  # mask keys of dropped participants
        if min(len(set(graph[c]) & u3), len(set(graph[c]) & signers), len(set(graph[c]) & replied)) < t[c]:
            return False
    return True


# The main property ---------------------------------------------------------------

NEIGHBOURS = st.one_of(st.sampled_from(["complete", "logarithmic"]), st.integers(1, 12))
DROP_CHOICE = st.sampled_from([None] * 6 + list(DROP_STAGES))


@settings(max_examples=80, deadline=None)
@given(
    n=st.integers(3, 12),
    d=st.integers(1, 50),
    bits=st.integers(16, 32),
    threshold=st.sampled_from([0.51, 0.6, 0.67, 0.9, 1.0]),
    neighbours=NEIGHBOURS,
    drops=st.lists(DROP_CHOICE, min_size=12, max_size=12),
    seed=st.integers(0, 2**32 - 1),
)
def test_round_sums_survivors_exactly_or_refuses(
    n: int, d: int, bits: int, threshold: float, neighbours: str | int, drops: list, seed: int
) -> None:
    params = SecAggParams(threshold=threshold, neighbours=neighbours, bits=bits)
    ids = [3 * i + 2 for i in range(n)]
    r = Round(n, d, params, seed=seed, drop={cid: s for cid, s in zip(ids, drops) if s is not None})
    total, failure, graph = None, None, None
    try:
        r.advertise()
        graph = {c: r.server.neighbours_of(c) for c in r.u1}
        r.share_keys()
        r.masked_input()
        r.consistency()
        r.unmask()
        total = r.server.finish()
    except BelowThreshold as exc:
        failure = exc
    if should_finish(r, graph):
        event("finished")
        assert failure is None, f"the round should have finished: {failure}"
        survivors = sorted(c for c in ids if r._alive_after(c, AFTER_SHARE_KEYS))
        assert r.server.survivors == survivors
        assert total is not None and total.dtype == vector_dtype(bits)
        assert np.array_equal(total, r.expected(survivors))
        assert r.server.stage == "finished"
    else:
        event(f"refused at {r.server.stage} ({str(failure).split(':')[0].split(', ')[-1] if failure else '?'})")
        assert total is None and failure is not None
        assert "stage" in str(failure) and "needed" in str(failure)
        assert r.server.stage in ("aborted", "unmask")
        with pytest.raises((ProtocolViolation, BelowThreshold)):
            r.server.finish()


def test_a_typical_secagg_plus_round_with_ten_percent_dropout() -> None:
    n = 20
    drop = {3 * i + 2: AFTER_SHARE_KEYS for i in (4, 11)}
    r = Round(n, 1000, SecAggParams(neighbours=4, threshold=0.6), drop=drop, seed=3)
    total = r.run()
    assert r.server.dropped == sorted(drop)
    assert np.array_equal(total, r.expected(r.server.survivors))
    assert all(len(r.server.neighbours_of(c)) == 4 for c in r.ids)


def test_too_many_dropouts_raise_below_threshold_naming_the_stage() -> None:
    r = Round(6, 4, SecAggParams(threshold=1.0), drop={2: AFTER_SHARE_KEYS})
    r.advertise()
    r.share_keys()
    expected = r"stage masked_input: 5 of 6 remained.*dropped 2's mask key has 5 holders left, 6 needed"
    with pytest.raises(BelowThreshold, match=expected):
        r.masked_input()
    assert r.server.stage == "aborted"
    with pytest.raises(ProtocolViolation):
        r.server.receive_masked(5, r.inputs[5])

    r = Round(5, 4, SecAggParams(threshold=0.51), drop={c: NEVER for c in (2, 5, 8, 11)})
    with pytest.raises(BelowThreshold, match="stage advertise: 1 participant"):
        r.advertise()

    # Late dropouts: the unmask replies of too many survivors never arrive; finish can be retried, never partial.
    r = Round(5, 4, SecAggParams(threshold=0.8), drop={c: DURING_UNMASK for c in (2, 5)})
    r.advertise()
    r.share_keys()
    r.masked_input()
    r.consistency()
    r.unmask()
    with pytest.raises(BelowThreshold, match="stage unmask: 3 of 5 survivors answered"):
        r.server.finish()
    assert r.server.stage == "unmask"


# Refusals --------------------------------------------------------------------


def _at_unmask(n: int = 6, **kwargs: object) -> Round:
    r = Round(n, 8, SecAggParams(**kwargs), drop={2: AFTER_SHARE_KEYS})  # type: ignore[arg-type]
    r.advertise()
    r.share_keys()
    r.masked_input()
    r.consistency()
    return r


def test_client_reveals_one_kind_of_share_per_peer_derived_from_the_signed_set() -> None:
    r = _at_unmask()
    request = r.server.unmask_request_for(5)
    reply = r.clients[5].unmask(survivors=request.survivors, signatures=request.signatures)
    assert set(reply.key_shares) == {2} and set(reply.self_mask_shares) == {5, 8, 11, 14, 17}
    assert not set(reply.key_shares) & set(reply.self_mask_shares)
    with pytest.raises(ProtocolViolation, match="cannot reveal shares"):
        r.clients[5].unmask(survivors=request.survivors, signatures=request.signatures)


def test_client_unmasks_only_the_set_it_signed_with_enough_signatures() -> None:
    r = _at_unmask()
    request = r.server.unmask_request_for(8)
    # Another set than the one it signed (2 claimed alive: both of 2's shares would then be out).
    with pytest.raises(ProtocolViolation, match="other than the one this participant signed"):
        r.clients[8].unmask(survivors=sorted([*request.survivors, 2]), signatures=request.signatures)
    # A refusal is final: the aggregator does not get to ask again with another question.
    with pytest.raises(ProtocolViolation, match="cannot reveal shares"):
        r.clients[8].unmask(survivors=request.survivors, signatures=request.signatures)
    request = r.server.unmask_request_for(11)
    few = dict(list(request.signatures.items())[:1])
    with pytest.raises(ProtocolViolation, match="signed the same survivor set"):
        r.clients[11].unmask(survivors=request.survivors, signatures=few)
    request = r.server.unmask_request_for(14)
    forged = {v: sig[:-2] + bytes([sig[-2] ^ 1, sig[-1]]) for v, sig in request.signatures.items()}
    with pytest.raises(ProtocolViolation, match="signed the same survivor set"):
        r.clients[14].unmask(survivors=request.survivors, signatures=forged)


def test_client_signs_one_survivor_set_that_holds_itself() -> None:
    r = Round(5, 8, SecAggParams())
    r.advertise()
    r.share_keys()
    r.masked_input()
    with pytest.raises(ProtocolViolation, match="leaves out this participant"):
        r.clients[2].sign_survivors([5, 8, 11, 14])
    with pytest.raises(ProtocolViolation, match="cannot sign the survivor set"):
        r.clients[2].sign_survivors(r.ids)
    with pytest.raises(ProtocolViolation, match="non-members"):
        r.clients[5].sign_survivors([5, 99])
    assert r.clients[8].sign_survivors(r.ids) != r.clients[11].sign_survivors(r.ids)


def test_out_of_order_calls_are_protocol_violations() -> None:
    r = Round(4, 8, SecAggParams())
    with pytest.raises(ProtocolViolation, match="cannot close the masked-input stage in stage 'advertise'"):
        r.server.close_masked_input()
    with pytest.raises(ProtocolViolation, match="stage"):
        r.server.roster_for(2)
    with pytest.raises(ProtocolViolation, match="cannot send a masked input"):
        r.clients[2].masked_input({}, r.inputs[2])
    with pytest.raises(ProtocolViolation, match="not in this round"):
        r.server.receive_keys(99, r.clients[2].advertise_keys())
    r.advertise()
    with pytest.raises(ProtocolViolation, match="cannot receive keys in stage 'share_keys'"):
        r.server.receive_keys(2, r.clients[2].advertise_keys())
    with pytest.raises(ProtocolViolation, match="cannot reveal shares"):
        r.clients[2].unmask(survivors=[2], signatures={})
    cts = r.clients[2].share_keys(r.server.roster_for(2))
    with pytest.raises(ProtocolViolation, match="must send one ciphertext to each"):
        r.server.receive_shares(2, {v: ct for v, ct in list(cts.items())[1:]})
    r.server.receive_shares(2, cts)
    with pytest.raises(ProtocolViolation, match="already sent"):
        r.server.receive_shares(2, cts)


def test_server_checks_masked_vectors_and_keys() -> None:
    r = Round(4, 8, SecAggParams(bits=20))
    keys = r.clients[2].advertise_keys()
    r.server.receive_keys(2, keys)
    with pytest.raises(ProtocolViolation, match="already in use"):
        r.server.receive_keys(5, AdvertisedKeys(c_pk=keys.s_pk, s_pk=r.clients[5].advertise_keys().s_pk))
    with pytest.raises(ProtocolViolation, match="low-order"):
        r.server.receive_keys(5, AdvertisedKeys(c_pk=bytes(32), s_pk=r.clients[5].advertise_keys().s_pk))
    r = Round(4, 8, SecAggParams(bits=20), drop={11: AFTER_ADVERTISE})
    r.advertise()
    r.share_keys()
    with pytest.raises(ProtocolViolation, match="uint32 vector of length 8"):
        r.server.receive_masked(2, np.zeros(8, dtype=np.int64))
    with pytest.raises(ProtocolViolation, match="uint32 vector of length 8"):
        r.server.receive_masked(2, np.zeros(7, dtype=np.uint32))
    with pytest.raises(ProtocolViolation, match="not in U2"):
        r.server.receive_masked(11, np.zeros(8, dtype=np.uint32))
    with pytest.raises(ValueError, match="quantize"):
        r.clients[2].masked_input(r.server.inbox_for(2), np.zeros(8, dtype=np.float64))


def test_client_refuses_a_roster_with_a_repeated_key() -> None:
    r = Round(4, 8, SecAggParams())
    r.advertise()
    roster = r.server.roster_for(2)
    mine = r.clients[2].advertise_keys()
    reflected = {**roster, 5: AdvertisedKeys(c_pk=mine.c_pk, s_pk=roster[5].s_pk)}
    with pytest.raises(ProtocolViolation, match="advertise the same public key"):
        r.clients[2].share_keys(reflected)
    with pytest.raises(ProtocolViolation, match="at least one neighbour"):
        Round(4, 8, SecAggParams()).clients[2].share_keys({})


def test_tampered_or_misdelivered_ciphertexts_are_rejected() -> None:
    r = Round(5, 8, SecAggParams())
    r.advertise()
    r.share_keys()
    inbox = r.server.inbox_for(2)
    flipped = {**inbox, 5: inbox[5][:-1] + bytes([inbox[5][-1] ^ 1])}
    with pytest.raises(crypto.TamperedCiphertext):
        r.clients[2].masked_input(flipped, r.inputs[2])
    swapped = {**inbox, 5: inbox[8], 8: inbox[5]}  # presented as coming from someone else
    with pytest.raises(crypto.TamperedCiphertext):
        r.clients[2].masked_input(swapped, r.inputs[2])
    redirected = {**inbox, 5: r.shares_sent[5][8]}  # meant for another receiver
    with pytest.raises(crypto.TamperedCiphertext):
        r.clients[2].masked_input(redirected, r.inputs[2])
    with pytest.raises(ProtocolViolation, match="non-neighbours"):
        r.clients[2].masked_input({**inbox, 99: inbox[5]}, r.inputs[2])
    # Nothing was consumed by the refusals: the genuine inbox still works.
    r.clients[2].masked_input(inbox, r.inputs[2])


def test_ciphertexts_from_another_round_are_rejected() -> None:
    old = Round(3, 4, SecAggParams(), round_id=1)
    old.advertise()
    old.share_keys()
    new = Round(3, 4, SecAggParams(), round_id=2)
    new.advertise()
    new.share_keys()
    inbox = new.server.inbox_for(2)
    with pytest.raises(crypto.TamperedCiphertext):
        new.clients[2].masked_input({**inbox, 5: old.shares_sent[5][2]}, new.inputs[2])


# Checkpoints -------------------------------------------------------------------


@pytest.mark.parametrize(
    "at", ["advertise", "share_keys", "masked_input", "mid_masked_input", "consistency", "unmask", "mid_unmask"])
def test_checkpoint_and_restore_at_any_stage_finishes_with_the_same_sum(at: str) -> None:
    r = Round(8, 30, SecAggParams(neighbours=4, bits=24), drop={5: AFTER_SHARE_KEYS, 8: DURING_UNMASK}, seed=9)

    def restore() -> None:
        r.server = SecAggServer.restore(r.server.checkpoint())

    if at == "advertise":
        restore()
    r.advertise()
    if at == "share_keys":
        restore()
    r.share_keys()
    if at == "masked_input":
        restore()
    if at == "mid_masked_input":
        r.masked_input(only=r.u2[:3], close=False)
        restore()
    r.masked_input()
    if at == "consistency":
        restore()
    r.consistency()
    if at == "unmask":
        restore()
    if at == "mid_unmask":
        first = r.server.signers[0]
        request = r.server.unmask_request_for(first)
        r.server.receive_unmask(first, r.clients[first].unmask(survivors=request.survivors,
                                                                signatures=request.signatures))
        restore()
    r.unmask()
    total = r.server.finish()
    assert np.array_equal(total, r.expected(r.server.survivors))
    assert r.server.survivors == [c for c in r.ids if c != 5]


def test_restored_server_refuses_a_second_masked_input() -> None:
    r = Round(6, 16, SecAggParams())
    r.advertise()
    r.share_keys()
    r.masked_input(only=[2, 5], close=False)
    restored = SecAggServer.restore(r.server.checkpoint())
    with pytest.raises(ProtocolViolation, match="already sent its masked input"):
        restored.receive_masked(2, r.seen[2])
    assert restored.survivors == [2, 5]


def test_checkpoint_after_masked_input_then_finish_gives_the_same_sum() -> None:
    r = Round(7, 40, SecAggParams(neighbours="logarithmic", threshold=0.6), drop={8: AFTER_SHARE_KEYS})
    r.advertise()
    r.share_keys()
    r.masked_input()
    r.consistency()
    restored = SecAggServer.restore(r.server.checkpoint())
    assert restored.stage == "unmask" and restored.survivors == r.server.survivors
    assert restored.dropped == r.server.dropped == [8]
    for cid in r.server.signers:  # each client answers once; both servers get the same reply
        request = r.server.unmask_request_for(cid)
        assert restored.unmask_request_for(cid) == request
        reply = r.clients[cid].unmask(survivors=request.survivors, signatures=request.signatures)
        r.server.receive_unmask(cid, reply)
        restored.receive_unmask(cid, reply)
    original = r.server.finish()
    assert np.array_equal(restored.finish(), original)
    assert np.array_equal(original, r.expected(r.server.survivors))


def test_restore_rejects_garbage() -> None:
    with pytest.raises(ValueError, match="checkpoint"):
        SecAggServer.restore(b"not a checkpoint")


# What the aggregator sees ---------------------------------------------------------


def test_what_the_aggregator_sees_is_uniform_but_the_sum_is_right(monkeypatch: pytest.MonkeyPatch) -> None:
    """Every masked vector the aggregator receives passes for uniform noise, even for all-zero or constant inputs."""
    # Fixed key material so the statistical test is deterministic (one run, not a 1% flake across runs).
    counter = iter(range(10**6))
    monkeypatch.setattr(
        crypto,
        "generate_private_key",
        lambda: crypto.private_from_bytes(hashlib.sha256(b"key %d" % next(counter)).digest()),
    )
    monkeypatch.setattr(
        "fedcrm.secagg.client.secrets.token_bytes", lambda n: hashlib.sha256(b"seed %d" % next(counter)).digest()[:n]
    )
    n, d, clip = 10, 20_000, 1.0
    scale = choose_scale(clip=clip, weight_bound=n, bits=32)
    rng = np.random.default_rng(0)
    reals = {3 * i + 2: (np.zeros(d) if i < 3 else rng.normal(0, 0.1, d)) for i in range(n)}
    inputs = {cid: quantize(v, clip=clip, scale=scale, bits=32) for cid, v in reals.items()}
    r = Round(n, d, SecAggParams(threshold=0.6, neighbours=4, bits=32), inputs=inputs, drop={11: AFTER_SHARE_KEYS})
    total = r.run()
    assert len(r.seen) == n - 1
    for cid, masked in r.seen.items():
        top = np.bincount((masked >> np.uint32(24)).astype(np.int64), minlength=256)
        assert chi_square_p(top) > 0.001, f"participant {cid}'s masked vector is not uniform"
        raw_top = np.bincount((inputs[cid] >> np.uint32(24)).astype(np.int64), minlength=256)
        assert chi_square_p(raw_top) < 1e-6  # the unmasked input is anything but uniform
    survivors = r.server.survivors
    assert np.array_equal(total, r.expected(survivors))
    mean = dequantize(total, scale=scale, bits=32)
    np.testing.assert_allclose(mean, sum(np.clip(reals[c], -clip, clip) for c in survivors), atol=0.5 * n / scale)
