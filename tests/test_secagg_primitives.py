"""The building blocks of secure aggregation: quantization, Shamir sharing, encryption, masks, the graph, parameters."""

from __future__ import annotations

import itertools
import os

import numpy as np
from uniformity import chi_square_p
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from fedcrm.secagg import crypto, shamir
from fedcrm.secagg.graph import graph_seed, neighbourhoods
from fedcrm.secagg.params import SecAggParams
from fedcrm.secagg.quantization import (
    choose_scale,
    dequantize,
    modular_add,
    modular_sub,
    quantize,
    vector_dtype,
)

# Quantization ------------------------------------------------------------------


@settings(max_examples=60, deadline=None)
@given(
    seed=st.integers(0, 2**32 - 1),
    bits=st.integers(8, 62),
    clip=st.floats(1e-3, 1e3),
    contributors=st.integers(1, 100),
)
def test_quantize_round_trip_within_half_a_step(seed: int, bits: int, clip: float, contributors: int) -> None:
    rng = np.random.default_rng(seed)
    try:
        scale = choose_scale(clip=clip, weight_bound=contributors, bits=bits)
    except ValueError:
        assert (2 ** (bits - 1) - 1) // contributors < 1
        return
    values = rng.uniform(-clip, clip, 64)
    q = quantize(values, clip=clip, scale=scale, bits=bits)
    assert q.dtype == vector_dtype(bits)
    assert int(q.max()) < 2**bits
    back = dequantize(q, scale=scale, bits=bits)
    assert back.dtype == np.float64
    float_error = 4 * np.finfo(np.float64).eps * clip  # float64 cannot hold more than 53-bit integers exactly
    assert np.all(np.abs(back - values) <= 0.5 / scale * (1 + 1e-9) + float_error)


def test_quantize_clips_and_leaves_the_input_alone() -> None:
    values = np.array([-5.0, -1.0, 0.0, 0.25, 1.0, 7.0])
    before = values.copy()
    q = quantize(values, clip=1.0, scale=100.0, bits=16)
    assert np.array_equal(values, before)
    assert dequantize(q, scale=100.0, bits=16).tolist() == [-1.0, -1.0, 0.0, 0.25, 1.0, 1.0]
    assert quantize(values.astype(np.float32), clip=1.0, scale=100.0, bits=40).dtype == np.uint64


@settings(max_examples=40, deadline=None)
@given(seed=st.integers(0, 2**32 - 1), bits=st.integers(8, 62), contributors=st.integers(1, 60))
def test_sums_at_the_extremes_never_wrap(seed: int, bits: int, contributors: int) -> None:
    """With choose_scale's scale, even ``weight_bound`` vectors all at +clip (or -clip) sum exactly."""
    if (2 ** (bits - 1) - 1) // contributors < 1:
        return
    rng = np.random.default_rng(seed)
    clip = float(rng.uniform(0.01, 100))
    scale = choose_scale(clip=clip, weight_bound=contributors, bits=bits)
    extremes = rng.choice([-1.0, 1.0], 32) * clip * rng.choice([1.0, 1.5], 32)  # at or beyond the clip
    vectors = [extremes if i % 2 == 0 else rng.uniform(-clip, clip, 32) for i in range(contributors)]
    total = np.zeros(32, dtype=vector_dtype(bits))
    exact = [0] * 32
    for v in vectors:
        q = quantize(v, clip=clip, scale=scale, bits=bits)
        modular_add(total, q, bits)
        exact = [e + int(r) for e, r in zip(exact, np.rint(np.clip(v, -clip, clip) * scale))]
    assert all(abs(e) <= 2 ** (bits - 1) - 1 for e in exact)
    signed = [int(t) - (2**bits if int(t) >= 2 ** (bits - 1) else 0) for t in total.tolist()]
    assert signed == exact
    if bits <= 52:
        back = np.rint(dequantize(total, scale=scale, bits=bits) * scale)
        assert np.array_equal(back, np.array(exact, dtype=np.float64))


