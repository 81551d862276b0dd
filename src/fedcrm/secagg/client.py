"""One participant's side of one secure-aggregation round.

The round (Bonawitz et al., CCS 2017, active model; SecAgg+ neighbourhoods of
Bell et al., CCS 2020) has five stages, each a request from the aggregator and
an answer:

1. :meth:`SecAggClient.advertise_keys` -- two fresh X25519 public keys
   (``c`` to receive shares encrypted to this participant, ``s`` to agree
   pairwise mask seeds), signed with the participant's certificate key.
2. :meth:`SecAggClient.share_keys` -- checks every neighbour's signed keys
   against the federation CA, then draws a self-mask seed ``b`` and
   Shamir-shares ``b`` and the private mask key ``s_sk`` among its
   neighbourhood (itself included), each neighbour's pair of shares encrypted
   so that only that neighbour can read it.
3. :meth:`SecAggClient.masked_input` -- the quantized input plus ``PRG(b)``
   plus, for every neighbour ``v`` that completed stage 2, ``+PRG(s_uv)`` if
   ``u < v`` else ``-PRG(s_uv)``. Pairwise masks cancel in the sum; the
   self-mask is what keeps the input hidden even if the aggregator later
   learns ``s_sk_u`` because it (wrongly) claims ``u`` dropped out.
4. :meth:`SecAggClient.sign_survivors` -- the consistency check: signs the
   survivor set it was told, once.
5. :meth:`SecAggClient.unmask` -- only with at least ``t`` valid signatures of
   its own neighbourhood over that same set: for each surviving neighbour a
   share of its ``b``, for each dropped one a share of its ``s_sk``. Both
   lists are derived here from the one signed set, so no peer is ever both.

The aggregator is exactly the party the protocol defends against, so this
participant trusts none of its word: its neighbourhood is recomputed here from
the member list and the public seed (:func:`fedcrm.secagg.graph.public_seed`),
a key is used only with a valid signature from the certificate the member list
names, and anything off the protocol is refused with :class:`ProtocolViolation`.
"""

from __future__ import annotations

import secrets
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np
from cryptography.hazmat.primitives.asymmetric.ec import EllipticCurvePublicKey
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey

from fedcrm.secagg import crypto, shamir, signing
from fedcrm.secagg.graph import neighbourhoods
from fedcrm.secagg.params import SecAggParams
from fedcrm.secagg.quantization import reduce, vector_dtype

if TYPE_CHECKING:  # member_lists builds on this module
    from fedcrm.secagg.member_lists import MemberAgreement

__all__ = [
    "SECRET_BYTES",
    "SHARE_BYTES",
    "SHARE_CIPHERTEXT_BYTES",
    "AdvertisedKeys",
    "ProtocolViolation",
    "SecAggClient",
    "UnmaskReply",
    "members_from",
]

SECRET_BYTES = 32
SHARE_BYTES = shamir.share_length(SECRET_BYTES)
SHARE_CIPHERTEXT_BYTES = crypto.ciphertext_length(2 * SHARE_BYTES)


class ProtocolViolation(ValueError):
    """A message that the protocol does not allow at this point (wrong stage, wrong party, inconsistent content)."""


@dataclass(frozen=True)
class AdvertisedKeys:
    """A participant's two X25519 public keys for one round (32 raw bytes each), signed.

    ``signature`` is the participant's ECDSA signature over
    :func:`~fedcrm.secagg.signing.keys_message`, ``certificate`` its client
    certificate (DER); a participant uses a peer's keys only when both check out.
    """

    c_pk: bytes
    s_pk: bytes
    signature: bytes = b""
    certificate: bytes = b""

    def __post_init__(self) -> None:
        for name in ("c_pk", "s_pk"):
            value = getattr(self, name)
            if not isinstance(value, bytes) or len(value) != crypto.KEY_BYTES:
                raise ProtocolViolation(f"{name} must be {crypto.KEY_BYTES} raw bytes")
        for name in ("signature", "certificate"):
            if not isinstance(getattr(self, name), bytes):
                raise ProtocolViolation(f"{name} must be bytes")


