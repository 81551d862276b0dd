"""Whole secure-aggregation rounds in one process.

Exact sums under dropouts, refusals, checkpoints, and what the aggregator sees.
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

# When a participant stops: it never advertises, or it stops right after the named stage,
# or it computes its unmask reply but the reply never arrives.
NEVER = "never"
AFTER_ADVERTISE = "after_advertise"
AFTER_SHARE_KEYS = "after_share_keys"
AFTER_MASKED_INPUT = "after_masked_input"
DURING_UNMASK = "during_unmask"
DROP_STAGES = (NEVER, AFTER_ADVERTISE, AFTER_SHARE_KEYS, AFTER_MASKED_INPUT, DURING_UNMASK)


class Round:
    """One round driven step by step, with dropouts injected.

    Ids are sparse (2, 5, 8, ...) so that an id is never confused with an index.
    """

    def __init__(
        self,
        n: int,
        d: int,
        params: SecAggParams,
        *,
        seed: int = 0,
        round_id: int = 5,
        drop: Mapping[int, str] | None = None,
        inputs: Mapping[int, np.ndarray] | None = None,
    ) -> None:
        rng = np.random.default_rng(seed)
        self.ids = [3 * i + 2 for i in range(n)]
        self.params, self.d, self.round_id = params, d, round_id
        dtype = vector_dtype(params.bits)
        self.inputs = dict(inputs) if inputs is not None else {
            cid: rng.integers(0, 2**params.bits, d, dtype=np.uint64).astype(dtype) for cid in self.ids
        }
        self.drop = dict(drop or {})
        self.server = SecAggServer(round_id=round_id, params=params, client_ids=self.ids, vector_length=d)
        self.clients = {
            cid: SecAggClient(client_id=cid, round_id=round_id, params=params, vector_length=d) for cid in self.ids
        }
        self.seen: dict[int, np.ndarray] = {}
        self.shares_sent: dict[int, dict[int, bytes]] = {}
        self.u1: list[int] = []
        self.u2: list[int] = []

    def _alive_after(self, cid: int, stage: str) -> bool:
        stop = self.drop.get(cid)
        return stop is None or DROP_STAGES.index(stop) > DROP_STAGES.index(stage)

    def advertise(self) -> None:
        for cid in self.ids:
            if self._alive_after(cid, NEVER):
                self.server.receive_keys(cid, self.clients[cid].advertise_keys())
                self.u1.append(cid)
        self.server.close_advertise()

    def share_keys(self) -> None:
        for cid in self.u1:
            if self._alive_after(cid, AFTER_ADVERTISE):
                cts = self.clients[cid].share_keys(self.server.roster_for(cid), self.server.neighbours_of(cid))
                self.shares_sent[cid] = cts
                self.server.receive_shares(cid, cts)
                self.u2.append(cid)
        self.server.close_share_keys()

    def masked_input(self, *, only: list[int] | None = None, close: bool = True) -> tuple[list[int], list[int]] | None:
        for cid in only if only is not None else self.u2:
            if self._alive_after(cid, AFTER_SHARE_KEYS) and cid not in self.seen:
                masked = self.clients[cid].masked_input(self.server.inbox_for(cid), self.inputs[cid])
                self.seen[cid] = masked.copy()
                self.server.receive_masked(cid, masked)
        return self.server.close_masked_input() if close else None

    def unmask(self, server: SecAggServer | None = None) -> None:
        server = server or self.server
        for cid in server.survivors:
            if not self._alive_after(cid, AFTER_MASKED_INPUT):
                continue
            dropped, survivors = server.unmask_request_for(cid)
            reply = self.clients[cid].unmask(dropped=dropped, survivors=survivors)
            if self._alive_after(cid, DURING_UNMASK):
                server.receive_unmask(cid, reply)

    def run(self) -> np.ndarray:
        self.advertise()
        self.share_keys()
        self.masked_input()
        self.unmask()
        return self.server.finish()

    def expected(self, survivors: list[int]) -> np.ndarray:
        total = np.zeros(self.d, dtype=np.uint64)
        for cid in survivors:
            total += self.inputs[cid].astype(np.uint64)
        return (total & np.uint64(2**self.params.bits - 1)).astype(vector_dtype(self.params.bits))


def should_finish(r: Round, graph: Mapping[int, tuple[int, ...]] | None) -> bool:
    """The oracle, from the protocol's definition: can every needed secret get its threshold of shares?"""
    alive = lambda stage: {c for c in r.ids if r._alive_after(c, stage)}  # noqa: E731
    if graph is None:
        return False
    t = {c: r.params.shares_needed(len(graph[c])) for c in graph}
    u2, u3 = alive(AFTER_ADVERTISE), alive(AFTER_SHARE_KEYS)
    replied = alive(DURING_UNMASK)
    if len(u2) < 2 or not u3:
        return False
    if any(len(set(graph[c]) & u2) + 1 < t[c] for c in u2):
        return False
    for c in u3:  # self-masks of survivors, rebuilt from the survivors (itself included) that replied
        if len(set(graph[c]) & u3) + 1 < t[c] or len((set(graph[c]) | {c}) & replied) < t[c]:
            return False
    for c in u2 - u3:  # mask keys of dropped participants
        if len(set(graph[c]) & u3) < t[c] or len(set(graph[c]) & replied) < t[c]:
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
    threshold=st.sampled_from([0.2, 0.5, 0.51, 0.67, 0.9, 1.0]),
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

    r = Round(5, 4, SecAggParams(threshold=0.5), drop={c: NEVER for c in (2, 5, 8, 11)})
    with pytest.raises(BelowThreshold, match="stage advertise: 1 participant"):
        r.advertise()

    # Late dropouts: the unmask replies of too many survivors never arrive; finish can be retried, never partial.
    r = Round(5, 4, SecAggParams(threshold=0.8), drop={c: DURING_UNMASK for c in (2, 5)})
    r.advertise()
    r.share_keys()
    r.masked_input()
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
    return r


