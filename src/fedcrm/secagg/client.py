"""One participant's side of one secure-aggregation round.

The round (Bonawitz et al., CCS 2017; SecAgg+ neighbourhoods of Bell et al.,
CCS 2020) has four stages, each a request from the aggregator and an answer:

1. :meth:`SecAggClient.advertise_keys` -- two fresh X25519 public keys:
   ``c`` to receive shares encrypted to this participant, ``s`` to agree
   pairwise mask seeds.
2. :meth:`SecAggClient.share_keys` -- draws a self-mask seed ``b`` and
   Shamir-shares ``b`` and the private mask key ``s_sk`` among its
   neighbourhood (itself included), each neighbour's pair of shares encrypted
   so that only that neighbour can read it.
3. :meth:`SecAggClient.masked_input` -- the quantized input plus ``PRG(b)``
   plus, for every neighbour ``v`` that completed stage 2, ``+PRG(s_uv)`` if
   ``u < v`` else ``-PRG(s_uv)``. Pairwise masks cancel in the sum; the
   self-mask is what keeps the input hidden even if the aggregator later
   learns ``s_sk_u`` because it (wrongly) claims ``u`` dropped out.
4. :meth:`SecAggClient.unmask` -- for each surviving neighbour a share of its
   ``b``, for each dropped one a share of its ``s_sk``, and never both for the
   same participant: with both, the aggregator could strip every mask off one
   participant's input.

Every message from the aggregator is checked, and anything off the protocol is
refused with :class:`ProtocolViolation`, because the aggregator is exactly the
party the protocol defends against. What this participant cannot check: that
its neighbourhood is the one the public graph prescribes (it is not sent the
whole roster). The aggregator computes it from public randomness
(:mod:`fedcrm.secagg.graph`); a deployment that distrusts the aggregator on
this can send the roster and recompute it with :func:`~fedcrm.secagg.graph.neighbourhoods`.
"""

from __future__ import annotations

import secrets
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey

from fedcrm.secagg import crypto, shamir
from fedcrm.secagg.params import SecAggParams
from fedcrm.secagg.quantization import reduce, vector_dtype

__all__ = [
    "SECRET_BYTES",
    "SHARE_BYTES",
    "SHARE_CIPHERTEXT_BYTES",
    "AdvertisedKeys",
    "ProtocolViolation",
    "SecAggClient",
    "UnmaskReply",
]

SECRET_BYTES = 32
SHARE_BYTES = shamir.share_length(SECRET_BYTES)
SHARE_CIPHERTEXT_BYTES = crypto.ciphertext_length(2 * SHARE_BYTES)


class ProtocolViolation(ValueError):
    """A message that the protocol does not allow at this point (wrong stage, wrong party, inconsistent content)."""


