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

import hashlib
import logging
from typing import Any

import numpy as np

from fedcrm.errors import FederationFailed, RoundAbandoned
from fedcrm.protocol import from_vector, pb
from fedcrm.secagg.client import AdvertisedKeys, ProtocolViolation, UnmaskReply
from fedcrm.secagg.graph import public_seed
from fedcrm.secagg.params import SecAggParams
from fedcrm.secagg.segments import SegmentedQuantizer
from fedcrm.secagg.server import BelowThreshold, SecAggServer
from fedcrm.spec.manifests import SecureAggregation
from fedcrm.training.preprocessing import MAX_PARTICIPANT_ROWS, StatisticsLayout, training_rows
from fedcrm.training.secure_vectors import (
    STATISTICS_BITS,
    StatisticsEncoding,
    client_dp_fit_quantizer,
    evaluation_quantizer,
    fit_quantizer,
    validation_bound,
)
from fedcrm_aggregator.crash_points import crash_point
from fedcrm_aggregator.sessions import Session
from fedcrm_aggregator.stage_runner import StageRunner


__all__ = ["SecureSums", "round_id_for"]

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
        # The statistics' sum has a modulus of its own, fixed in code (both sides derive it, see STATISTICS_BITS).
        self.statistics_params = SecAggParams(threshold=spec.threshold, neighbours=spec.neighbours,
                                              bits=STATISTICS_BITS)
        self.ids = {identity: i for i, identity in enumerate(runner.expected)}
        self.identities = {i: identity for identity, i in self.ids.items()}
        #: Sample-level DP only: each statistics contributor's training rows, the one figure it sends in the clear.
        self.statistics_rows: dict[str, int] = {}

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
                return fit_quantizer(parameters=self.c.layout.size, weight_bound=self.bound(kind),
                                     clip=self.spec.clip, bits=self.spec.bits)
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
            return self._stages(kind, round_, phase, round_id, base, quantizer)
        except (BelowThreshold, ProtocolViolation) as err:
            # ProtocolViolation here means a reconstructed key did not match its advertised key:
            # a participant sent a corrupt share. Either way the round's sum is never released.
            self.c.emit("secagg_abandoned", round=round_, phase=name, attempt=attempt, reason=str(err))
            raise RoundAbandoned(f"round {round_} {name}: secure aggregation abandoned, no sum released: {err}") from None

    def _stages(self, kind: int, round_: int, phase: int, round_id: int, base: pb.SecAggTask,
                quantizer: SegmentedQuantizer | StatisticsEncoding) -> tuple[list[str], np.ndarray]:
        c = self.c

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

        # 1. AdvertiseKeys (the FIT / EVALUATE task itself)
        keys = c.run_stage(kind, round_, receive_keys, customize=with_base)
        seed = public_seed(c.federation.key, round_, phase, self.identities)
        params = self.statistics_params if kind == pb.Task.STATISTICS else self.params
        server = SecAggServer(round_id=round_id, params=params, client_ids=sorted(self.identities),
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
            server.receive_masked(self.ids[identity], from_vector(message.masked, expected_length=quantizer.size))
            return True

        c.run_stage(pb.Task.SECAGG_MASKED_INPUT, round_, receive_masked, cohort=shared.keys(), customize=inbox)
        dropped, survivors = server.close_masked_input()
        noise = c.privacy.noise
        if kind == pb.Task.FIT and noise is not None and len(survivors) < noise.survivors_min:
            # Each survivor added only 1/t_min of the noise: fewer than t_min would release a sum with less
            # noise than the guarantee was planned with. Stop before any unmasking share is asked for.
            raise BelowThreshold(
                f"only {len(survivors)} noised updates survived, client-level differential privacy needs at least "
                f"t_min = {noise.survivors_min} (each carries 1/t_min of the noise)")

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

    @staticmethod
    def _check_result(message: pb.SecAggResult, phase: int, round_id: int, stage: int) -> None:
        if message.phase != phase or message.round_id != round_id or message.stage != stage:
            raise ValueError("this secure-aggregation answer belongs to another exchange (phase, round id or stage differ)")

