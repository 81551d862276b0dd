"""One member list per federation, signed by every member on it, and a graph seed nobody can choose.

Why: the public graph seed hashes the member list
(:func:`fedcrm.secagg.graph.public_seed`), and within a round a participant
checks only its own neighbourhood (k certificates, not n). An aggregator that
could show a victim a member list of its choosing would choose the victim's
neighbours: re-roll the list (add, drop or rename entries) until the seed puts
colluders around the victim. The honest members, running under the real list,
sign their keys over another seed and look like dropouts to the victim, and
t - 1 colluding neighbours plus the victim's own unmasking share rebuild its
self-mask seed. Making every member sign the list is not enough on its own:
the aggregator chooses which members are "connected" when the list is made,
so it could still grind that choice (leave out a few honest members) until
the list's hash suits it.

So the agreement, run once per federation before its first secure sum, has
three steps (each a ``SECAGG_MEMBERS`` task), and the graph seed of every sum
after it mixes in randomness no party knows when the list is fixed:

1. **Sign** (:meth:`MemberAgreement.sign`): each member signs
   ``(federation, terms digest, member list, H(r))`` with its certificate key,
   ``r`` 32 fresh random bytes of its own -- only with itself on it and at
   least its own terms' ``minParticipants`` members. It may sign another list
   (with fresh ``r``) only while it has revealed nothing (see *Abandoned
   lists* below).
2. **Echo** (:meth:`MemberAgreement.accept`, :meth:`MemberAgreement.echo`):
   given every listed member's signature, certificate and commitment, it
   checks all n against the federation CA (a list with one member that did
   not sign it is refused) and signs the transcript (the list and all n
   commitments) -- one transcript per list it signed.
3. **Reveal** (:meth:`MemberAgreement.check_echoes`,
   :meth:`MemberAgreement.reveal`): given every member's signature over the
   transcript, all n over the one it signed itself, it reveals ``r`` -- once
   per federation: after that it signs, accepts and reveals for no other list.

With every ``r`` (checked against its commitment, :meth:`MemberAgreement.settle`)
the federation's graph salt is ``H(transcript, r_1, ..., r_n)``; each sum's
public seed hashes it with the round, phase and list. Each honest member
reveals for one list and transcript only, after every member signed that very
transcript, so every participant that settles has the same list, the same
commitments and (the reveals being checked against them) the same salt as
every honest member on the list; and no honest ``r`` is seen before every
commitment is fixed, so the aggregator and any colluders can only withhold a
reveal (the federation then stops: no member that revealed signs a second
list), never choose among graphs. What remains is the list itself -- the
aggregator may leave members out, and a list of colluders and the victim only
cannot be told from an honest one; it is bounded below by the victim's own
``minParticipants`` (see docs/secure-aggregation.md, *Assumptions*).

Abandoned lists: a member that went silent (a hung pod) before every member
revealed must not end the federation, so the aggregator may abandon the list
and ask the others to sign a smaller one, and a member signs a new list (with
new random bytes, the old ones forgotten) as long as it has not revealed. This
keeps both properties, because a list's salt needs every member's ``r``:

* *No honest member is in two agreed lists.* A list is agreed (settled by
  anyone) only with every member's ``r`` checked against its commitment.
  An honest member reveals once per federation, and once it has it signs no
  other list; before it has, the ``r`` of any list it signed and left is
  forgotten, unrevealed, so that list never settles (its commitment is
  binding). Its signatures and echo over an abandoned list are inert.
* *No grinding.* The salt of a list with an honest member ``H`` on it is
  unknown to everyone else until ``H`` reveals (commitments hide ``r``),
  and ``H`` reveals only after it is bound to that list for good. So every
  choice the aggregator makes about a list containing ``H`` -- abandon it,
  restart with whom -- is made before it learns anything of that list's
  salt: each honest member gets one draw, as with one list per federation.
  A member (or colluder) that withholds its reveal after others revealed
  cannot be dropped: the list is then stuck and the federation fails, naming
  it -- dropping it would let colluders choose, after seeing the honest
  reveals, between the stuck list's salt and a restart's.

Cost, once per federation: two signatures per member, and per member 2n
signature and n certificate checks (about 0.6 ms per member); each sum after
it compares one list.
"""

