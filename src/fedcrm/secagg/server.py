"""The aggregator's side of one secure-aggregation round, streaming and restartable.

The aggregator relays messages and adds up masked vectors; it never sees an
individual input. It fixes, stage by stage, who is still in the round:

* ``U1`` -- advertised keys (:meth:`SecAggServer.close_advertise`); the
  neighbourhood graph is fixed before that, from the member list and the
  public seed every participant recomputes (:func:`~fedcrm.secagg.graph.public_seed`);
* ``U2`` -- sent encrypted shares to all their neighbours (:meth:`~SecAggServer.close_share_keys`);
* ``U3`` -- sent a masked input, the *survivors* whose inputs make up the sum
  (:meth:`~SecAggServer.close_masked_input`); ``U2 - U3`` are the dropped;
* ``U4`` -- signed ``U3`` in the consistency check (:meth:`~SecAggServer.close_consistency`):
  each participant unmasks only with ``t`` signatures of its neighbourhood over
  the same set, which the aggregator relays without being able to forge;
* then collects shares from survivors and removes the masks (:meth:`~SecAggServer.finish`):
  each survivor's self-mask ``PRG(b)``, and for each dropped participant the
  pairwise masks its surviving neighbours added for it, recomputed from its
  rebuilt mask key.

Masked vectors are added into one running ``uint32``/``uint64`` sum as they
arrive and never kept, so memory is one vector whatever the number of
participants. Each stage checks it can still finish (every needed secret can
still reach its threshold of shares) and raises :class:`BelowThreshold`
otherwise, so a round fails as early as it knows it must, and never returns a
partial sum. :meth:`SecAggServer.checkpoint` / :meth:`SecAggServer.restore`
let an aggregator restart mid-round.
"""

from __future__ import annotations

import base64
import io
import json
from collections.abc import Mapping, Sequence

from dataclasses import dataclass

import numpy as np

from fedcrm.secagg import crypto, shamir
from fedcrm.secagg.client import (
    SECRET_BYTES,
    SHARE_BYTES,
    SHARE_CIPHERTEXT_BYTES,
    AdvertisedKeys,
    ProtocolViolation,
    UnmaskReply,
)
from fedcrm.secagg.graph import neighbourhoods
from fedcrm.secagg.params import SecAggParams
from fedcrm.secagg.quantization import reduce, vector_dtype

__all__ = ["BelowThreshold", "SecAggServer", "UnmaskRequest"]

_FORMAT = "fedcrm-secagg-server/v2"
_STAGES = ("advertise", "share_keys", "masked_input", "consistency", "unmask", "finished", "aborted")
_MAX_LISTED = 10


class BelowThreshold(RuntimeError):
    """Too few participants remain for the round to finish; no sum is produced."""


@dataclass(frozen=True)
class UnmaskRequest:
    """What a survivor is sent in the Unmasking stage: the whole survivor set and its neighbourhood's signatures over it."""

    survivors: list[int]
    signatures: dict[int, bytes]


def _listing(items: Sequence[str]) -> str:
    shown = "; ".join(items[:_MAX_LISTED])
    return shown + (f"; and {len(items) - _MAX_LISTED} more" if len(items) > _MAX_LISTED else "")


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii")


def _unb64(text: str) -> bytes:
    return base64.b64decode(text.encode("ascii"), validate=True)


