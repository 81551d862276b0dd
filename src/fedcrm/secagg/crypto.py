"""Key agreement, authenticated encryption and mask expansion for secure aggregation.

* X25519 for both key pairs a participant advertises: ``c`` encrypts the
  shares it sends its neighbours, ``s`` agrees the pairwise mask seeds. Keys
  are fresh every round, so a seed derived from them is used in one round only.
* HKDF-SHA256 turns a raw X25519 secret into a 32-byte key; its ``info``
  names the purpose, the round and the (sorted) pair, so the same key pair can
  never yield the same key for two purposes.
* AES-256-GCM with a random 12-byte nonce for the shares, with associated
  data that binds round, stage, sender and receiver (:func:`share_aad`): the
  aggregator relays the ciphertexts and must not be able to replay one into
  another round or deliver it as if it came from someone else.
* AES-256-CTR keystream as the pseudorandom generator that expands a 32-byte
  seed into a mask vector. The nonce is all zeros: that is safe because every
  seed (a self-mask seed drawn per round, or a pairwise seed from per-round
  keys) keys exactly one keystream. One ``update_into`` call fills a numpy
  buffer directly at several GB/s; no Python loop touches elements.
"""

from __future__ import annotations

import os
import struct

import numpy as np
from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey, X25519PublicKey
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from fedcrm.secagg.quantization import vector_dtype

__all__ = [
    "KEY_BYTES",
    "NONCE_BYTES",
    "TAG_BYTES",
    "MaskExpander",
    "TamperedCiphertext",
    "agree",
    "check_public_key",
    "ciphertext_length",
    "decrypt",
    "encrypt",
    "expand_mask",
    "generate_private_key",
    "mask_info",
    "private_bytes",
    "private_from_bytes",
    "public_bytes",
    "share_aad",
    "share_key_info",
]

KEY_BYTES = 32
NONCE_BYTES = 12
TAG_BYTES = 16
_ZERO_NONCE = bytes(16)


class TamperedCiphertext(ValueError):
    """A ciphertext failed authentication: altered, truncated, or presented with the wrong context."""


def generate_private_key() -> X25519PrivateKey:
    return X25519PrivateKey.generate()


def public_bytes(private_key: X25519PrivateKey) -> bytes:
    return private_key.public_key().public_bytes_raw()


def private_bytes(private_key: X25519PrivateKey) -> bytes:
    return private_key.private_bytes_raw()


def private_from_bytes(raw: bytes) -> X25519PrivateKey:
    if len(raw) != KEY_BYTES:
        raise ValueError(f"an X25519 private key is {KEY_BYTES} bytes, got {len(raw)}")
    return X25519PrivateKey.from_private_bytes(raw)


def agree(private_key: X25519PrivateKey, peer_public_bytes: bytes, *, info: bytes) -> bytes:
    """HKDF-SHA256 (32 bytes, no salt) of the X25519 shared secret with a peer.

    Raises ``ValueError`` for a malformed public key or one of low order
    (whose shared secret would be all zeros).
    """
    if len(peer_public_bytes) != KEY_BYTES:
        raise ValueError(f"an X25519 public key is {KEY_BYTES} bytes, got {len(peer_public_bytes)}")
    shared = private_key.exchange(X25519PublicKey.from_public_bytes(bytes(peer_public_bytes)))
    return HKDF(algorithm=hashes.SHA256(), length=KEY_BYTES, salt=None, info=info).derive(shared)


def check_public_key(public: bytes) -> None:
    """Raise ``ValueError`` unless ``public`` is a usable X25519 public key.

    A key of low order makes every shared secret all zeros: a participant
    advertising one would make its neighbours fail (or agree on a known
    seed), so it is refused as soon as it is advertised. One exchange with any
    private key detects it, because clamped X25519 scalars are multiples of 8.
    """
    if not isinstance(public, bytes) or len(public) != KEY_BYTES:
        raise ValueError(f"an X25519 public key is {KEY_BYTES} bytes")
    global _PROBE_KEY
    if _PROBE_KEY is None:
        _PROBE_KEY = X25519PrivateKey.generate()
    _PROBE_KEY.exchange(X25519PublicKey.from_public_bytes(public))


_PROBE_KEY: X25519PrivateKey | None = None