from __future__ import annotations

import hashlib
import hmac
import secrets
import struct
from collections.abc import Mapping
from dataclasses import dataclass

from cryptography.hazmat.primitives.asymmetric.ec import EllipticCurvePublicKey

from fedcrm.secagg import signing
from fedcrm.secagg.client import ProtocolViolation, members_from

__all__ = [
    "MemberAgreement", "MemberSignature", "commitment_of", "graph_salt", "member_list_digest", "members_message",
    "transcript_digest",
]

_MEMBERS_LABEL = b"fedcrm-secagg/member-list/v1"
_TRANSCRIPT_LABEL = b"fedcrm-secagg/member-transcript/v1"
_SALT_LABEL = b"fedcrm-secagg/graph-salt/v1"
RANDOM_BYTES = 32


def member_list_digest(federation: str, terms: str, members: Mapping[int, str]) -> bytes:
    """SHA-256 over the federation key, its terms digest and the member list (id and identity, in id order).

    The terms bind a signature to one version of the federation: a list signed
    under earlier terms is never valid under new ones.
    """
    h = hashlib.sha256(_MEMBERS_LABEL)
    name, version = federation.encode("utf-8"), terms.encode("utf-8")
    h.update(struct.pack(">HHQ", len(name), len(version), len(members)) + name + version)
    for cid in sorted(members):
        identity = members[cid].encode("utf-8")
        h.update(struct.pack(">QH", cid, len(identity)) + identity)
    return h.digest()


def members_message(digest: bytes, commitment: bytes) -> bytes:
    """What a member signs in step 1: a label, the list's digest (which binds the federation) and its commitment."""
    return _MEMBERS_LABEL + digest + commitment


def transcript_digest(digest: bytes, commitments: Mapping[int, bytes]) -> bytes:
    """What a member signs in step 2: the list's digest and every member's commitment, in id order."""
    h = hashlib.sha256(_TRANSCRIPT_LABEL + digest)
    for cid in sorted(commitments):
        h.update(struct.pack(">Q", cid) + commitments[cid])
    return _TRANSCRIPT_LABEL + h.digest()


def commitment_of(r: bytes) -> bytes:
    """A member's commitment to its random bytes (SHA-256, labelled)."""
    return hashlib.sha256(b"fedcrm-secagg/member-commitment/v1" + r).digest()


def graph_salt(transcript: bytes, reveals: Mapping[int, bytes]) -> bytes:
    """The federation's graph salt: SHA-256 over the transcript and every member's revealed bytes, in id order."""
    h = hashlib.sha256(_SALT_LABEL + transcript)
    for cid in sorted(reveals):
        h.update(struct.pack(">Q", cid) + reveals[cid])
    return h.digest()


@dataclass(frozen=True)
class MemberSignature:
    """One member's step-1 signature over the member list and its commitment, with its client certificate (DER)."""

    signature: bytes
    certificate: bytes
    commitment: bytes