def test_client_refuses_to_reveal_both_shares_of_one_participant() -> None:
    r = _at_unmask()
    client = r.clients[5]
    with pytest.raises(ProtocolViolation, match="both dropped and surviving"):
        client.unmask(dropped=[8], survivors=[5, 8])
    # A refusal is final: the aggregator does not get to ask again with another question.
    with pytest.raises(ProtocolViolation, match="cannot reveal shares"):
        client.unmask(dropped=[], survivors=[5])


def test_client_answers_once_and_only_about_its_neighbourhood() -> None:
    r = _at_unmask()
    dropped, survivors = r.server.unmask_request_for(5)
    assert dropped == [2]
    reply = r.clients[5].unmask(dropped=dropped, survivors=survivors)
    assert set(reply.key_shares) == {2} and set(reply.self_mask_shares) == set(survivors)
    assert not set(reply.key_shares) & set(reply.self_mask_shares)
    with pytest.raises(ProtocolViolation, match="cannot reveal shares"):
        r.clients[5].unmask(dropped=dropped, survivors=survivors)

    r = _at_unmask(10, neighbours=2)
    me = r.ids[-1]
    strangers = [c for c in r.ids if c != me and c not in r.server.neighbours_of(me)]
    with pytest.raises(ProtocolViolation, match="holds no shares"):
        r.clients[me].unmask(dropped=[], survivors=[me, strangers[0]])
    other = r.ids[-2]
    with pytest.raises(ProtocolViolation, match="listed as dropped"):
        r.clients[other].unmask(dropped=[other], survivors=[])


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
        r.clients[2].unmask(dropped=[], survivors=[2])
    cts = r.clients[2].share_keys(r.server.roster_for(2), r.server.neighbours_of(2))
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
        r.clients[2].share_keys(reflected, r.server.neighbours_of(2))
    with pytest.raises(ProtocolViolation, match="no advertised keys"):
        Round(4, 8, SecAggParams()).clients[2].share_keys({}, [5])


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


@pytest.mark.parametrize("at", ["advertise", "share_keys", "masked_input", "mid_masked_input", "unmask", "mid_unmask"])
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
    if at == "unmask":
        restore()
    if at == "mid_unmask":
        first = r.server.survivors[0]
        dq, sq = r.server.unmask_request_for(first)
        r.server.receive_unmask(first, r.clients[first].unmask(dropped=dq, survivors=sq))
        restore()
        r.drop[first] = AFTER_MASKED_INPUT  # already answered before the restart
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
    restored = SecAggServer.restore(r.server.checkpoint())
    assert restored.stage == "unmask" and restored.survivors == r.server.survivors
    assert restored.dropped == r.server.dropped == [8]
    for cid in r.server.survivors:  # each client answers once; both servers get the same reply
        request = r.server.unmask_request_for(cid)
        assert restored.unmask_request_for(cid) == request
        reply = r.clients[cid].unmask(dropped=request[0], survivors=request[1])
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
    r = Round(n, d, SecAggParams(threshold=0.5, neighbours=4, bits=32), inputs=inputs, drop={11: AFTER_SHARE_KEYS})
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