class SecAggServer:
    """The aggregator for one round among ``client_ids`` with vectors of ``vector_length`` values.

    ``client_ids`` is the whole member list (some may never advertise keys) and
    ``public_seed`` the round's graph seed: the participants compute their
    neighbourhoods from the same two, so the server's graph is theirs.
    The server verifies no signature: the participants do, which is what
    makes them safe from this side of the protocol.
    """

    def __init__(self, *, round_id: int, params: SecAggParams, client_ids: Sequence[int], vector_length: int,
                 public_seed: bytes) -> None:
        if isinstance(round_id, bool) or not isinstance(round_id, int) or not (0 <= round_id < 2**64):
            raise ValueError(f"round_id must be an int in [0, 2**64), got {round_id!r}")
        ids = list(client_ids)
        if any(isinstance(c, bool) or not isinstance(c, int) or not (0 <= c < 2**63) for c in ids):
            raise ValueError("client ids must be ints in [0, 2**63)")
        if len(set(ids)) != len(ids):
            raise ValueError("client ids must be distinct")
        if isinstance(vector_length, bool) or not isinstance(vector_length, int) or vector_length < 1:
            raise ValueError(f"vector_length must be a positive int, got {vector_length!r}")
        if not isinstance(public_seed, bytes) or len(public_seed) != 32:
            raise ValueError("public_seed must be 32 bytes (fedcrm.secagg.graph.public_seed)")
        self.round_id = round_id
        self.params = params
        self.client_ids: tuple[int, ...] = tuple(sorted(ids))
        self.vector_length = vector_length
        self.public_seed = public_seed
        self._dtype = vector_dtype(params.bits)
        self._stage = "advertise"
        self._keys: dict[int, AdvertisedKeys] = {}
        self._key_owner: dict[bytes, int] = {}
        self._u1: tuple[int, ...] = ()
        self._neighbours: dict[int, tuple[int, ...]] = (
            neighbourhoods(self.client_ids, params.neighbour_count(len(self.client_ids)), public_seed)
            if len(self.client_ids) >= 2 else {c: () for c in self.client_ids}
        )
        self._threshold: dict[int, int] = {
            c: params.shares_needed(len(n)) for c, n in self._neighbours.items() if n
        }
        self._ciphertexts: dict[int, dict[int, bytes]] = {}
        self._u2: tuple[int, ...] = ()
        self._masked: set[int] = set()
        self._sum = np.zeros(vector_length, dtype=self._dtype)
        self._u3: tuple[int, ...] = ()
        self._dropped: tuple[int, ...] = ()
        self._signatures: dict[int, bytes] = {}
        self._u4: tuple[int, ...] = ()
        self._replies: dict[int, UnmaskReply] = {}

    # Bookkeeping -----------------------------------------------------------

    @property
    def stage(self) -> str:
        """``advertise``, ``share_keys``, ``masked_input``, ``unmask``, ``finished`` or ``aborted``."""
        return self._stage

    @property
    def survivors(self) -> list[int]:
        """Participants whose inputs are in the sum: ``U3`` once fixed, those received so far before."""
        return list(self._u3) if self._stage in ("consistency", "unmask", "finished") else sorted(self._masked)

    @property
    def signers(self) -> list[int]:
        """``U4``: the survivors that signed the survivor set, once :meth:`close_consistency` has fixed it."""
        return list(self._u4)

    @property
    def answered(self) -> list[int]:
        """Signers whose unmask reply has been received."""
        return sorted(self._replies)

    @property
    def dropped(self) -> list[int]:
        """``U2 - U3`` once :meth:`close_masked_input` has fixed it, else empty."""
        return list(self._dropped)

    def threshold_of(self, cid: int) -> int:
        """Shares needed to rebuild participant ``cid``'s secrets (known after :meth:`close_advertise`)."""
        self._require_after("advertise", "ask for thresholds")
        self._require_member(cid, self._u1, "U1 (advertised keys)")
        return self._threshold[cid]

    def _require(self, stage: str, action: str) -> None:
        if self._stage != stage:
            raise ProtocolViolation(
                f"round {self.round_id}: cannot {action} in stage {self._stage!r} (expected {stage!r})"
            )

    def _require_after(self, stage: str, action: str) -> None:
        if self._stage == "aborted" or _STAGES.index(self._stage) <= _STAGES.index(stage):
            raise ProtocolViolation(f"round {self.round_id}: cannot {action} in stage {self._stage!r}")

    @staticmethod
    def _require_member(cid: int, members: Sequence[int] | set[int], what: str) -> None:
        if cid not in members:
            raise ProtocolViolation(f"participant {cid} is not in {what}")

    def _abort(self, message: str) -> BelowThreshold:
        self._stage = "aborted"
        self._ciphertexts = {}
        return BelowThreshold(message)

    # Stage 1: advertise keys ----------------------------------------------

    def receive_keys(self, cid: int, keys: AdvertisedKeys) -> None:
        """Record a participant's public keys; a key already advertised by anyone is refused."""
        self._require("advertise", "receive keys")
        self._require_member(cid, self.client_ids, "this round")
        if cid in self._keys:
            raise ProtocolViolation(f"participant {cid} already advertised its keys")
        if not isinstance(keys, AdvertisedKeys):
            raise ProtocolViolation(f"participant {cid} sent {type(keys).__name__}, expected AdvertisedKeys")
        if keys.c_pk == keys.s_pk or keys.c_pk in self._key_owner or keys.s_pk in self._key_owner:
            raise ProtocolViolation(f"participant {cid} advertised a public key that is already in use")
        for key in (keys.c_pk, keys.s_pk):
            try:
                crypto.check_public_key(key)
            except ValueError:
                raise ProtocolViolation(f"participant {cid} advertised an unusable (low-order) public key") from None
        self._keys[cid] = keys
        self._key_owner[keys.c_pk] = cid
        self._key_owner[keys.s_pk] = cid

    def close_advertise(self) -> None:
        """Fix ``U1``; fails if some participant of ``U1`` has fewer than ``t`` holders left in it."""
        self._require("advertise", "close the advertise stage")
        u1 = tuple(sorted(self._keys))
        members = set(u1)
        short = [
            f"participant {cid} has {sum(1 for v in self._neighbours[cid] if v in members) + 1} holders, "
            f"{self._threshold[cid]} needed"
            for cid in u1
            if sum(1 for v in self._neighbours[cid] if v in members) + 1 < self._threshold[cid]
        ]
        if len(u1) < 2:
            short.insert(0, f"{len(u1)} participant(s) remained, at least 2 needed")
        if short:
            raise self._abort(f"round {self.round_id}, stage advertise: {_listing(short)}")
        self._u1 = u1
        self._stage = "share_keys"

    def roster_for(self, cid: int) -> dict[int, AdvertisedKeys]:
        """The signed keys of ``cid``'s neighbours that advertised (those in ``U1``)."""
        members = set(self._u1)
        return {v: self._keys[v] for v in self.neighbours_of(cid) if v in members}

    def neighbours_of(self, cid: int) -> tuple[int, ...]:
        """``cid``'s neighbours in the public graph (sorted), whether or not they advertised keys."""
        self._require_after("advertise", "ask for neighbourhoods")
        self._require_member(cid, self._u1, "U1 (advertised keys)")
        return self._neighbours[cid]

    # Stage 2: share keys --------------------------------------------------

    def receive_shares(self, cid: int, ciphertexts: Mapping[int, bytes]) -> None:
        """Record ``cid``'s ciphertexts, one for each of its neighbours (no more, no fewer)."""
        self._require("share_keys", "receive shares")
        self._require_member(cid, self._u1, "U1 (advertised keys)")
        if cid in self._ciphertexts:
            raise ProtocolViolation(f"participant {cid} already sent its shares")
        expected = set(self._neighbours[cid]) & set(self._u1)
        got = set(ciphertexts)
        if got != expected:
            raise ProtocolViolation(
                f"participant {cid} must send one ciphertext to each of its neighbours {sorted(expected)}; "
                f"missing {sorted(expected - got)}, not neighbours {sorted(got - expected)}"
            )
        stored: dict[int, bytes] = {}
        for v, ct in ciphertexts.items():
            if not isinstance(ct, (bytes, bytearray)) or len(ct) != SHARE_CIPHERTEXT_BYTES:
                raise ProtocolViolation(
                    f"participant {cid}'s ciphertext for {v} must be {SHARE_CIPHERTEXT_BYTES} bytes"
                )
            stored[v] = bytes(ct)
        self._ciphertexts[cid] = stored

    def close_share_keys(self) -> None:
        """Fix ``U2``; fails if some participant of ``U2`` kept too few neighbours to ever be unmasked."""
        self._require("share_keys", "close the share-keys stage")
        u2 = tuple(sorted(self._ciphertexts))
        members = set(u2)
        short = []
        for cid in u2:
            left = sum(1 for v in self._neighbours[cid] if v in members) + 1
            if left < self._threshold[cid]:
                short.append(f"participant {cid} kept {left} of {len(self._neighbours[cid]) + 1} holders, "
                             f"{self._threshold[cid]} needed")
        if len(u2) < 2:
            short.insert(0, f"{len(u2)} participant(s) remained, at least 2 needed")
        if short:
            raise self._abort(f"round {self.round_id}, stage share_keys: {_listing(short)}")
        self._u2 = u2
        self._stage = "masked_input"

    def inbox_for(self, cid: int) -> dict[int, bytes]:
        """Ciphertexts addressed to ``cid`` by its neighbours in ``U2``."""
        self._require("masked_input", "hand out inboxes")
        self._require_member(cid, self._ciphertexts, "U2 (shared keys)")
        return {v: self._ciphertexts[v][cid] for v in self._neighbours[cid] if v in self._ciphertexts}

    # Stage 3: masked input ------------------------------------------------

    def receive_masked(self, cid: int, masked: np.ndarray) -> None:
        """Add a masked vector into the running sum at once; each participant of ``U2`` at most once."""
        self._require("masked_input", "receive masked inputs")
        self._require_member(cid, self._ciphertexts, "U2 (shared keys)")
        if cid in self._masked:
            raise ProtocolViolation(f"participant {cid} already sent its masked input")
        if not isinstance(masked, np.ndarray) or masked.dtype != self._dtype or masked.shape != (self.vector_length,):
            got = f"{masked.dtype} of shape {masked.shape}" if isinstance(masked, np.ndarray) else type(masked).__name__
            raise ProtocolViolation(
                f"participant {cid}'s masked input must be a {self._dtype} vector of length {self.vector_length}, "
                f"got {got}"
            )
        self._sum += masked  # wraps at the dtype's width, a multiple of 2**bits: reduced once in finish()
        self._masked.add(cid)

    def close_masked_input(self) -> tuple[list[int], list[int]]:
        """Fix ``U3``; returns ``(dropped, survivors)`` = ``(U2 - U3, U3)``.

        Fails if some survivor's self-mask or some dropped participant's mask
        key could not reach its threshold even if every survivor answered.
        Next comes the consistency check: send every survivor
        :meth:`consistency_request` and collect its signature.
        """
        self._require("masked_input", "close the masked-input stage")
        u3 = tuple(sorted(self._masked))
        members = set(u3)
        dropped = tuple(cid for cid in self._u2 if cid not in members)
        short = []
        for cid in u3:
            holders = sum(1 for v in self._neighbours[cid] if v in members) + 1
            if holders < self._threshold[cid]:
                short.append(f"survivor {cid}'s self-mask has {holders} holders left, {self._threshold[cid]} needed")
        for cid in dropped:
            holders = sum(1 for v in self._neighbours[cid] if v in members)
            if holders < self._threshold[cid]:
                short.append(f"dropped {cid}'s mask key has {holders} holders left, {self._threshold[cid]} needed")
        if not u3:
            short.insert(0, "no masked input arrived")
        if short:
            raise self._abort(
                f"round {self.round_id}, stage masked_input: {len(u3)} of {len(self._u2)} remained; {_listing(short)}"
            )
        self._u3, self._dropped = u3, dropped
        self._ciphertexts = {cid: {} for cid in self._u2}  # the shares are delivered; keep only who was in U2
        self._stage = "consistency"
        return list(dropped), list(u3)

    # Stage 4: consistency check ------------------------------------------------

    def consistency_request(self) -> list[int]:
        """The survivor set ``U3`` every survivor is asked to sign (the same list for all)."""
        self._require("consistency", "hand out the survivor set")
        return list(self._u3)

    def receive_signature(self, cid: int, signature: bytes) -> None:
        """Record a survivor's signature over ``U3``; stored and relayed, not checked here (participants check)."""
        self._require("consistency", "receive survivor-set signatures")
        self._require_member(cid, self._u3, "U3 (survivors)")
        if cid in self._signatures:
            raise ProtocolViolation(f"participant {cid} already signed the survivor set")
        if not isinstance(signature, bytes) or not 0 < len(signature) <= 72:
            raise ProtocolViolation(f"participant {cid}'s survivor-set signature must be 1 to 72 bytes")
        self._signatures[cid] = signature

    def close_consistency(self) -> None:
        """Fix ``U4`` (survivors that signed); fails if some needed secret can no longer reach its threshold.

        Only a survivor that signed is asked to unmask, and it unmasks only with
        ``t`` signatures of its neighbourhood, so a neighbourhood with fewer
        signers than ``t`` could never be unmasked: stop now, release nothing.
        """
        self._require("consistency", "close the consistency stage")
        u4 = tuple(sorted(self._signatures))
        signed = set(u4)
        short = []
        for cid in self._u3:
            holders = sum(1 for v in self._neighbours[cid] if v in signed) + (cid in signed)
            if holders < self._threshold[cid]:
                short.append(f"survivor {cid} has {holders} signers in its neighbourhood, {self._threshold[cid]} needed")
        for cid in self._dropped:
            holders = sum(1 for v in self._neighbours[cid] if v in signed)
            if holders < self._threshold[cid]:
                short.append(f"dropped {cid}'s mask key has {holders} signers left, {self._threshold[cid]} needed")
        if short:
            raise self._abort(
                f"round {self.round_id}, stage consistency: {len(u4)} of {len(self._u3)} signed; {_listing(short)}"
            )
        self._u4 = u4
        self._stage = "unmask"

    # Stage 4: unmask ------------------------------------------------------

    def unmask_request_for(self, cid: int) -> UnmaskRequest:
        """The question to send survivor ``cid``: ``U3`` and the signatures over it of ``cid``'s neighbours."""
        self._require("unmask", "hand out unmask requests")
        self._require_member(cid, self._u4, "U4 (signed the survivor set)")
        return UnmaskRequest(
            survivors=list(self._u3),
            signatures={v: self._signatures[v] for v in self._neighbours[cid] if v in self._signatures},
        )

    def _asked_of(self, cid: int) -> tuple[set[int], set[int]]:
        """(dropped, survivors) of ``cid``'s neighbourhood: whose key shares and self-mask shares it may send."""
        dropped, survivors = set(self._dropped), set(self._u3)
        neighbours = self._neighbours[cid]
        return {v for v in neighbours if v in dropped}, {v for v in neighbours if v in survivors} | {cid}

    def receive_unmask(self, cid: int, reply: UnmaskReply) -> None:
        """Record a survivor's shares; only shares it was asked for are accepted."""
        self._require("unmask", "receive unmask replies")
        self._require_member(cid, self._u4, "U4 (signed the survivor set)")
        if cid in self._replies:
            raise ProtocolViolation(f"participant {cid} already sent its unmask reply")
        if not isinstance(reply, UnmaskReply):
            raise ProtocolViolation(f"participant {cid} sent {type(reply).__name__}, expected UnmaskReply")
        asked_dropped, asked_survivors = self._asked_of(cid)
        extra = sorted(
            (set(reply.self_mask_shares) - set(asked_survivors)) | (set(reply.key_shares) - set(asked_dropped))
        )
        if extra:
            raise ProtocolViolation(f"participant {cid} sent shares it was not asked for (owners {extra})")
        for share in (*reply.self_mask_shares.values(), *reply.key_shares.values()):
            if not isinstance(share, bytes) or len(share) != SHARE_BYTES:
                raise ProtocolViolation(f"participant {cid} sent a share that is not {SHARE_BYTES} bytes")
        self._replies[cid] = UnmaskReply(dict(reply.self_mask_shares), dict(reply.key_shares))

    def _collect(self) -> tuple[list[dict[int, bytes]], list[dict[int, bytes]]]:
        """Shares per survivor self-mask and per dropped mask key; BelowThreshold if any is short."""
        b_sets = [
            {h + 1: r.self_mask_shares[v] for h, r in self._replies.items() if v in r.self_mask_shares}
            for v in self._u3
        ]
        sk_sets = [
            {h + 1: r.key_shares[u] for h, r in self._replies.items() if u in r.key_shares} for u in self._dropped
        ]
        short = [
            f"survivor {v}'s self-mask has {len(s)} shares, {self._threshold[v]} needed"
            for v, s in zip(self._u3, b_sets)
            if len(s) < self._threshold[v]
        ] + [
            f"dropped {u}'s mask key has {len(s)} shares, {self._threshold[u]} needed"
            for u, s in zip(self._dropped, sk_sets)
            if len(s) < self._threshold[u]
        ]
        if short:
            raise BelowThreshold(
                f"round {self.round_id}, stage unmask: {len(self._replies)} of {len(self._u3)} survivors answered; "
                f"{_listing(short)}"
            )
        return b_sets, sk_sets

    def finish(self) -> np.ndarray:
        """The exact sum of the survivors' quantized inputs modulo ``2**bits``.

        Every secret is rebuilt (and every rebuilt mask key checked against
        its advertised public key) before the sum is touched, so a failure --
        :class:`BelowThreshold` while replies are missing, which may be retried
        after more arrive, or :class:`ProtocolViolation` for a corrupt share --
        leaves the round as it was and no partial sum escapes.
        """
        self._require("unmask", "finish")
        b_sets, sk_sets = self._collect()
        try:
            seeds = shamir.reconstruct_many(
                b_sets, threshold=[self._threshold[v] for v in self._u3], secret_length=SECRET_BYTES
            )
            raw_keys = shamir.reconstruct_many(
                sk_sets, threshold=[self._threshold[u] for u in self._dropped], secret_length=SECRET_BYTES
            )
        except ValueError as exc:
            raise ProtocolViolation(f"round {self.round_id}: a share is corrupt ({exc})") from None
        mask_keys = []
        for u, raw in zip(self._dropped, raw_keys):
            key = crypto.private_from_bytes(raw)
            if crypto.public_bytes(key) != self._keys[u].s_pk:
                raise ProtocolViolation(
                    f"round {self.round_id}: dropped participant {u}'s rebuilt mask key does not match the key it "
                    "advertised (a share is corrupt)"
                )
            mask_keys.append(key)
        survivors = set(self._u3)
        pair_seeds: list[tuple[bytes, bool]] = []  # (seed, whether the survivor added it)
        for u, key in zip(self._dropped, mask_keys):
            for v in self._neighbours[u]:
                if v in survivors:
                    seed = crypto.agree(key, self._keys[v].s_pk, info=crypto.mask_info(self.round_id, u, v))
                    pair_seeds.append((seed, v < u))

        total = self._sum
        expander = crypto.MaskExpander(self.vector_length, self.params.bits)
        for seed in seeds:
            total -= expander.keystream(seed)
        for seed, added in pair_seeds:
            if added:
                total -= expander.keystream(seed)
            else:
                total += expander.keystream(seed)
        reduce(total, self.params.bits)
        self._stage = "finished"
        self._replies = {}
        return total

    # Checkpoints ------------------------------------------------------------

    def checkpoint(self) -> bytes:
        """The round's state as bytes: an ``.npz`` holding the running sum and JSON metadata (no pickle)."""
        meta = {
            "format": _FORMAT,
            "round_id": self.round_id,
            "params": {
                "threshold": self.params.threshold,
                "neighbours": self.params.neighbours,
                "bits": self.params.bits,
            },
            "client_ids": list(self.client_ids),
            "vector_length": self.vector_length,
            "public_seed": _b64(self.public_seed),
            "stage": self._stage,
            "keys": {
                str(c): [_b64(k.c_pk), _b64(k.s_pk), _b64(k.signature), _b64(k.certificate)]
                for c, k in sorted(self._keys.items())
            },
            "u1": list(self._u1),
            "neighbours": {str(c): list(n) for c, n in sorted(self._neighbours.items())},
            "ciphertexts": {
                str(s): {str(r): _b64(ct) for r, ct in sorted(cts.items())}
                for s, cts in sorted(self._ciphertexts.items())
            },
            "u2": list(self._u2),
            "masked": sorted(self._masked),
            "u3": list(self._u3),
            "dropped": list(self._dropped),
            "signatures": {str(c): _b64(sig) for c, sig in sorted(self._signatures.items())},
            "u4": list(self._u4),
            "replies": {
                str(c): {
                    "self_mask": {str(o): _b64(s) for o, s in sorted(r.self_mask_shares.items())},
                    "keys": {str(o): _b64(s) for o, s in sorted(r.key_shares.items())},
                }
                for c, r in sorted(self._replies.items())
            },
        }
        out = io.BytesIO()
        np.savez(out, sum=self._sum, meta=np.frombuffer(json.dumps(meta).encode("utf-8"), dtype=np.uint8))
        return out.getvalue()

    @classmethod
    def restore(cls, data: bytes) -> SecAggServer:
        """A server in the state :meth:`checkpoint` saved; ``ValueError`` if the data is not such a checkpoint."""
        try:
            with np.load(io.BytesIO(data), allow_pickle=False) as archive:
                total = archive["sum"]
                meta = json.loads(archive["meta"].tobytes().decode("utf-8"))
        except (OSError, KeyError, ValueError, UnicodeDecodeError) as exc:
            raise ValueError(f"not a secure-aggregation checkpoint ({exc})") from None
        if not isinstance(meta, dict) or meta.get("format") != _FORMAT:
            raise ValueError(f"not a {_FORMAT} checkpoint")
        try:
            p = meta["params"]
            server = cls(
                round_id=meta["round_id"],
                params=SecAggParams(threshold=p["threshold"], neighbours=p["neighbours"], bits=p["bits"]),
                client_ids=meta["client_ids"],
                vector_length=meta["vector_length"],
                public_seed=_unb64(meta["public_seed"]),
            )
            if meta["stage"] not in _STAGES:
                raise ValueError(f"unknown stage {meta['stage']!r}")
            if total.dtype != server._dtype or total.shape != (server.vector_length,):
                raise ValueError("the running sum has the wrong dtype or length")
            for c, (c_pk, s_pk, signature, certificate) in meta["keys"].items():
                keys = AdvertisedKeys(c_pk=_unb64(c_pk), s_pk=_unb64(s_pk), signature=_unb64(signature),
                                      certificate=_unb64(certificate))
                server._keys[int(c)] = keys
                server._key_owner[keys.c_pk] = server._key_owner[keys.s_pk] = int(c)
            server._u1 = tuple(meta["u1"])
            if {int(c): tuple(n) for c, n in meta["neighbours"].items()} != server._neighbours:
                raise ValueError("its neighbourhoods differ from this version's graph")
            server._ciphertexts = {
                int(s): {int(r): _unb64(ct) for r, ct in cts.items()} for s, cts in meta["ciphertexts"].items()
            }
            server._u2 = tuple(meta["u2"])
            server._masked = set(meta["masked"])
            server._u3 = tuple(meta["u3"])
            server._dropped = tuple(meta["dropped"])
            server._signatures = {int(c): _unb64(sig) for c, sig in meta["signatures"].items()}
            server._u4 = tuple(meta["u4"])
            server._replies = {
                int(c): UnmaskReply(
                    self_mask_shares={int(o): _unb64(s) for o, s in r["self_mask"].items()},
                    key_shares={int(o): _unb64(s) for o, s in r["keys"].items()},
                )
                for c, r in meta["replies"].items()
            }
            server._sum = np.array(total, dtype=server._dtype)
            server._stage = meta["stage"]
        except (KeyError, TypeError, ValueError) as exc:
            raise ValueError(f"corrupt secure-aggregation checkpoint: {exc}") from None
        return server