class MemberAgreement:
    """One participant's agreement on its federation's member list and graph salt; kept for the whole federation.

    ``minimum`` is the fewest members this participant accepts on a list: its
    own terms' ``spec.training.minParticipants``, never a figure from the
    aggregator.
    """

    def __init__(self, *, federation: str, terms: str, client_id: int, signer: signing.Signer,
                 verifier: signing.PeerVerifier, minimum: int) -> None:
        if minimum < 2:
            raise ValueError(f"a secure sum needs at least 2 members, got minimum {minimum}")
        self.federation = federation
        self.terms = terms
        self.client_id = client_id
        self.minimum = minimum
        self._signer = signer
        self._verifier = verifier
        self._r = secrets.token_bytes(RANDOM_BYTES)
        self._signed: bytes | None = None  # the digest of the one list this participant signed
        self._list: dict[int, str] | None = None  # the list every member on it signed (after accept)
        self._keys: dict[int, EllipticCurvePublicKey] = {}
        self._commitments: dict[int, bytes] = {}
        self._transcript: bytes | None = None
        self._echo: bytes | None = None  # this participant's one signature over a transcript
        self._echoed = False  # every member's signature over the transcript was checked
        self._revealed = False  # this participant revealed its bytes: bound to its list for the federation
        self._salt: bytes | None = None

    # ----------------------------------------------------------------- what the sums use
    @property
    def agreed(self) -> dict[int, str] | None:
        """The member list once agreed and its salt settled; None before."""
        return None if self._salt is None or self._list is None else dict(self._list)

    @property
    def salt(self) -> bytes | None:
        """The federation's graph salt, ``H(transcript, r_1..r_n)``; None until settled."""
        return self._salt

    def digest(self, members: Mapping[int, str]) -> bytes:
        return member_list_digest(self.federation, self.terms, members)

    def check(self, members: Mapping[int, str]) -> None:
        """Refuse a member list other than the agreed one, or any before the agreement is settled."""
        if self._salt is None or self._list is None:
            raise ProtocolViolation(f"federation {self.federation}: no member list was agreed yet; refusing the sum")
        if dict(members) != self._list:
            raise ProtocolViolation(
                f"federation {self.federation}: this secure sum's member list ({len(members)} members) is not the one "
                f"every member agreed on ({len(self._list)} members); refusing it (an aggregator that changes the list "
                "chooses the graph)")

    @property
    def bound(self) -> bool:
        """Whether this participant revealed its bytes (or settled): it then signs no other list this federation."""
        return self._revealed or self._salt is not None

    # ----------------------------------------------------------------- step 1
    def sign(self, members: Mapping[int, str]) -> MemberSignature:
        """This participant's signature over ``members`` and its commitment, with it on the list.

        Refused (:class:`ProtocolViolation`): a list without this participant
        under its own id, one with fewer members than its ``minimum``, and,
        once it has revealed (:attr:`bound`), a list other than the one it
        revealed for. Asked again for the same list, it signs again (a
        reconnection or a restarted aggregator asks again). Asked for another
        list before it revealed -- the aggregator abandoned the last one
        because a member went silent -- it forgets the last list and its
        random bytes (never revealed, so that list can never settle) and
        signs the new one with new bytes.
        """
        table = members_from(members)
        if table.get(self.client_id) != self._signer.identity:
            raise ProtocolViolation(
                f"the member list gives id {self.client_id} to {table.get(self.client_id)!r}, not to this participant "
                f"({self._signer.identity!r}); refusing to sign it")
        if len(table) < self.minimum:
            raise ProtocolViolation(
                f"the member list has {len(table)} members; this participant's terms need at least "
                f"minParticipants = {self.minimum}; refusing to sign it")
        digest = self.digest(table)
        if self._signed is not None and digest != self._signed:
            if self.bound:
                raise ProtocolViolation(
                    f"federation {self.federation}: this participant already revealed its random bytes for another "
                    "member list; it is bound to that list for the federation (a second would let the aggregator "
                    "choose between graphs); refusing")
            self._r = secrets.token_bytes(RANDOM_BYTES)
            self._list, self._keys, self._commitments = None, {}, {}
            self._transcript, self._echo, self._echoed = None, None, False
        self._signed = digest
        commitment = commitment_of(self._r)
        return MemberSignature(signature=self._signer.sign(members_message(digest, commitment)),
                               certificate=self._signer.certificate, commitment=commitment)

    # ----------------------------------------------------------------- step 2
    def accept(self, members: Mapping[int, str], signatures: Mapping[int, MemberSignature]) -> None:
        """Take ``members`` as the list once every member on it signed it, each checked against its certificate.

        The certificate must be issued by the federation CA to the identity the
        list gives that id (:meth:`~fedcrm.secagg.signing.PeerVerifier.public_key`).
        Raises :class:`ProtocolViolation` naming the members whose signature is
        missing or does not verify; nothing is taken then.
        """
        table = members_from(members)
        digest = self.digest(table)
        if self._list is not None:
            if table != self._list:
                raise ProtocolViolation(f"federation {self.federation}: asked to accept a second member list; refusing")
            return
        if self._signed is not None and digest != self._signed:
            raise ProtocolViolation(
                f"federation {self.federation}: asked to accept a member list other than the one this participant "
                "signed; refusing")
        missing = sorted(set(table) - set(signatures))
        bad: list[str] = []
        keys: dict[int, EllipticCurvePublicKey] = {}
        commitments: dict[int, bytes] = {}
        for cid in sorted(set(table) - set(missing)):
            entry = signatures[cid]
            if not isinstance(entry.commitment, bytes) or len(entry.commitment) != 32:
                bad.append(f"{cid} ({table[cid]}): no commitment")
                continue
            if cid == self.client_id and self._signed is not None and entry.commitment != commitment_of(self._r):
                bad.append(f"{cid} (this participant): not the commitment it made")
                continue
            try:
                keys[cid] = self._verifier.public_key(entry.certificate, table[cid])
                self._verifier.verify(keys[cid], entry.signature, members_message(digest, entry.commitment))
            except signing.UntrustedPeer as exc:
                bad.append(f"{cid} ({table[cid]}): {exc}")
                continue
            commitments[cid] = entry.commitment
        if missing or bad:
            named = ([f"no signature from {missing[:10]}{' ...' if len(missing) > 10 else ''}"] if missing else []) + bad[:5]
            raise ProtocolViolation(
                f"federation {self.federation}: the member list of {len(table)} is not signed by every member on it "
                f"({'; '.join(named)}); refusing it (a list its members did not sign may be the aggregator's choice)")
        self._list, self._keys, self._commitments = table, keys, commitments
        self._signed = digest
        self._transcript = transcript_digest(digest, commitments)

    def echo(self) -> bytes:
        """This participant's signature over the transcript (the list and every commitment); one per list signed."""
        if self._transcript is None:
            raise ProtocolViolation(f"federation {self.federation}: no member list accepted yet; nothing to echo")
        if self._echo is None:
            self._echo = self._signer.sign(self._transcript)
        return self._echo

    # ----------------------------------------------------------------- step 3
    def check_echoes(self, echoes: Mapping[int, bytes]) -> None:
        """Every listed member's signature over the very transcript this participant has (all n, no fewer).

        After this no member's commitment can differ between two honest
        members' views: each signed one transcript, and this one saw all of
        them sign its own.
        """
        if self._transcript is None or self._list is None:
            raise ProtocolViolation(f"federation {self.federation}: no member list accepted yet; refusing the echoes")
        if self._echoed:
            return
        bad = []
        for cid in sorted(self._list):
            try:
                self._verifier.verify(self._keys[cid], echoes.get(cid, b""), self._transcript)
            except signing.UntrustedPeer:
                bad.append(cid)
        if bad:
            raise ProtocolViolation(
                f"federation {self.federation}: {len(bad)} member(s) ({bad[:10]}) did not sign the transcript of the "
                "member list this participant has; refusing to reveal (the aggregator may be showing members different "
                "commitments)")
        self._echoed = True

    def reveal(self, echoes: Mapping[int, bytes]) -> bytes:
        """This participant's random bytes, only once every member signed the same transcript."""
        self.check_echoes(echoes)
        if self._commitments.get(self.client_id) != commitment_of(self._r):
            raise ProtocolViolation(
                f"federation {self.federation}: this participant's commitment in the list is not one this process made "
                "(it restarted after signing); it cannot reveal")
        self._revealed = True
        return self._r

    def settle(self, reveals: Mapping[int, bytes]) -> bytes:
        """The graph salt from every member's revealed bytes, each checked against its commitment."""
        if not self._echoed:
            raise ProtocolViolation(f"federation {self.federation}: the transcript's echoes were not checked yet")
        if self._salt is not None:
            return self._salt
        wrong = sorted(cid for cid in self._commitments
                       if not hmac.compare_digest(commitment_of(reveals.get(cid, b"")), self._commitments[cid]))
        if wrong:
            raise ProtocolViolation(
                f"federation {self.federation}: member(s) {wrong[:10]} revealed nothing, or bytes that do not match "
                "their commitment; refusing the graph salt")
        assert self._transcript is not None
        self._salt = graph_salt(self._transcript, {cid: reveals[cid] for cid in self._commitments})
        return self._salt
