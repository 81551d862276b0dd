"""Secure-aggregation rounds driven in one process with real participant code, for the protocol and attack tests.

Every participant is a real :class:`~fedcrm.secagg.client.SecAggClient` with a
client certificate from a real federation CA (:mod:`fedcrm.pki`); only the
transport is replaced by direct calls, so a test can play the aggregator
honestly (:class:`Round`) or deviate from the protocol at any step.
"""

from __future__ import annotations

import functools
from collections.abc import Mapping

import numpy as np

from fedcrm.pki import CertificateAuthority
from fedcrm.secagg.client import SecAggClient
from fedcrm.secagg.graph import public_seed
from fedcrm.secagg.member_lists import MemberAgreement
from fedcrm.secagg.params import SecAggParams
from fedcrm.secagg.quantization import vector_dtype
from fedcrm.secagg.server import SecAggServer
from fedcrm.secagg.signing import PeerVerifier, Signer

__all__ = [
    "AFTER_ADVERTISE", "AFTER_MASKED_INPUT", "AFTER_SHARE_KEYS", "DROP_STAGES", "DURING_UNMASK", "FEDERATION", "NEVER",
    "Round", "federation_ca", "identity_of", "signer_for", "verifier",
]

# When a participant stops: it never advertises, or it stops right after the named stage (after its masked
# input it neither signs the survivor set nor unmasks), or it computes its unmask reply but the reply never arrives.
NEVER = "never"
AFTER_ADVERTISE = "after_advertise"
AFTER_SHARE_KEYS = "after_share_keys"
AFTER_MASKED_INPUT = "after_masked_input"
DURING_UNMASK = "during_unmask"
DROP_STAGES = (NEVER, AFTER_ADVERTISE, AFTER_SHARE_KEYS, AFTER_MASKED_INPUT, DURING_UNMASK)

FEDERATION = "owner/churn"


@functools.cache
def federation_ca() -> CertificateAuthority:
    """One CA for the test session: issuing certificates is the slow part of setting up a round."""
    return CertificateAuthority.create("secagg-tests")


def identity_of(cid: int) -> str:
    return f"tenant-{cid}/crm"


@functools.cache
def signer_for(identity: str) -> Signer:
    issued = federation_ca().issue_client(identity)
    return Signer.from_pem(issued.cert_pem, issued.key_pem)


@functools.cache
def verifier() -> PeerVerifier:
    """Shared by the participants of a test (its cache only saves re-checking the same certificates)."""
    return PeerVerifier(federation_ca().cert_pem)


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
        round_: int = 1,
        drop: Mapping[int, str] | None = None,
        inputs: Mapping[int, np.ndarray] | None = None,
        signers: Mapping[int, Signer] | None = None,
        agreements: Mapping[int, MemberAgreement] | None = None,
    ) -> None:
        """``signers`` gives some participants another certificate than their identity's from the session CA.
        With ``agreements`` (a settled :class:`MemberAgreement` per participant, keyed by id: the ids are then
        these, not ``n`` made up) each client checks the list against its agreement, and the public seed mixes in
        the agreed salt."""
        rng = np.random.default_rng(seed)
        self.ids = sorted(agreements) if agreements is not None else [3 * i + 2 for i in range(n)]
        self.members = {cid: identity_of(cid) for cid in self.ids}
        self.signers = dict(signers or {})
        self.agreements = dict(agreements or {})
        salts = {a.salt for a in self.agreements.values()}
        assert len(salts) <= 1, "the members' agreements settled on different salts"
        self.public_seed = public_seed(FEDERATION, round_, 1, self.members, salts.pop() or b"" if salts else b"")
        self.params, self.d, self.round_id = params, d, round_id
        dtype = vector_dtype(params.bits)
        self.inputs = dict(inputs) if inputs is not None else {
            cid: rng.integers(0, 2**params.bits, d, dtype=np.uint64).astype(dtype) for cid in self.ids
        }
        self.drop = dict(drop or {})
        self.server = SecAggServer(round_id=round_id, params=params, client_ids=self.ids, vector_length=d,
                                   public_seed=self.public_seed)
        self.clients = {cid: self.client(cid) for cid in self.ids}
        self.seen: dict[int, np.ndarray] = {}
        self.shares_sent: dict[int, dict[int, bytes]] = {}
        self.u1: list[int] = []
        self.u2: list[int] = []

    def client(self, cid: int) -> SecAggClient:
        return SecAggClient(client_id=cid, round_id=self.round_id, params=self.params, vector_length=self.d,
                            signer=self.signers.get(cid) or signer_for(self.members[cid]), verifier=verifier(),
                            members=self.members, public_seed=self.public_seed, agreement=self.agreements.get(cid))

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
                cts = self.clients[cid].share_keys(self.server.roster_for(cid))
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

    def consistency(self, server: SecAggServer | None = None) -> None:
        server = server or self.server
        survivors = server.consistency_request()
        for cid in survivors:
            if self._alive_after(cid, AFTER_MASKED_INPUT):
                server.receive_signature(cid, self.clients[cid].sign_survivors(survivors))
        server.close_consistency()

    def unmask(self, server: SecAggServer | None = None) -> None:
        server = server or self.server
        for cid in server.signers:
            if not self._alive_after(cid, AFTER_MASKED_INPUT) or cid in server.answered:
                continue
            request = server.unmask_request_for(cid)
            reply = self.clients[cid].unmask(survivors=request.survivors, signatures=request.signatures)
            if self._alive_after(cid, DURING_UNMASK):
                server.receive_unmask(cid, reply)

    def run(self) -> np.ndarray:
        self.advertise()
        self.share_keys()
        self.masked_input()
        self.consistency()
        self.unmask()
        return self.server.finish()

    def expected(self, survivors: list[int]) -> np.ndarray:
        total = np.zeros(self.d, dtype=np.uint64)
        for cid in survivors:
            total += self.inputs[cid].astype(np.uint64)
        return (total & np.uint64(2**self.params.bits - 1)).astype(vector_dtype(self.params.bits))