def test_choose_scale_is_the_largest_safe_scale() -> None:
    scale = choose_scale(clip=2.0, weight_bound=10, bits=16)
    assert scale == ((2**15 - 1) // 10) / 2.0
    assert 10 * 2.0 * scale <= 2**15 - 1
    with pytest.raises(ValueError, match="cannot hold"):
        choose_scale(clip=1.0, weight_bound=1000, bits=8)
    with pytest.raises(ValueError, match="clip"):
        choose_scale(clip=0.0, weight_bound=1, bits=16)
    with pytest.raises(ValueError, match="choose_scale"):
        quantize(np.ones(3), clip=1.0, scale=2.0**40, bits=32)


@pytest.mark.parametrize("bits", [8, 31, 32, 33, 62])
def test_modular_add_and_sub_wrap(bits: int) -> None:
    dtype = vector_dtype(bits)
    top = 2**bits - 1
    acc = np.array([top, 0, 5], dtype=dtype)
    modular_add(acc, np.array([1, top, top], dtype=dtype), bits)
    assert acc.tolist() == [0, top, 4]
    modular_sub(acc, np.array([1, top, 5], dtype=dtype), bits)
    assert acc.tolist() == [top, 0, top]
    with pytest.raises(TypeError):
        modular_add(acc, acc.astype(np.int64), bits)


# Shamir ---------------------------------------------------------------------


@settings(max_examples=40, deadline=None)
@given(data=st.data(), n=st.integers(1, 12), secret_length=st.sampled_from([1, 15, 16, 32, 45]))
def test_shamir_any_t_shares_rebuild_and_t_minus_one_do_not(data: st.DataObject, n: int, secret_length: int) -> None:
    t = data.draw(st.integers(1, n), label="t")
    ids = data.draw(st.lists(st.integers(0, 2**40), min_size=n, max_size=n, unique=True), label="ids")
    secret = os.urandom(secret_length)
    shares = shamir.split(secret, xs=[i + 1 for i in ids], threshold=t)
    assert all(len(s) == shamir.share_length(secret_length) for s in shares.values())
    subset = data.draw(st.lists(st.sampled_from(sorted(shares)), min_size=t, max_size=n, unique=True), label="subset")
    chosen = {x: shares[x] for x in subset}
    assert shamir.reconstruct(chosen, threshold=t, secret_length=secret_length) == secret
    assert shamir.reconstruct_many([chosen, chosen], threshold=t, secret_length=secret_length) == [secret, secret]
    with pytest.raises(shamir.NotEnoughShares):
        shamir.reconstruct(dict(list(chosen.items())[: t - 1]), threshold=t, secret_length=secret_length)


def test_shamir_every_subset_of_a_small_sharing() -> None:
    secret = os.urandom(32)
    shares = shamir.split(secret, xs=range(1, 7), threshold=3)
    for subset in itertools.combinations(shares, 3):
        assert shamir.reconstruct({x: shares[x] for x in subset}, threshold=3, secret_length=32) == secret


def test_shamir_t_minus_one_shares_fit_any_secret() -> None:
    """Hiding: for one share of a 2-of-n sharing and ANY other secret, some second share rebuilds that secret."""
    secret, other = os.urandom(15), os.urandom(15)
    shares = shamir.split(secret, xs=[1, 2, 3], threshold=2)
    y1 = int.from_bytes(shares[1], "big")
    # The line through (0, other) and (1, y1) passes through (2, forged).
    forged = ((2 * y1 - int.from_bytes(other, "big")) % shamir.PRIME).to_bytes(16, "big")
    assert shamir.reconstruct({1: shares[1], 2: forged}, threshold=2, secret_length=15) == other
    assert shamir.reconstruct({1: shares[1], 2: shares[2]}, threshold=2, secret_length=15) == secret
    assert shares[1] != shamir.split(secret, xs=[1, 2, 3], threshold=2)[1]  # fresh coefficients every time


def test_shamir_rejects_bad_input() -> None:
    with pytest.raises(ValueError, match="never|points"):
        shamir.split(b"x", xs=[0, 1], threshold=1)
    with pytest.raises(ValueError, match="distinct"):
        shamir.split(b"x", xs=[1, 1], threshold=1)
    with pytest.raises(ValueError, match="threshold"):
        shamir.split(b"x", xs=[1, 2], threshold=3)
    shares = shamir.split(os.urandom(32), xs=[1, 2, 3], threshold=2)
    with pytest.raises(ValueError, match="bytes"):
        shamir.reconstruct({1: shares[1], 2: shares[2][:-1]}, threshold=2, secret_length=32)
    assert issubclass(shamir.NotEnoughShares, ValueError)


# Encryption -----------------------------------------------------------------


def _pair_key() -> tuple[bytes, bytes]:
    a, b = crypto.generate_private_key(), crypto.generate_private_key()
    info = crypto.share_key_info(3, 1, 2)
    k_ab = crypto.agree(a, crypto.public_bytes(b), info=info)
    k_ba = crypto.agree(b, crypto.public_bytes(a), info=crypto.share_key_info(3, 2, 1))
    return k_ab, k_ba


def test_key_agreement_is_symmetric_and_purpose_bound() -> None:
    a, b = crypto.generate_private_key(), crypto.generate_private_key()
    k1 = crypto.agree(a, crypto.public_bytes(b), info=crypto.mask_info(1, 4, 9))
    assert k1 == crypto.agree(b, crypto.public_bytes(a), info=crypto.mask_info(1, 9, 4))
    assert k1 != crypto.agree(a, crypto.public_bytes(b), info=crypto.mask_info(2, 4, 9))
    assert k1 != crypto.agree(a, crypto.public_bytes(b), info=crypto.share_key_info(1, 4, 9))
    raw = crypto.private_bytes(a)
    assert crypto.public_bytes(crypto.private_from_bytes(raw)) == crypto.public_bytes(a)
    with pytest.raises(ValueError):
        crypto.check_public_key(bytes(32))  # low order: every shared secret would be zero


@settings(max_examples=25, deadline=None)
@given(plaintext=st.binary(max_size=200), flip=st.integers(0, 10_000))
def test_encrypt_round_trip_and_tampering(plaintext: bytes, flip: int) -> None:
    k_ab, k_ba = _pair_key()
    assert k_ab == k_ba
    aad = crypto.share_aad(3, 1, 2)
    ct = crypto.encrypt(k_ab, plaintext, aad=aad)
    assert len(ct) == crypto.ciphertext_length(len(plaintext))
    assert crypto.decrypt(k_ba, ct, aad=aad) == plaintext
    tampered = bytearray(ct)
    tampered[flip % len(ct)] ^= 1 << (flip % 8)
    with pytest.raises(crypto.TamperedCiphertext):
        crypto.decrypt(k_ba, bytes(tampered), aad=aad)
    with pytest.raises(crypto.TamperedCiphertext):
        crypto.decrypt(k_ba, ct[:-1], aad=aad)


def test_aad_binds_round_sender_and_receiver() -> None:
    key, _ = _pair_key()
    ct = crypto.encrypt(key, b"share", aad=crypto.share_aad(3, 1, 2))
    for wrong in (crypto.share_aad(4, 1, 2), crypto.share_aad(3, 5, 2), crypto.share_aad(3, 2, 1)):
        with pytest.raises(crypto.TamperedCiphertext, match="authentication"):
            crypto.decrypt(key, ct, aad=wrong)
    assert issubclass(crypto.TamperedCiphertext, ValueError)


# Masks ----------------------------------------------------------------------


@pytest.mark.parametrize("bits", [8, 20, 32, 33, 62])
def test_expand_mask_is_deterministic_and_sized(bits: int) -> None:
    seed = bytes(range(32))
    m = crypto.expand_mask(seed, 1001, bits)
    assert m.dtype == vector_dtype(bits) and m.shape == (1001,)
    assert int(m.max()) < 2**bits
    assert np.array_equal(m, crypto.expand_mask(seed, 1001, bits))
    other = crypto.expand_mask(bytes(31) + b"\x01", 1001, bits)
    assert np.mean(m == other) < 0.05
    assert np.array_equal(crypto.expand_mask(seed, 10, bits), m[:10])  # a prefix of the same keystream
    assert crypto.expand_mask(seed, 0, bits).shape == (0,)
    # The reusable expander gives the same values modulo 2**bits.
    raw = crypto.MaskExpander(1001, bits).keystream(seed)
    assert np.array_equal(raw & raw.dtype.type(2**bits - 1), m)


def test_expand_mask_looks_uniform() -> None:
    m = crypto.expand_mask(b"\x42" * 32, 1 << 18, 32)
    byte_counts = np.bincount(m.view(np.uint8), minlength=256)
    assert chi_square_p(byte_counts) > 0.001
    top = np.bincount((m >> np.uint32(24)).astype(np.int64), minlength=256)
    assert chi_square_p(top) > 0.001
    low = crypto.expand_mask(b"\x43" * 32, 1 << 16, 12)
    assert chi_square_p(np.bincount((low >> np.uint32(4)).astype(np.int64), minlength=256)) > 0.001


def test_chi_square_helper_rejects_skew() -> None:
    skewed = np.full(256, 1000)
    skewed[:16] = 1200
    assert chi_square_p(skewed) < 0.001


# Graph ----------------------------------------------------------------------


@settings(max_examples=60, deadline=None)
@given(
    ids=st.lists(st.integers(0, 10_000), min_size=1, max_size=40, unique=True),
    k=st.integers(0, 45),
    seed=st.binary(min_size=32, max_size=32),
)
def test_graph_is_symmetric_with_degree_k(ids: list[int], k: int, seed: bytes) -> None:
    graph = neighbourhoods(ids, k, seed)
    n = len(ids)
    assert set(graph) == set(ids)
    for u, nb in graph.items():
        assert u not in nb and len(set(nb)) == len(nb) and list(nb) == sorted(nb)
        for v in nb:
            assert u in graph[v]
    degrees = sorted(len(nb) for nb in graph.values())
    if k >= n - 1:
        assert degrees == [n - 1] * n
    elif (n * k) % 2 == 0:
        assert degrees == [k] * n
    else:
        assert degrees == [k] * (n - 1) + [k + 1]
    assert neighbourhoods(list(reversed(ids)), k, seed) == graph


def test_graph_depends_on_the_public_seed() -> None:
    ids = list(range(40))
    a = neighbourhoods(ids, 4, b"\x00" * 32)
    assert a == neighbourhoods(ids, 4, b"\x00" * 32)
    assert a != neighbourhoods(ids, 4, b"\x01" * 32)
    keys = {i: (bytes([i]) * 32, bytes([i + 100]) * 32) for i in range(5)}
    s = graph_seed(9, keys)
    assert len(s) == 32 and s == graph_seed(9, dict(reversed(list(keys.items()))))
    assert s != graph_seed(10, keys)
    assert s != graph_seed(9, {**keys, 4: (b"\x07" * 32, keys[4][1])})


# Parameters -----------------------------------------------------------------


def test_params_neighbour_counts_and_thresholds() -> None:
    assert SecAggParams().neighbour_count(50) == 49
    log = SecAggParams(neighbours="logarithmic")
    assert log.neighbour_count(50) == 18 and log.neighbour_count(1000) == 30 and log.neighbour_count(5) == 4
    assert all(log.neighbour_count(n) % 2 == 0 or log.neighbour_count(n) == n - 1 for n in range(2, 300))
    assert SecAggParams(neighbours=3).neighbour_count(50) == 3
    assert SecAggParams(neighbours=30).neighbour_count(4) == 3
    p = SecAggParams(threshold=0.51)
    assert p.shares_needed(3) == 3  # 3 of 4: a strict majority
    assert p.shares_needed(1) == 2  # never 1: a single share would be the secret
    assert SecAggParams().threshold == 0.6 and SecAggParams().shares_needed(18) == 12  # n=50, logarithmic
    assert SecAggParams(threshold=1.0).shares_needed(5) == 6
    assert SecAggParams(threshold=0.7).shares_needed(9) == 7


@given(threshold=st.floats(0.5, 1.0, exclude_min=True), k=st.integers(1, 2000))
def test_shares_needed_is_always_a_strict_majority_of_the_holders(threshold: float, k: int) -> None:
    """The bound the threat model rests on: 2t > k + 1, so two disjoint groups of honest holders cannot each
    reach t (one revealing a self-mask, one the mask key; or each signing a different survivor set)."""
    t = SecAggParams(threshold=threshold).shares_needed(k)
    assert 2 * t > k + 1 and 2 <= t <= k + 1


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"threshold": 0.0}, r"threshold must be in \(0.5, 1\]"),
        ({"threshold": 0.5}, r"threshold must be in \(0.5, 1\]"),
        ({"threshold": 1.5}, r"threshold must be in \(0.5, 1\]"),
        ({"threshold": float("nan")}, "threshold"),
        ({"threshold": "half"}, "threshold must be a number"),
        ({"neighbours": "ring"}, "'complete', 'logarithmic' or a positive int"),
        ({"neighbours": 0}, "at least 1"),
        ({"neighbours": True}, "bool"),
        ({"bits": 7}, "from 8 to 62"),
        ({"bits": 64}, "from 8 to 62"),
    ],
)
def test_params_validation_says_what_to_fix(kwargs: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        SecAggParams(**kwargs)


def test_params_reject_impossible_sizes() -> None:
    with pytest.raises(ValueError, match="at least one neighbour"):
        SecAggParams().shares_needed(0)
    with pytest.raises(ValueError, match="positive"):
        SecAggParams().neighbour_count(0)
