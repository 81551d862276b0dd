"""numpy arrays <-> the wire's ``Vector`` message, with the length checked on the way in.

A masked vector modulo ``2**bits`` travels at ``bits`` per element (``PACKED``) unless ``bits`` is a machine width
(32 or 64, sent as ``UINT32``/``UINT64`` as before protocol version 5). The receiver says which modulus it expects,
derived on its own side, and a vector packed at any other width is refused.
"""

from __future__ import annotations

import numpy as np

from fedcrm.protocol import federation_pb2 as pb
from fedcrm.secagg.quantization import pack_bits, packed_size, unpack_bits

__all__ = ["from_vector", "to_vector"]

_DTYPES = {
    pb.Vector.FLOAT32: np.dtype("<f4"),
    pb.Vector.FLOAT64: np.dtype("<f8"),
    pb.Vector.UINT32: np.dtype("<u4"),
    pb.Vector.UINT64: np.dtype("<u8"),
}
_CODES = {v: k for k, v in _DTYPES.items()}


def to_vector(array: np.ndarray, *, bits: int | None = None) -> pb.Vector:
    """``bits``: the values are integers modulo ``2**bits``, sent packed at that width (plain below 8 or at 32/64)."""
    a = np.ascontiguousarray(array).ravel()
    if bits is not None and bits not in (32, 64):
        return pb.Vector(dtype=pb.Vector.PACKED, length=a.size, bits=bits, data=pack_bits(a, bits))
    dtype = a.dtype.newbyteorder("<")
    if dtype not in _CODES:
        raise TypeError(f"cannot send {a.dtype} vectors; use float32, float64, uint32 or uint64")
    return pb.Vector(dtype=_CODES[dtype], length=a.size, data=a.astype(dtype, copy=False).tobytes())


def from_vector(message: pb.Vector, *, expected_length: int | None = None, bits: int | None = None) -> np.ndarray:
    """Decode a vector; a wrong dtype or length is a protocol error, raised as ValueError.

    ``bits``: the modulus this side derived for a masked vector; a ``PACKED`` vector must be packed at exactly
    that width (a plain ``UINT32``/``UINT64`` one is accepted too, and reduced by the caller's sum)."""
    if expected_length is not None and message.length != expected_length:
        raise ValueError(f"vector has {message.length} values, expected {expected_length}")
    if message.dtype == pb.Vector.PACKED:
        if bits is None:
            raise ValueError("a packed vector where plain numbers were expected")
        if message.bits != bits:
            raise ValueError(f"the masked vector is packed at {message.bits} bits, but this sum is modulo 2^{bits} "
                             "(do both sides have the same quantizationBits, bits and member list?)")
        if len(message.data) != packed_size(message.length, bits):
            raise ValueError(f"vector claims {message.length} values of {bits} bits but carries "
                             f"{len(message.data)} bytes")
        return unpack_bits(message.data, message.length, bits)
    dtype = _DTYPES.get(message.dtype)
    if dtype is None:
        raise ValueError(f"vector has unknown dtype code {message.dtype} (a peer speaking a newer protocol?)")
    if len(message.data) != message.length * dtype.itemsize:
        raise ValueError(f"vector claims {message.length} values but carries {len(message.data)} bytes")
    return np.frombuffer(message.data, dtype=dtype).astype(dtype.newbyteorder("="))
