"""A participant's side of one secure sum: quantize, advertise signed keys, share, mask, sign survivors, unmask.

The participant's real-valued contribution is quantized with bounds every
party derives from the task, then only ever leaves this process masked. What
the aggregator relays is checked against what this participant knows itself:
its neighbourhood comes from the member list and the public seed of its own
Federation's key, round and phase; peers' keys count only when signed by a
certificate of the federation CA with the identity the member list names; it
unmasks only for a survivor set at least t of its neighbours signed, and never
reveals both kinds of share for one peer. The member list itself is the one
every member on it signed, once per federation, and the graph seed carries the
salt of that agreement (:mod:`fedcrm.secagg.member_lists`, the
``SECAGG_MEMBERS`` steps answered by :func:`answer_members`); a secure sum
under any other list, or before the agreement, is refused.
"""

from __future__ import annotations

import numpy as np

from fedcrm.protocol import pb, to_vector
from fedcrm.secagg.client import AdvertisedKeys, ProtocolViolation, SecAggClient
from fedcrm.secagg.graph import public_seed
from fedcrm.secagg.member_lists import MemberAgreement, MemberSignature
from fedcrm.secagg.params import SecAggParams
from fedcrm.secagg.signing import PeerVerifier, Signer
from fedcrm.secagg.segments import SegmentedQuantizer

__all__ = ["SecureContribution", "answer_members", "members_of", "params_from_task"]


def params_from_task(task: pb.SecAggTask) -> SecAggParams:
    neighbours: str | int = int(task.neighbours) if task.neighbours.isdigit() else task.neighbours
    return SecAggParams(threshold=task.threshold, neighbours=neighbours, bits=task.bits)


def members_of(task: pb.SecAggTask) -> dict[int, str]:
    """The sum's member list, ``{id: identity}``: the ids of ``member_ids``, named by ``members`` (indexed by id)."""
    ids = list(task.member_ids)
    if not ids:
        raise ProtocolViolation("the secure sum names no member ids (an aggregator older than protocol version 4?)")
    if len(set(ids)) != len(ids) or max(ids) >= len(task.members):
        raise ProtocolViolation("the member ids repeat or fall outside the member list")
    return {i: task.members[i] for i in sorted(ids)}


def _signatures(task: pb.SecAggTask) -> dict[int, MemberSignature]:
    return {cid: MemberSignature(signature=m.signature, certificate=m.certificate, commitment=m.commitment)
            for cid, m in task.member_signatures.items()}


def answer_members(agreement: MemberAgreement, task: pb.Task) -> pb.SecAggResult:
    """The answer to a ``SECAGG_MEMBERS`` step: sign the list, echo the transcript, or reveal.

    Raises :class:`ProtocolViolation` (a ``ValueError``) for a list this
    participant will not sign or accept, or echoes that do not all agree.
    """
    s = task.secagg
    members = members_of(s)
    result = pb.SecAggResult(round=task.round, phase=s.phase, round_id=s.round_id, stage=task.kind)
    if s.member_echoes:
        agreement.accept(members, _signatures(s))
        result.member_reveal = agreement.reveal(dict(s.member_echoes))
    elif s.member_signatures:
        agreement.accept(members, _signatures(s))
        result.member_echo = agreement.echo()
    else:
        signed = agreement.sign(members)
        result.member_signature.CopyFrom(pb.MemberSignature(
            signature=signed.signature, certificate=signed.certificate, commitment=signed.commitment))
    return result


class SecureContribution:
    """This participant's vector in one secure sum (one round, one phase)."""

    def __init__(self, *, client_id: int, round_: int, secagg: pb.SecAggTask, quantizer: SegmentedQuantizer,
                 values: np.ndarray, federation: str, signer: Signer, verifier: PeerVerifier,
                 agreement: MemberAgreement) -> None:
        """``federation`` is this participant's own Federation key: with the round, phase and member list it
        gives the public graph seed, so a graph the aggregator computed for another federation does not match.
        ``agreement`` lives as long as the federation: the member list must be the one agreed, and its salt goes into
        the public seed; a task that brings the agreement's signatures, echoes and reveals settles it here."""
        self.round = round_
        self.phase = secagg.phase
        self.round_id = secagg.round_id
        self.quantized = quantizer.quantize(values)
        self.members = members_of(secagg)
        if agreement.salt is None:
            # A connection's first sum brings the reveals, and to a participant that took no part in the agreement
            # (it restarted) the signatures and echoes too: everything is checked before the salt is taken.
            agreement.accept(self.members, _signatures(secagg))
            agreement.check_echoes(dict(secagg.member_echoes))
            agreement.settle(dict(secagg.member_reveals))
        salt = agreement.salt
        assert salt is not None
        self.client = SecAggClient(
            client_id=client_id, round_id=secagg.round_id, params=params_from_task(secagg),
            vector_length=quantizer.size, signer=signer, verifier=verifier, members=self.members,
            public_seed=public_seed(federation, round_, secagg.phase, self.members, salt), agreement=agreement,
        )

    def keys(self) -> pb.SecAggKeys:
        k = self.client.advertise_keys()
        return pb.SecAggKeys(c_pk=k.c_pk, s_pk=k.s_pk, signature=k.signature, certificate=k.certificate)

    def matches(self, task: pb.Task) -> bool:
        return task.round == self.round and task.secagg.phase == self.phase and task.secagg.round_id == self.round_id

    def answer(self, task: pb.Task) -> pb.SecAggResult:
        """The answer to a SECAGG_* task of this exchange."""
        result = pb.SecAggResult(round=self.round, phase=self.phase, round_id=self.round_id, stage=task.kind)
        s = task.secagg
        if task.kind == pb.Task.SECAGG_SHARE_KEYS:
            roster = {peer: AdvertisedKeys(c_pk=k.c_pk, s_pk=k.s_pk, signature=k.signature, certificate=k.certificate)
                      for peer, k in s.roster.items()}
            for receiver, ct in self.client.share_keys(roster).items():
                result.shares[receiver] = ct
        elif task.kind == pb.Task.SECAGG_MASKED_INPUT:
            masked = self.client.masked_input(dict(s.inbox), self.quantized)
            result.masked.CopyFrom(to_vector(masked, bits=self.client.params.bits))  # packed at the modulus
        elif task.kind == pb.Task.SECAGG_CONSISTENCY:
            result.survivors_signature = self.client.sign_survivors(list(s.survivors))
        elif task.kind == pb.Task.SECAGG_UNMASK:
            reply = self.client.unmask(survivors=list(s.survivors), signatures=dict(s.signatures))
            for owner, share in reply.self_mask_shares.items():
                result.self_mask_shares[owner] = share
            for owner, share in reply.key_shares.items():
                result.key_shares[owner] = share
        else:
            raise ValueError(f"not a secure-aggregation task: kind {task.kind}")
        return result