def _pair_info(label: bytes, round_id: int, a: int, b: int) -> bytes:
    lo, hi = min(a, b), max(a, b)
    return label + struct.pack(">QQQ", round_id, lo, hi)


def share_key_info(round_id: int, a: int, b: int) -> bytes:
    """HKDF info of the key two participants encrypt shares with (symmetric in ``a``, ``b``)."""
    return _pair_info(b"fedcrm-secagg/share-key/v1", round_id, a, b)


def mask_info(round_id: int, a: int, b: int) -> bytes:
    """HKDF info of the pairwise mask seed of two participants (symmetric in ``a``, ``b``)."""
    return _pair_info(b"fedcrm-secagg/pairwise-mask/v1", round_id, a, b)


def share_aad(round_id: int, sender: int, receiver: int) -> bytes:
    """Associated data of a share ciphertext: stage, round, sender and receiver (ordered)."""
    return b"fedcrm-secagg/share-keys/v1" + struct.pack(">QQQ", round_id, sender, receiver)


def ciphertext_length(plaintext_length: int) -> int:
    return NONCE_BYTES + plaintext_length + TAG_BYTES


def encrypt(key: bytes, plaintext: bytes, *, aad: bytes) -> bytes:
    """AES-256-GCM; the random 12-byte nonce is prefixed to the ciphertext."""
    nonce = os.urandom(NONCE_BYTES)
    return nonce + AESGCM(key).encrypt(nonce, plaintext, aad)


def decrypt(key: bytes, ciphertext: bytes, *, aad: bytes) -> bytes:
    """Inverse of :func:`encrypt`; any authentication failure raises :class:`TamperedCiphertext`."""
    if len(ciphertext) < NONCE_BYTES + TAG_BYTES:
        raise TamperedCiphertext(f"ciphertext too short ({len(ciphertext)} bytes)")
    try:
        return AESGCM(key).decrypt(bytes(ciphertext[:NONCE_BYTES]), bytes(ciphertext[NONCE_BYTES:]), aad)
    except InvalidTag:
        raise TamperedCiphertext(
            "ciphertext failed authentication (altered, or not meant for this round, sender or receiver)"
        ) from None


def _keystream_into(seed: bytes, zeros: memoryview, out: np.ndarray) -> None:
    if len(seed) != KEY_BYTES:
        raise ValueError(f"a mask seed is {KEY_BYTES} bytes, got {len(seed)}")
    encryptor = Cipher(algorithms.AES(bytes(seed)), modes.CTR(_ZERO_NONCE)).encryptor()
    encryptor.update_into(zeros, memoryview(out).cast("B"))


def expand_mask(seed: bytes, length: int, bits: int) -> np.ndarray:
    """``length`` pseudorandom values modulo ``2**bits`` from a 32-byte seed (AES-256-CTR keystream).

    ``uint32`` for ``bits <= 32``, else ``uint64``; each value is the
    keystream word (native byte order) reduced to its low ``bits`` bits,
    which keeps it uniform. Deterministic per seed.
    """
    if isinstance(length, bool) or not isinstance(length, int) or length < 0:
        raise ValueError(f"length must be a non-negative int, got {length!r}")
    out = np.empty(length, dtype=vector_dtype(bits))
    if length:
        _keystream_into(seed, memoryview(bytes(out.nbytes)), out)
    if bits < out.dtype.itemsize * 8:
        out &= out.dtype.type((1 << bits) - 1)
    return out


class MaskExpander:
    """Expands many seeds into masks of one length through one reusable buffer.

    :meth:`keystream` returns the *unreduced* keystream words (a view of the
    buffer, valid until the next call): callers add or subtract it at machine
    width and reduce modulo ``2**bits`` once at the end, which gives the same
    result as adding :func:`expand_mask` outputs, without a mask pass or an
    allocation per seed.
    """

    def __init__(self, length: int, bits: int) -> None:
        if isinstance(length, bool) or not isinstance(length, int) or length < 0:
            raise ValueError(f"length must be a non-negative int, got {length!r}")
        self.dtype = vector_dtype(bits)
        self.bits = bits
        self._buffer = np.empty(length, dtype=self.dtype)
        self._zeros = memoryview(bytes(self._buffer.nbytes))

    def keystream(self, seed: bytes) -> np.ndarray:
        if self._buffer.size:
            _keystream_into(seed, self._zeros, self._buffer)
        return self._buffer
