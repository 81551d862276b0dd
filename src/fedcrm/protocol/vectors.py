"""numpy arrays <-> the wire's ``Vector`` message, with the length checked on the way in."""

from __future__ import annotations

import numpy as np

from fedcrm.protocol import federation_pb2 as pb

__all__ = ["from_vector", "to_vector"]

_DTYPES = {
    pb.Vector.FLOAT32: np.dtype("<f4"),
    pb.Vector.FLOAT64: np.dtype("<f8"),
    pb.Vector.UINT32: np.dtype("<u4"),
    pb.Vector.UINT64: np.dtype("<u8"),
}
_CODES = {v: k for k, v in _DTYPES.items()}


def to_vector(array: np.ndarray) -> pb.Vector:
    a = np.ascontiguousarray(array).ravel()
    dtype = a.dtype.newbyteorder("<")
    if dtype not in _CODES:
        raise TypeError(f"cannot send {a.dtype} vectors; use float32, float64, uint32 or uint64")
    return pb.Vector(dtype=_CODES[dtype], length=a.size, data=a.astype(dtype, copy=False).tobytes())


def from_vector(message: pb.Vector, *, expected_length: int | None = None) -> np.ndarray:
    """Decode a vector; a wrong dtype or length is a protocol error, raised as ValueError."""
    dtype = _DTYPES.get(message.dtype)
    if dtype is None:
        raise ValueError(f"vector has unknown dtype code {message.dtype}")
    if len(message.data) != message.length * dtype.itemsize:
        raise ValueError(f"vector claims {message.length} values but carries {len(message.data)} bytes")
    if expected_length is not None and message.length != expected_length:
        raise ValueError(f"vector has {message.length} values, expected {expected_length}")
    return np.frombuffer(message.data, dtype=dtype).astype(dtype.newbyteorder("="))