def members_from(members: Mapping[int, str] | Sequence[str]) -> dict[int, str]:
    """The member list as ``{id: identity}``; a sequence gives ids by position. Ids and identities must be unique."""
    table = dict(enumerate(members)) if isinstance(members, Sequence) else dict(members)
    if any(isinstance(c, bool) or not isinstance(c, int) or not (0 <= c < 2**63) for c in table):
        raise ProtocolViolation("member ids must be ints in [0, 2**63)")
    names = list(table.values())
    if any(not isinstance(name, str) or not name for name in names) or len(set(names)) != len(names):
        raise ProtocolViolation("the member list must name each participant once, by a non-empty identity")
    return table


@dataclass(frozen=True)
class UnmaskReply:
    """Shares revealed in stage 4, each keyed by the id of the participant that OWNS the secret."""

    self_mask_shares: dict[int, bytes]
    key_shares: dict[int, bytes]


def _sign_adds(me: int, other: int) -> bool:
    """True when ``me`` adds the pairwise mask it shares with ``other`` (``me < other``), False when it subtracts."""
    return me < other


class SecAggClient:
    """One participant in one round; create a new one every round (keys and seeds are single-use)."""

    def __init__(
        self,
        *,
        client_id: int,
        round_id: int,
        params: SecAggParams,
        vector_length: int,
        signer: signing.Signer,
        verifier: signing.PeerVerifier,
        members: Mapping[int, str] | Sequence[str],
        public_seed: bytes,
        agreement: MemberAgreement | None = None,
    ) -> None:
        """``members`` is the round's whole member list and ``public_seed`` its graph seed.

        This participant's neighbourhood is computed from both here, never
        taken from the aggregator: with them it cannot surround a participant
        with neighbours of its choosing. Raises :class:`ProtocolViolation` when
        the member list does not give this participant's id to its own identity,
        or, with an ``agreement``, when it is not the federation's agreed list
        (:class:`~fedcrm.secagg.member_lists.MemberAgreement`; ``public_seed``
        must then carry its salt). Without one the list is taken as given: a
        round only binds it into the signatures of each neighbourhood, so an
        aggregator can show parts of a sparse graph different lists.
        """
        if isinstance(client_id, bool) or not isinstance(client_id, int) or not (0 <= client_id < 2**63):
            raise ValueError(f"client_id must be an int in [0, 2**63), got {client_id!r}")
        if isinstance(round_id, bool) or not isinstance(round_id, int) or not (0 <= round_id < 2**64):
            raise ValueError(f"round_id must be an int in [0, 2**64), got {round_id!r}")
        if isinstance(vector_length, bool) or not isinstance(vector_length, int) or vector_length < 1:
            raise ValueError(f"vector_length must be a positive int, got {vector_length!r}")
        if not isinstance(public_seed, bytes) or len(public_seed) != 32:
            raise ValueError("public_seed must be 32 bytes (fedcrm.secagg.graph.public_seed)")
        table = members_from(members)
        if table.get(client_id) != signer.identity:
            raise ProtocolViolation(
                f"the member list gives id {client_id} to {table.get(client_id)!r}, but this participant is "
                f"{signer.identity!r}; refusing the round"
            )
        if agreement is not None:
            agreement.check(table)
        self.client_id = client_id
        self.round_id = round_id
        self.params = params
        self.vector_length = vector_length
        self.members = table
        self.public_seed = public_seed
        self._signer = signer
        self._verifier = verifier
        self._dtype = vector_dtype(params.bits)
        graph = neighbourhoods(sorted(table), params.neighbour_count(len(table)), public_seed)
        #: This participant's neighbours as the public graph prescribes (some may never advertise keys).
        self.graph_neighbours: tuple[int, ...] = graph[client_id]
        self._threshold = params.shares_needed(len(self.graph_neighbours)) if self.graph_neighbours else 2
        self._c_sk = crypto.generate_private_key()
        self._s_sk: X25519PrivateKey | None = crypto.generate_private_key()
        c_pk, s_pk = crypto.public_bytes(self._c_sk), crypto.public_bytes(self._s_sk)
        self._keys = AdvertisedKeys(
            c_pk=c_pk, s_pk=s_pk, certificate=signer.certificate,
            signature=signer.sign(signing.keys_message(round_id, public_seed, client_id, c_pk, s_pk)),
        )
        self._stage = "advertise"
        self._neighbours: tuple[int, ...] = ()
        self._peer_keys: dict[int, EllipticCurvePublicKey] = {}  # neighbour id -> its verified certificate key
        self._survivors: tuple[int, ...] = ()
        self._survivors_signature = b""
        self._c_pks: dict[int, bytes] = {}
        self._pair_seeds: dict[int, bytes] = {}
        self._b: bytes | None = None
        self._own_b_share = b""
        self._own_sk_share = b""
        self._held_b: dict[int, bytes] = {}
        self._held_sk: dict[int, bytes] = {}

    @property
    def stage(self) -> str:
        return self._stage

    def _expect(self, stage: str, action: str) -> None:
        if self._stage != stage:
            raise ProtocolViolation(
                f"participant {self.client_id}, round {self.round_id}: cannot {action} in stage {self._stage!r} "
                f"(expected {stage!r})"
            )

    # Stage 1 --------------------------------------------------------------

    def advertise_keys(self) -> AdvertisedKeys:
        """This round's two public keys (asking again before stage 2 returns the same keys)."""
        self._expect("advertise", "advertise keys")
        return self._keys

    # Stage 2 --------------------------------------------------------------

    def share_keys(self, roster: Mapping[int, AdvertisedKeys]) -> dict[int, bytes]:
        """Encrypted shares of this participant's secrets, one ciphertext per neighbour id.

        ``roster`` holds the signed keys of the neighbours that advertised
        theirs (the public graph's neighbours, less those that never did).
        Refused: an entry for anyone who is not a neighbour in the public graph
        (the aggregator does not choose neighbourhoods), a key set whose
        certificate the federation CA did not issue to the identity the member
        list names or whose signature does not verify (a substituted key would
        let the aggregator read the shares or predict the masks), two entries
        with the same key, and fewer neighbours than ``t - 1``.
        """
        self._expect("advertise", "share keys")
        me = self.client_id
        entries = {v: k for v, k in roster.items() if v != me}
        if me in roster and roster[me] != self._keys:
            raise ProtocolViolation("the roster carries keys for this participant that it did not advertise")
        strangers = sorted(set(entries) - set(self.graph_neighbours))
        if strangers:
            raise ProtocolViolation(
                f"the roster offers keys of {strangers}, who are not this participant's neighbours in the public "
                "graph; refusing the roster"
            )
        if not entries:
            raise ProtocolViolation("secure aggregation needs at least one neighbour")
        seen: dict[bytes, int] = {}
        peer_keys: dict[int, EllipticCurvePublicKey] = {}
        for cid, keys in [(me, self._keys), *sorted(entries.items())]:
            if not isinstance(keys, AdvertisedKeys):
                raise ProtocolViolation(f"participant {cid}'s roster entry is not an AdvertisedKeys")
            for key in (keys.c_pk, keys.s_pk):
                if key in seen:
                    raise ProtocolViolation(
                        f"participants {seen[key]} and {cid} advertise the same public key; refusing the roster"
                    )
                seen[key] = cid
            if cid == me:
                continue
            try:
                signer_key = self._verifier.public_key(keys.certificate, self.members[cid])
                self._verifier.verify(
                    signer_key, keys.signature,
                    signing.keys_message(self.round_id, self.public_seed, cid, keys.c_pk, keys.s_pk),
                )
            except signing.UntrustedPeer as exc:
                raise ProtocolViolation(
                    f"participant {cid} ({self.members[cid]}): its advertised keys are not signed by its own "
                    f"certificate ({exc}); refusing the roster"
                ) from None
            peer_keys[cid] = signer_key
        ids = sorted(entries)
        t = self._threshold
        if len(ids) + 1 < t:
            raise ProtocolViolation(f"{len(ids)} neighbours remain, {t - 1} needed")
        self._peer_keys = peer_keys
        roster = entries

        assert self._s_sk is not None
        pair_seeds: dict[int, bytes] = {}
        share_keys: dict[int, bytes] = {}
        for v in ids:
            try:
                share_info = crypto.share_key_info(self.round_id, me, v)
                share_keys[v] = crypto.agree(self._c_sk, roster[v].c_pk, info=share_info)
                pair_seeds[v] = crypto.agree(self._s_sk, roster[v].s_pk, info=crypto.mask_info(self.round_id, me, v))
            except ValueError as exc:
                raise ProtocolViolation(f"participant {v} advertised an unusable public key ({exc})") from None

        b = secrets.token_bytes(SECRET_BYTES)
        s_sk_raw = crypto.private_bytes(self._s_sk)
        xs = [cid + 1 for cid in (*ids, me)]
        b_shares = shamir.split(b, xs=xs, threshold=t)
        sk_shares = shamir.split(s_sk_raw, xs=xs, threshold=t)
        out = {
            v: crypto.encrypt(
                share_keys[v], b_shares[v + 1] + sk_shares[v + 1], aad=crypto.share_aad(self.round_id, me, v)
            )
            for v in ids
        }
        self._neighbours = tuple(sorted(ids))
        self._c_pks = {v: roster[v].c_pk for v in ids}
        self._pair_seeds = pair_seeds
        self._b = b
        self._own_b_share = b_shares[me + 1]
        self._own_sk_share = sk_shares[me + 1]
        self._s_sk = None  # only the pairwise seeds are needed from here on
        self._stage = "share_keys"
        return out

    # Stage 3 --------------------------------------------------------------

    def masked_input(self, inbox: Mapping[int, bytes], quantized: np.ndarray) -> np.ndarray:
        """``y = x + PRG(b) + sum_v ±PRG(s_uv)`` modulo ``2**bits``, over the neighbours that sent shares.

        ``inbox`` maps a neighbour's id to the ciphertext it addressed to this
        participant; a neighbour missing from it dropped out in stage 2 and is
        left out of the pairwise masks. Every ciphertext is authenticated
        before anything is computed (:class:`~fedcrm.secagg.crypto.TamperedCiphertext`).
        """
        self._expect("share_keys", "send a masked input")
        me = self.client_id
        x = np.asarray(quantized)
        if x.dtype != self._dtype or x.shape != (self.vector_length,):
            raise ValueError(
                f"the quantized input must be a {self._dtype} vector of length {self.vector_length}, "
                f"got {x.dtype} of shape {x.shape}; quantize it with fedcrm.secagg.quantization.quantize"
            )
        if self.params.bits < x.dtype.itemsize * 8 and x.size and int(x.max()) >> self.params.bits:
            raise ValueError(f"the quantized input has values of {self.params.bits} bits or more")
        strangers = sorted(set(inbox) - set(self._neighbours))
        if strangers:
            raise ProtocolViolation(f"the inbox holds ciphertexts from non-neighbours {strangers}")
        held_b: dict[int, bytes] = {}
        held_sk: dict[int, bytes] = {}
        for v in sorted(inbox):
            key = crypto.agree(self._c_sk, self._c_pks[v], info=crypto.share_key_info(self.round_id, me, v))
            plain = crypto.decrypt(key, inbox[v], aad=crypto.share_aad(self.round_id, v, me))
            if len(plain) != 2 * SHARE_BYTES:
                raise ProtocolViolation(f"participant {v} sent shares of the wrong size ({len(plain)} bytes)")
            held_b[v], held_sk[v] = plain[:SHARE_BYTES], plain[SHARE_BYTES:]
        if len(held_b) + 1 < self._threshold:
            raise ProtocolViolation(
                f"only {len(held_b)} of {len(self._neighbours)} neighbours shared their keys; "
                f"{self._threshold - 1} needed to continue"
            )
        assert self._b is not None
        y = x.copy()
        expander = crypto.MaskExpander(self.vector_length, self.params.bits)
        y += expander.keystream(self._b)
        for v in held_b:
            stream = expander.keystream(self._pair_seeds[v])
            if _sign_adds(me, v):
                y += stream
            else:
                y -= stream
        reduce(y, self.params.bits)
        self._held_b, self._held_sk = held_b, held_sk
        self._b = None
        self._pair_seeds = {}
        self._stage = "masked_input"
        return y

    # Stage 4: consistency check -------------------------------------------

    def sign_survivors(self, survivors: Sequence[int]) -> bytes:
        """Sign the survivor set (``U3``, every member whose masked input is in the sum) this participant was told.

        Signed once per round; refused, for good, when the set does not hold
        this participant (it sent its masked input: a set without it is not
        one it can vouch for) or names anyone outside the member list.
        """
        self._expect("masked_input", "sign the survivor set")
        self._stage = "consistency"  # one signature per round, whatever happens next
        ids = list(survivors)
        if len(set(ids)) != len(ids):
            raise ProtocolViolation("the survivor set repeats a participant")
        if self.client_id not in ids:
            raise ProtocolViolation("the survivor set leaves out this participant, which sent its masked input")
        unknown = sorted(set(ids) - set(self.members))
        if unknown:
            raise ProtocolViolation(f"the survivor set names non-members {unknown}")
        self._survivors = tuple(sorted(ids))
        self._survivors_signature = self._signer.sign(
            signing.survivors_message(self.round_id, self.public_seed, self._survivors))
        return self._survivors_signature

    # Stage 5 --------------------------------------------------------------

    def unmask(self, *, survivors: Sequence[int], signatures: Mapping[int, bytes]) -> UnmaskReply:
        """Shares of surviving neighbours' self-mask seeds and dropped neighbours' mask keys; answered once.

        ``survivors`` must be the very set this participant signed, and
        ``signatures`` must hold valid signatures over it from at least ``t``
        members of this participant's neighbourhood (its own counts; the
        neighbours' are checked against the certificates verified in stage 2).
        Who survived and who dropped is then derived here from that one set:
        a neighbour that sent shares is either in it (a share of its ``b``) or
        not (a share of its ``s_sk``), never both. Refused, for good, when
        the set differs, the signatures fall short, or too few of the
        neighbourhood survived to rebuild anything.
        """
        self._expect("consistency", "reveal shares")
        self._stage = "unmask"  # whatever happens next, this participant answers at most once
        me = self.client_id
        if tuple(sorted(survivors)) != self._survivors or len(set(survivors)) != len(survivors):
            raise ProtocolViolation("asked to unmask for a survivor set other than the one this participant signed")
        message = signing.survivors_message(self.round_id, self.public_seed, self._survivors)
        agreeing = {me}
        for cid, signature in signatures.items():
            key = self._peer_keys.get(cid)
            if key is None:
                continue  # not a neighbour whose certificate this participant checked: it does not count
            try:
                self._verifier.verify(key, signature, message)
            except signing.UntrustedPeer:
                continue
            agreeing.add(cid)
        if len(agreeing) < self._threshold:
            raise ProtocolViolation(
                f"only {len(agreeing)} of this neighbourhood signed the same survivor set, {self._threshold} needed; "
                "refusing to unmask (the aggregator may be telling participants different survivor sets)"
            )
        survivor_set = set(self._survivors)
        alive = sorted(v for v in self._held_b if v in survivor_set)
        gone = sorted(u for u in self._held_sk if u not in survivor_set)
        if len(alive) + 1 < self._threshold:
            raise ProtocolViolation(f"only {len(alive) + 1} of this neighbourhood survived, {self._threshold} needed")
        self_mask_shares = {me: self._own_b_share, **{v: self._held_b[v] for v in alive}}
        key_shares = {u: self._held_sk[u] for u in gone}
        assert not set(self_mask_shares) & set(key_shares)
        self._held_b, self._held_sk = {}, {}
        self._own_b_share = self._own_sk_share = b""
        return UnmaskReply(self_mask_shares=dict(sorted(self_mask_shares.items())), key_shares=key_shares)
