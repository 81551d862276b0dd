"""Secure aggregation of the preprocessing statistics and of each round's FIT and EVALUATE contributions.

Every secure sum runs the four stages of Bonawitz et al. (with SecAgg+
neighbourhoods) over the participants' task streams:

1. AdvertiseKeys — piggybacks on the STATISTICS / FIT / EVALUATE task: the
   participant does its local work, quantizes its contribution and answers with
   two public keys.
2. ShareKeys — each participant gets its neighbours' keys and sends encrypted
   Shamir shares of its self-mask seed and mask key, one per neighbour.
3. MaskedInputCollection — each participant gets the shares addressed to it and
   sends its masked vector, which is added to a running sum at once; no
   individual vector is kept.
4. ConsistencyCheck — each survivor signs the survivor set, the same list
   for all.
5. Unmasking — each survivor gets its neighbours' signatures and, with at least
   t of them over the set it signed, sends shares of surviving neighbours'
   self-mask seeds and of dropped neighbours' mask keys, never both for one.

The member list is fixed once per federation, before its first secure sum:
the members usable then agree on it in three ``SECAGG_MEMBERS`` steps (sign
the list with a commitment, echo the transcript, reveal), and the revealed
bytes salt every public seed after (:mod:`fedcrm.secagg.member_lists`). A
member silent at the sign or echo step is left out and the others agree on
the list without it; one silent at the reveal step stalls the agreement. A
member left out, or that connects later, sits the secure sums out. The list,
signatures, echoes and reveals are kept in the run's output directory, so a
restarted aggregator serves the same list; each participant's first secure
sum on a connection carries the reveals (and, on a connection that did not
take part in the agreement, everything else it needs to check them).

Participants sign their keys with their certificate keys and recompute their
neighbourhoods from the member list and the public seed
(:func:`fedcrm.secagg.graph.public_seed`): none of what this module relays
needs to be taken on trust, see docs/secure-aggregation.md (threat model).
A stage that leaves a neighbourhood below its threshold, or a corrupt share,
abandons the round (:class:`fedcrm.errors.RoundAbandoned`): no partial sum is
ever released, and the coordinator runs the round again, a bounded number of
times.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import weakref
from typing import Any

import numpy as np

from fedcrm.errors import FederationFailed, RoundAbandoned
from fedcrm.privacy.plans import statistics_shares
from fedcrm.protocol import from_vector, pb
from fedcrm.secagg.client import AdvertisedKeys, ProtocolViolation, UnmaskReply
from fedcrm.secagg.graph import public_seed
from fedcrm.secagg.member_lists import commitment_of, graph_salt, member_list_digest, transcript_digest
from fedcrm.secagg.params import SecAggParams
from fedcrm.secagg import sparsification
from fedcrm.secagg.segments import SegmentedQuantizer
from fedcrm.secagg.server import BelowThreshold, SecAggServer
from fedcrm.spec.manifests import SecureAggregation
from fedcrm.spec.terms import terms_digest
from fedcrm.training.preprocessing import MAX_PARTICIPANT_ROWS, StatisticsLayout, training_rows
from fedcrm.training.secure_vectors import (
    StatisticsEncoding,
    client_dp_fit_quantizer,
    evaluation_quantizer,
    fit_quantizer,
    quantized_fit,
    sum_bits,
    validation_bound,
)
from fedcrm_aggregator.checkpoints import durable_folder
from fedcrm_aggregator.crash_points import crash_point
from fedcrm_aggregator.sessions import Session
from fedcrm_aggregator.stage_runner import StageRunner


__all__ = ["AGREEMENT_FILE", "SecureSums", "round_id_for"]

#: Beside the checkpoint: the member list every secure sum uses, and its members' signatures over it. A restarted
#: aggregator must serve the same list (members that revealed back no other); a new run must not find it.
AGREEMENT_FILE = "secagg-members.json"

#: How many times one agreement may abandon its member list for a smaller one (members silent at the sign or echo
#: step); each costs one round timeout, and the list shrinks each time.
MEMBER_LIST_RESTARTS = 3

log = logging.getLogger("fedcrm.aggregator")

_PHASES = {pb.Task.FIT: pb.SecAggTask.FIT, pb.Task.EVALUATE: pb.SecAggTask.EVALUATE,
           pb.Task.STATISTICS: pb.SecAggTask.STATISTICS}
_NAMES = {pb.Task.FIT: "training", pb.Task.EVALUATE: "evaluation", pb.Task.STATISTICS: "statistics"}


def round_id_for(federation: str, incarnation: str, round_: int, phase: int, attempt: int = 0) -> int:
    """A 63-bit id unique to this federation, aggregator incarnation, round, phase and attempt.

    The id is mixed into every key derivation and authenticated share, so a
    restarted aggregator re-running a round can never make a participant reuse
    keys or masks from before the restart.
    """
    which = f"{round_}" if attempt == 0 else f"{round_}.{attempt}"
    digest = hashlib.sha256(f"{federation}\x1f{incarnation}\x1f{which}\x1f{phase}".encode()).digest()
    return int.from_bytes(digest[:8], "big") >> 1


class SecureSums:
    def __init__(self, runner: StageRunner, spec: SecureAggregation, incarnation: str) -> None:
        self.c = runner
        self.spec = spec
        self.incarnation = incarnation
        self.params = SecAggParams(threshold=spec.threshold, neighbours=spec.neighbours, bits=spec.bits)
        self.ids = {identity: i for i, identity in enumerate(runner.expected)}
        self.identities = {i: identity for identity, i in self.ids.items()}
        #: Sample-level DP only: each statistics contributor's training rows, the one figure it sends in the clear.
        self.statistics_rows: dict[str, int] = {}
        #: The federation's member list, as ids, fixed by the first secure sum (see _member_list).
        self.member_ids: list[int] | None = None
        #: The agreement's three steps, by member id: (signature, certificate, commitment); echoes; reveals.
        self.member_signatures: dict[int, tuple[bytes, bytes, bytes]] = {}
        self.member_echoes: dict[int, bytes] = {}
        self.member_reveals: dict[int, bytes] = {}
        #: The graph salt once every member revealed (see fedcrm.secagg.member_lists).
        self.salt: bytes | None = None
        # Connections that took part in the agreement's last step, and those already sent the reveals.
        self._primed: weakref.WeakSet[Session] = weakref.WeakSet()
        self._informed: weakref.WeakSet[Session] = weakref.WeakSet()
        self._agreement_file = durable_folder(runner.out_dir) / AGREEMENT_FILE
        self._load_agreement()

    def _members(self) -> dict[int, str]:
        return {i: self.identities[i] for i in self._member_list()}

    def _agree(self, round_: int) -> bytes:
        """Run the member-list agreement's three steps (those not yet done); returns the graph salt.

        Members that do not answer the sign or echo step (a hung pod, a refusal)
        are left out: the list is abandoned -- no member has revealed anything
        for it yet, so it can never settle -- and the others are asked to sign
        the list without them (they may, having revealed nothing; see
        :mod:`fedcrm.secagg.member_lists`), at most ``MEMBER_LIST_RESTARTS``
        times, and never below ``minParticipants``. A member that does not
        reveal once the others may have revealed cannot be left out (the others
        are bound to the list): the sum is abandoned (the coordinator tries
        again, then fails the federation, naming it).
        """
        if self.salt is not None:
            return self.salt
        for _ in range(MEMBER_LIST_RESTARTS):
            silent, step = self._agreement_steps(round_)
            if not silent:
                assert self.salt is not None
                return self.salt
            self._leave_out(silent, step)
        silent, step = self._agreement_steps(round_)
        if silent:
            members = self._members()
            raise BelowThreshold(f"member list: no {step} from {', '.join(members[i] for i in silent[:10])}"
                                 f"{' ...' if len(silent) > 10 else ''} after {MEMBER_LIST_RESTARTS} smaller lists; no "
                                 "sum runs under a list some member on it did not agree to")
        assert self.salt is not None
        return self.salt

    def _leave_out(self, silent: list[int], step: str) -> None:
        """Abandon the member list (nobody revealed for it) and start a new one without the ``silent`` members."""
        members = self._members()
        keep = [i for i in sorted(members) if i not in silent]
        names = [members[i] for i in silent]
        need = max(2, self.c.spec.training.min_participants)
        if len(keep) < need:
            raise FederationFailed(
                f"member list: {', '.join(names)} gave no {step} within roundTimeoutSeconds; without them "
                f"{len(keep)} member(s) remain, minParticipants is {need}")
        log.warning("member list: %s gave no %s (dropped out, see above); abandoning the list of %d before anyone "
                    "revealed for it, the %d others sign one without them", ", ".join(names), step, len(members),
                    len(keep))
        self.c.emit("secagg_members_restarted", left_out=names, step=step, members=len(keep))
        self.member_ids = keep
        self.member_signatures, self.member_echoes, self.member_reveals = {}, {}, {}
        self._primed = weakref.WeakSet()
        self._save_agreement()

    def _agreement_steps(self, round_: int) -> tuple[list[int], str]:
        """The agreement's steps not yet done; ``([], "")`` once settled, else the members that did not answer the
        sign or echo step (the list may then be abandoned) and that step's name.

        Raises BelowThreshold when members do not reveal: some may have revealed, binding them to this list.
        """
        members = self._members()
        base = pb.SecAggTask(members=[self.identities[i] for i in sorted(self.identities)], member_ids=sorted(members))

        def with_signatures(session: Session, task: pb.Task) -> None:
            task.secagg.CopyFrom(base)
            self._relay_signatures(task.secagg)

        sent: list[Session] = []  # connections sent the last step: once they answer they hold all but the reveals

        def with_echoes(session: Session, task: pb.Task) -> None:
            sent.append(session)
            with_signatures(session, task)
            for cid, echo in self.member_echoes.items():
                task.secagg.member_echoes[cid] = echo

        def signed(identity: str, message: pb.SecAggResult) -> bool:
            self._check_member_step(message)
            m = message.member_signature
            if not 0 < len(m.signature) <= 72 or not m.certificate or len(m.commitment) != 32:
                raise ValueError("a member-list signature needs a signature, a certificate and a 32-byte commitment")
            self.member_signatures.setdefault(self.ids[identity], (m.signature, m.certificate, m.commitment))
            return True

        def echoed(identity: str, message: pb.SecAggResult) -> bool:
            self._check_member_step(message)
            if not 0 < len(message.member_echo) <= 72:
                raise ValueError("an echo must be one signature")
            self.member_echoes[self.ids[identity]] = message.member_echo
            return True

        def revealed(identity: str, message: pb.SecAggResult) -> bool:
            self._check_member_step(message)
            cid = self.ids[identity]
            if commitment_of(message.member_reveal) != self.member_signatures[cid][2]:
                raise ValueError("the revealed bytes do not match the commitment")
            self.member_reveals[cid] = message.member_reveal
            return True

        for what, have, receive, fill in (("signature over the member list", self.member_signatures, signed, None),
                                          ("signature over the transcript", self.member_echoes, echoed, with_signatures),
                                          ("revealed bytes", self.member_reveals, revealed, with_echoes)):
            waiting = {members[i] for i in members if i not in have}
            if waiting:
                answered = self.c.run_stage(pb.Task.SECAGG_MEMBERS, round_, receive, cohort=waiting,
                                            customize=fill or (lambda session, task: task.secagg.CopyFrom(base)))
                self._primed.update(s for s in sent if s.identity in answered)
                self._save_agreement()
            silent = [i for i in sorted(members) if i not in have]
            if silent and have is not self.member_reveals:
                return silent, what  # no reveal was asked for under this list yet: it can be abandoned
            if silent:
                names = ", ".join(members[i] for i in silent[:10]) + (" ..." if len(silent) > 10 else "")
                raise BelowThreshold(
                    f"member list: no {what} from {names}, which stalled the agreement after every member signed the "
                    "transcript; the others may have revealed and are bound to this list, so it cannot be left out "
                    "(a member that withholds its reveal would otherwise choose between two salts); no sum runs under "
                    "a list some member on it did not agree to")
        self.salt = self._salt()
        self.c.emit("secagg_members_agreed", members=len(members))
        return [], ""

    def _salt(self) -> bytes:
        members = self._members()
        digest = member_list_digest(self.c.federation.key, terms_digest(self.c.spec), members)
        transcript = transcript_digest(digest, {i: self.member_signatures[i][2] for i in members})
        return graph_salt(transcript, {i: self.member_reveals[i] for i in members})

    def _relay_signatures(self, task: pb.SecAggTask) -> None:
        for cid, (signature, certificate, commitment) in self.member_signatures.items():
            task.member_signatures[cid].CopyFrom(
                pb.MemberSignature(signature=signature, certificate=certificate, commitment=commitment))

    def _inform(self, session: Session, task: pb.SecAggTask) -> None:
        """A connection's first secure sum carries the reveals, and the rest of the agreement if it took no part."""
        if session in self._informed:
            return
        if session not in self._primed:
            self._relay_signatures(task)
            for cid, echo in self.member_echoes.items():
                task.member_echoes[cid] = echo
        for cid, reveal in self.member_reveals.items():
            task.member_reveals[cid] = reveal
        self._informed.add(session)

    @staticmethod
    def _check_member_step(message: pb.SecAggResult) -> None:
        if message.stage != pb.Task.SECAGG_MEMBERS:
            raise ValueError("not an answer to the member-list agreement")

    # ----------------------------------------------------------------- the member list, once per federation
    def _member_list(self) -> list[int]:
        """The ids of every secure sum's member list: the members usable at the first secure sum, then fixed.

        A member that never connected could not sign the list and is left out
        of it (before the agreement it counted as a holder that never answers);
        the list must never change afterwards, since each participant signs
        one list per federation.
        """
        if self.member_ids is None:
            self.member_ids = sorted(self.ids[i] for i in self.c.usable() if i in self.ids)
            self._save_agreement()
        return self.member_ids

    def _load_agreement(self) -> None:
        """A restarted aggregator serves the member list (and signatures) of its earlier incarnation."""
        try:
            saved = json.loads(self._agreement_file.read_text(encoding="utf-8"))
        except FileNotFoundError:
            return
        except (OSError, ValueError) as err:
            raise FederationFailed(f"cannot read the secure-aggregation member list {self._agreement_file}: {err}") \
                from None
        ids = saved.get("member_ids")
        if saved.get("federation") != self.c.federation.key or saved.get("members") != self.c.expected \
                or not isinstance(ids, list) or not set(ids) <= set(self.identities):
            raise FederationFailed(f"{self._agreement_file} holds another federation's member list; remove it to "
                                   "start the federation afresh")
        self.member_ids = sorted(int(i) for i in ids)
        self.member_signatures = {int(i): (bytes.fromhex(sig), bytes.fromhex(cert), bytes.fromhex(commitment))
                                  for i, (sig, cert, commitment) in saved.get("signatures", {}).items()}
        self.member_echoes = {int(i): bytes.fromhex(v) for i, v in saved.get("echoes", {}).items()}
        self.member_reveals = {int(i): bytes.fromhex(v) for i, v in saved.get("reveals", {}).items()}
        if set(self.member_reveals) >= set(self.member_ids):
            self.salt = self._salt()

    def _save_agreement(self) -> None:
        self._agreement_file.parent.mkdir(parents=True, exist_ok=True)
        temporary = self._agreement_file.with_suffix(".tmp")
        temporary.write_text(json.dumps({
            "federation": self.c.federation.key, "members": self.c.expected, "member_ids": self.member_ids,
            "signatures": {str(i): [sig.hex(), cert.hex(), commitment.hex()]
                           for i, (sig, cert, commitment) in sorted(self.member_signatures.items())},
            "echoes": {str(i): v.hex() for i, v in sorted(self.member_echoes.items())},
            "reveals": {str(i): v.hex() for i, v in sorted(self.member_reveals.items())},
        }), encoding="utf-8")
        temporary.replace(self._agreement_file)

    # ----------------------------------------------------------------- bounds
    def _weight_bound(self) -> float:
        """Twice the training rows seen in the statistics stage: headroom for late joiners."""
        assert self.c.preprocessing is not None
        return 2.0 * max(self.c.preprocessing.rows or 0, 1)

    def bound(self, kind: int) -> float:
        """The public bound on summed examples: training rows for FIT, validation rows for EVALUATE, the most
        every member may hold for STATISTICS (informative only: each participant derives it from the member list)."""
        if kind == pb.Task.STATISTICS:
            return float(len(self.ids) * MAX_PARTICIPANT_ROWS)
        if kind == pb.Task.FIT:
            return self._weight_bound()
        return float(validation_bound(self._weight_bound(), self.c.spec.training.validation_fraction, len(self.ids)))

    def quantizer(self, kind: int) -> SegmentedQuantizer | StatisticsEncoding:
        if kind == pb.Task.STATISTICS:
            return StatisticsEncoding(StatisticsLayout(self.c.spec.task), participants=len(self.ids))
        assert self.c.layout is not None
        try:
            if kind == pb.Task.FIT and self.c.privacy.noise is not None:
                return client_dp_fit_quantizer(self.c.privacy.noise)
            if kind == pb.Task.FIT:
                # The member list of every sum is all of self.ids (run()'s members); both sides derive the modulus
                quantized = quantized_fit(self.c.spec) is not None
                # keepFraction: the participants send only the round's support (the same size every round)
                kept = self.c.layout.size if self.spec.keep_fraction >= 1 else \
                    sparsification.kept(self.c.layout.size, self.spec.keep_fraction)
                return fit_quantizer(parameters=kept, weight_bound=self.bound(kind),
                                     clip=self.spec.clip, bits=sum_bits(self.c.spec, fit=True, members=len(self.ids)),
                                     contributors=len(self.ids) if quantized else None)
            return evaluation_quantizer(validation_rows_bound=self.bound(kind), bits=self.spec.bits)
        except ValueError as err:
            raise FederationFailed(f"spec.privacy.secureAggregation.bits is too small for this data: {err}") from None

    # ----------------------------------------------------------------- one secure sum
    def run(self, kind: int, round_: int, attempt: int = 0) -> tuple[list[str], np.ndarray]:
        """``attempt``: how many times this round was abandoned before; each attempt has a round id of its own, so
        no key, mask or signature of an abandoned attempt is ever valid in the next."""
        phase = _PHASES[kind]
        quantizer = self.quantizer(kind)
        round_id = round_id_for(self.c.federation.key, self.incarnation, round_, phase, attempt)
        base = pb.SecAggTask(
            phase=phase, round_id=round_id, threshold=self.spec.threshold, neighbours=str(self.spec.neighbours),
            bits=quantizer.bits, weight_bound=self.bound(kind), clip=self.spec.clip,
            members=[self.identities[i] for i in sorted(self.identities)],
        )
        name = _NAMES[kind]
        try:
            salt = self._agree(round_)
            base.member_ids.extend(self._member_list())  # after the agreement: it may have left silent members out
            return self._stages(kind, round_, phase, round_id, base, quantizer, salt)
        except (BelowThreshold, ProtocolViolation) as err:
            # ProtocolViolation here means a reconstructed key did not match its advertised key:
            # a participant sent a corrupt share. Either way the round's sum is never released.
            self.c.emit("secagg_abandoned", round=round_, phase=name, attempt=attempt, reason=str(err))
            raise RoundAbandoned(f"round {round_} {name}: secure aggregation abandoned, no sum released: {err}") from None

    def _stages(self, kind: int, round_: int, phase: int, round_id: int, base: pb.SecAggTask,
                quantizer: SegmentedQuantizer | StatisticsEncoding, salt: bytes) -> tuple[list[str], np.ndarray]:
        c = self.c

        member_ids = list(base.member_ids)
        members = {i: self.identities[i] for i in member_ids}

        def with_base(session: Session, task: pb.Task) -> None:
            task.secagg.CopyFrom(base)

        def check(message: Any) -> None:
            k = message.secagg_keys
            if k is None or len(k.c_pk) != 32 or len(k.s_pk) != 32 or not k.signature or not k.certificate:
                raise ValueError("secure aggregation is on: the answer must carry two 32-byte public keys, signed, "
                                 "with the signer's certificate")

        def receive_keys(identity: str, message: Any) -> AdvertisedKeys:
            if kind == pb.Task.FIT and message.model_version != c.version:
                raise ValueError(f"keys are for model version {message.model_version}, current is {c.version}")
            check(message)
            if kind == pb.Task.STATISTICS:
                self._receive_rows(identity, message)
            k = message.secagg_keys
            return AdvertisedKeys(c_pk=k.c_pk, s_pk=k.s_pk, signature=k.signature, certificate=k.certificate)

        # 1. AdvertiseKeys (the FIT / EVALUATE task itself), to the members on the federation's list only
        def advertise(session: Session, task: pb.Task) -> None:
            with_base(session, task)
            self._inform(session, task.secagg)

        keys = c.run_stage(kind, round_, receive_keys, cohort=set(members.values()), customize=advertise)
        seed = public_seed(c.federation.key, round_, phase, members, salt)
        # The modulus is the quantizer's: fixed in code for the statistics and pooled DP-SGD (see sum_bits).
        params = dataclasses.replace(self.params, bits=quantizer.bits)
        server = SecAggServer(round_id=round_id, params=params, client_ids=member_ids,
                              vector_length=quantizer.size, public_seed=seed)
        for identity, k in keys.items():
            server.receive_keys(self.ids[identity], k)
        server.close_advertise()

        # 2. ShareKeys
        def roster(session: Session, task: pb.Task) -> None:
            with_base(session, task)
            for peer, k in server.roster_for(self.ids[session.identity]).items():
                task.secagg.roster[peer].CopyFrom(
                    pb.SecAggKeys(c_pk=k.c_pk, s_pk=k.s_pk, signature=k.signature, certificate=k.certificate))

        def receive_shares(identity: str, message: pb.SecAggResult) -> bool:
            self._check_result(message, phase, round_id, pb.Task.SECAGG_SHARE_KEYS)
            server.receive_shares(self.ids[identity], dict(message.shares))
            return True

        shared = c.run_stage(pb.Task.SECAGG_SHARE_KEYS, round_, receive_shares, cohort=keys.keys(), customize=roster)
        server.close_share_keys()

        # 3. MaskedInputCollection: each vector goes straight into the running sum.
        def inbox(session: Session, task: pb.Task) -> None:
            with_base(session, task)
            for sender, ct in server.inbox_for(self.ids[session.identity]).items():
                task.secagg.inbox[sender] = ct

        def receive_masked(identity: str, message: pb.SecAggResult) -> bool:
            self._check_result(message, phase, round_id, pb.Task.SECAGG_MASKED_INPUT)
            server.receive_masked(self.ids[identity], from_vector(message.masked, expected_length=quantizer.size,
                                                                  bits=quantizer.bits))
            return True

        c.run_stage(pb.Task.SECAGG_MASKED_INPUT, round_, receive_masked, cohort=shared.keys(), customize=inbox)
        dropped, survivors = server.close_masked_input()
        floor = self._noise_floor(kind)
        if len(survivors) < floor:
            # Each survivor added only 1/t_min of the noise: fewer than t_min would release a sum with less
            # noise than the guarantee was planned with. Stop before any unmasking share is asked for.
            what = "updates" if kind == pb.Task.FIT else "statistics"
            raise BelowThreshold(
                f"only {len(survivors)} noised {what} survived, {c.privacy.mode}-mode differential privacy needs at "
                f"least t_min = {floor} (each carries 1/t_min of the noise)")

        # 4. ConsistencyCheck: every survivor signs the same survivor set.
        def survivor_set(session: Session, task: pb.Task) -> None:
            with_base(session, task)
            task.secagg.survivors.extend(server.consistency_request())

        def receive_signature(identity: str, message: pb.SecAggResult) -> bool:
            self._check_result(message, phase, round_id, pb.Task.SECAGG_CONSISTENCY)
            server.receive_signature(self.ids[identity], message.survivors_signature)
            return True

        signed = c.run_stage(pb.Task.SECAGG_CONSISTENCY, round_, receive_signature,
                             cohort={self.identities[i] for i in survivors}, customize=survivor_set)
        server.close_consistency()

        # 5. Unmasking: each signer gets the survivor set and its neighbours' signatures over it.
        def unmask_request(session: Session, task: pb.Task) -> None:
            with_base(session, task)
            request = server.unmask_request_for(self.ids[session.identity])
            task.secagg.survivors.extend(request.survivors)
            for signer, signature in request.signatures.items():
                task.secagg.signatures[signer] = signature

        def receive_unmask(identity: str, message: pb.SecAggResult) -> bool:
            self._check_result(message, phase, round_id, pb.Task.SECAGG_UNMASK)
            server.receive_unmask(self.ids[identity], UnmaskReply(
                self_mask_shares=dict(message.self_mask_shares), key_shares=dict(message.key_shares)))
            return True

        if kind == pb.Task.FIT:
            c.count_exposure()  # the shares asked for next let the round's noised sum out
        c.run_stage(pb.Task.SECAGG_UNMASK, round_, receive_unmask, cohort=signed.keys(), customize=unmask_request)
        crash_point("unmasked", round_, c.out_dir)  # shares collected, sum not yet finished (crash tests)
        total = server.finish()
        if dropped:
            log.info("round %d: secure aggregation recovered %d dropped participant(s)", round_, len(dropped))
        return sorted(self.identities[i] for i in survivors), quantizer.dequantize(total)

    def _receive_rows(self, identity: str, message: pb.StatisticsResult) -> None:
        """Sample-level DP accounts each participant from its training rows: the one figure sent in the clear."""
        if message.HasField("statistics") and message.statistics.length:
            raise ValueError("secure aggregation is on: statistics must be masked, not sent in the clear")
        if self.c.privacy.mode != "sample":
            return
        self.statistics_rows[identity] = training_rows(message.rows)

    def _noise_floor(self, kind: int) -> int:
        """The fewest contributions a sum may be unmasked with: t_min where each carries only a share of the noise
        (client and pooled training sums, pooled statistics), otherwise no floor beyond the threshold's."""
        noise = self.c.privacy.noise
        if kind == pb.Task.FIT and noise is not None:
            return noise.survivors_min
        if kind == pb.Task.STATISTICS:
            return statistics_shares(self.c.spec, len(self.ids))
        return 0

    @staticmethod
    def _check_result(message: pb.SecAggResult, phase: int, round_id: int, stage: int) -> None:
        if message.phase != phase or message.round_id != round_id or message.stage != stage:
            raise ValueError("this secure-aggregation answer belongs to another exchange (phase, round id or stage differ)")