@dataclass(frozen=True)
class AdvertisedKeys:
    """A participant's two X25519 public keys for one round (32 raw bytes each)."""

    c_pk: bytes
    s_pk: bytes

    def __post_init__(self) -> None:
        for name in ("c_pk", "s_pk"):
            value = getattr(self, name)
            if not isinstance(value, bytes) or len(value) != crypto.KEY_BYTES:
                raise ProtocolViolation(f"{name} must be {crypto.KEY_BYTES} raw bytes")


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

    def __init__(self, *, client_id: int, round_id: int, params: SecAggParams, vector_length: int) -> None:
        if isinstance(client_id, bool) or not isinstance(client_id, int) or not (0 <= client_id < 2**63):
            raise ValueError(f"client_id must be an int in [0, 2**63), got {client_id!r}")
        if isinstance(round_id, bool) or not isinstance(round_id, int) or not (0 <= round_id < 2**64):
            raise ValueError(f"round_id must be an int in [0, 2**64), got {round_id!r}")
        if isinstance(vector_length, bool) or not isinstance(vector_length, int) or vector_length < 1:
            raise ValueError(f"vector_length must be a positive int, got {vector_length!r}")
        self.client_id = client_id
        self.round_id = round_id
        self.params = params
        self.vector_length = vector_length
        self._dtype = vector_dtype(params.bits)
        self._c_sk = crypto.generate_private_key()
        self._s_sk: X25519PrivateKey | None = crypto.generate_private_key()
        self._keys = AdvertisedKeys(c_pk=crypto.public_bytes(self._c_sk), s_pk=crypto.public_bytes(self._s_sk))
        self._stage = "advertise"
        self._neighbours: tuple[int, ...] = ()
        self._threshold = 0
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

    def share_keys(self, roster: Mapping[int, AdvertisedKeys], neighbours: Sequence[int]) -> dict[int, bytes]:
        """Encrypted shares of this participant's secrets, one ciphertext per neighbour id.

        ``roster`` holds (at least) the neighbours' advertised keys. Refuses a
        roster in which two participants advertise the same key (a relayed or
        reflected key would let the aggregator read the shares or predict the
        masks), neighbours without keys, and a neighbourhood too small for
        ``t >= 2``.
        """
        self._expect("advertise", "share keys")
        me = self.client_id
        ids = list(neighbours)
        if len(set(ids)) != len(ids) or me in ids:
            raise ProtocolViolation("the neighbour list repeats a participant or contains this participant")
        missing = [v for v in ids if v not in roster]
        if missing:
            raise ProtocolViolation(f"no advertised keys for neighbours {sorted(missing)}")
        if not ids:
            raise ProtocolViolation("secure aggregation needs at least one neighbour")
        if me in roster and roster[me] != self._keys:
            raise ProtocolViolation("the roster carries keys for this participant that it did not advertise")
        seen: dict[bytes, int] = {}
        for cid, keys in [(me, self._keys), *((v, k) for v, k in roster.items() if v != me)]:
            if not isinstance(keys, AdvertisedKeys):
                raise ProtocolViolation(f"participant {cid}'s roster entry is not an AdvertisedKeys")
            for key in (keys.c_pk, keys.s_pk):
                if key in seen:
                    raise ProtocolViolation(
                        f"participants {seen[key]} and {cid} advertise the same public key; refusing the roster"
                    )
                seen[key] = cid
        t = self.params.shares_needed(len(ids))
        if len(ids) + 1 < t:
            raise ProtocolViolation(f"{len(ids)} neighbours remain, {t - 1} needed")

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
        self._threshold = t
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

    # Stage 4 --------------------------------------------------------------

    def unmask(self, *, dropped: Sequence[int], survivors: Sequence[int]) -> UnmaskReply:
        """Shares of survivors' self-mask seeds and dropped neighbours' mask keys; answered once.

        ``dropped`` and ``survivors`` are about this participant's
        neighbourhood (``survivors`` may include this participant). Refused,
        for good, if a participant is in both lists, if a participant is one
        whose shares this participant does not hold, if this participant is
        called dropped, if too few of the neighbourhood survived to rebuild
        anything, or if asked a second time.
        """
        self._expect("masked_input", "reveal shares")
        self._stage = "unmask"  # whatever happens next, this participant answers at most once
        me = self.client_id
        dropped_set, survivor_set = set(dropped), set(survivors)
        if len(dropped_set) != len(dropped) or len(survivor_set) != len(survivors):
            raise ProtocolViolation("the unmask request repeats a participant")
        both = sorted(dropped_set & survivor_set)
        if both:
            raise ProtocolViolation(f"participants {both} are listed as both dropped and surviving; refusing to unmask")
        if me in dropped_set:
            raise ProtocolViolation("this participant is listed as dropped although it is answering")
        unknown = sorted((dropped_set - set(self._held_sk)) | (survivor_set - set(self._held_b) - {me}))
        if unknown:
            raise ProtocolViolation(f"this participant holds no shares of {unknown}; refusing to unmask")
        if len(survivor_set | {me}) < self._threshold:
            raise ProtocolViolation(
                f"only {len(survivor_set | {me})} of this neighbourhood survived, {self._threshold} needed"
            )
        self_mask_shares = {v: (self._own_b_share if v == me else self._held_b[v]) for v in sorted(survivor_set)}
        key_shares = {u: self._held_sk[u] for u in sorted(dropped_set)}
        self._held_b, self._held_sk = {}, {}
        self._own_b_share = self._own_sk_share = b""
        return UnmaskReply(self_mask_shares=self_mask_shares, key_shares=key_shares)
