"""Secure aggregation: the aggregator learns the sum of participants' vectors and nothing else.

The protocol of Bonawitz et al. (CCS 2017) with the SecAgg+ neighbourhoods of
Bell et al. (CCS 2020), as pure, transport-independent state machines: a
:class:`SecAggClient` per participant and a :class:`SecAggServer` for the
aggregator, one of each per round, exchanging plain Python values that the
node and aggregator carry over gRPC. No torch, no network here.

Modules: :mod:`~fedcrm.secagg.params` (the knobs), :mod:`~fedcrm.secagg.quantization`
(reals <-> integers modulo ``2**bits``), :mod:`~fedcrm.secagg.sparsification` (the coordinates every member
keeps in a round), :mod:`~fedcrm.secagg.graph` (who
neighbours whom), :mod:`~fedcrm.secagg.shamir` (secret sharing),
:mod:`~fedcrm.secagg.crypto` (X25519, AES-GCM, AES-CTR masks),
:mod:`~fedcrm.secagg.signing` (certificate signatures over keys and survivor sets),
:mod:`~fedcrm.secagg.member_lists` (one member list per federation, signed by every member on it),
:mod:`~fedcrm.secagg.client` and :mod:`~fedcrm.secagg.server` (the two sides).
"""

from __future__ import annotations

from fedcrm.secagg.client import AdvertisedKeys, ProtocolViolation, SecAggClient, UnmaskReply
from fedcrm.secagg.crypto import TamperedCiphertext
from fedcrm.secagg.member_lists import MemberAgreement, MemberSignature
from fedcrm.secagg.params import SecAggParams
from fedcrm.secagg.quantization import choose_scale, dequantize, quantize
from fedcrm.secagg.server import BelowThreshold, SecAggServer, UnmaskRequest
from fedcrm.secagg.shamir import NotEnoughShares
from fedcrm.secagg.signing import PeerVerifier, Signer, UntrustedPeer

__all__ = [
    "AdvertisedKeys",
    "BelowThreshold",
    "MemberAgreement",
    "MemberSignature",
    "NotEnoughShares",
    "PeerVerifier",
    "ProtocolViolation",
    "SecAggClient",
    "SecAggParams",
    "SecAggServer",
    "Signer",
    "TamperedCiphertext",
    "UnmaskReply",
    "UnmaskRequest",
    "UntrustedPeer",
    "choose_scale",
    "dequantize",
    "quantize",
]
