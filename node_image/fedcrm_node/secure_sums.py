"""A participant's side of one secure sum: quantize, advertise signed keys, share, mask, sign survivors, unmask.

The participant's real-valued contribution is quantized with bounds every
party derives from the task, then only ever leaves this process masked. What
the aggregator relays is checked against what this participant knows itself:
its neighbourhood comes from the member list and the public seed of its own
Federation's key, round and phase; peers' keys count only when signed by a
certificate of the federation CA with the identity the member list names; it
unmasks only for a survivor set at least t of its neighbours signed, and never
reveals both kinds of share for one peer.
"""

from __future__ import annotations

import numpy as np

from fedcrm.protocol import pb, to_vector
from fedcrm.secagg.client import AdvertisedKeys, SecAggClient
from fedcrm.secagg.graph import public_seed
from fedcrm.secagg.params import SecAggParams
from fedcrm.secagg.signing import PeerVerifier, Signer
from fedcrm.secagg.segments import SegmentedQuantizer

__all__ = ["SecureContribution", "params_from_task"]


def params_from_task(task: pb.SecAggTask) -> SecAggParams:
    neighbours: str | int = int(task.neighbours) if task.neighbours.isdigit() else task.neighbours
    return SecAggParams(threshold=task.threshold, neighbours=neighbours, bits=task.bits)


class SecureContribution:
    """This participant's vector in one secure sum (one round, one phase)."""

    def __init__(self, *, client_id: int, round_: int, secagg: pb.SecAggTask, quantizer: SegmentedQuantizer,
                 values: np.ndarray, federation: str, signer: Signer, verifier: PeerVerifier) -> None:
        """``federation`` is this participant's own Federation key: with the round, phase and member list it
        gives the public graph seed, so a graph the aggregator computed for another federation does not match."""
        self.round = round_
        self.phase = secagg.phase
        self.round_id = secagg.round_id
        self.quantized = quantizer.quantize(values)
        members = list(secagg.members)
        self.client = SecAggClient(
            client_id=client_id, round_id=secagg.round_id, params=params_from_task(secagg),
            vector_length=quantizer.size, signer=signer, verifier=verifier, members=members,
            public_seed=public_seed(federation, round_, secagg.phase, dict(enumerate(members))),
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
            result.masked.CopyFrom(to_vector(self.client.masked_input(dict(s.inbox), self.quantized)))
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
