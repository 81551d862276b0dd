"""Quantized training updates: stochastic rounding, the no-wrap bound of the narrow modulus, digits, bit packing."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from pydantic import ValidationError
from secagg_harness import Round

from fedcrm.protocol import pb
from fedcrm.protocol.vectors import from_vector, to_vector
from fedcrm.secagg.params import SecAggParams
from fedcrm.secagg.quantization import (
    choose_scale,
    log2_ceil,
    modular_add,
    pack_bits,
    packed_size,
    quantize,
    stochastic_round,
    unpack_bits,
    vector_dtype,
)
from fedcrm.spec.manifests import FederationSpec, SecureAggregation
from fedcrm.training.secure_vectors import LOSS_CAP, fit_quantizer, fit_vector, quantized_fit, sum_bits

# Stochastic rounding -------------------------------------------------------------


def test_stochastic_rounding_is_unbiased_and_lands_on_a_neighbouring_integer() -> None:
    rng = np.random.default_rng(1)
    x = np.array([-2.75, -0.5, 0.1, 0.9, 3.25])
    draws = np.stack([stochastic_round(x.copy(), rng) for _ in range(20_000)])
    assert np.all((draws == np.floor(x)) | (draws == np.ceil(x)))
    # standard error of a mean of 20,000 Bernoulli draws is at most 0.0036: 5 sigma
    assert np.allclose(draws.mean(axis=0), x, atol=0.018)


def test_integers_are_never_moved_by_stochastic_rounding() -> None:
    x = np.array([-3.0, 0.0, 7.0])
    assert np.array_equal(stochastic_round(x.copy(), np.random.default_rng(0)), x)


@settings(max_examples=50, deadline=None)
@given(seed=st.integers(0, 2**32 - 1), bits=st.integers(8, 40), clip=st.floats(1e-3, 1e3))
def test_stochastic_quantize_stays_within_clip_times_scale(seed: int, bits: int, clip: float) -> None:
    rng = np.random.default_rng(seed)
    scale = choose_scale(clip=clip, weight_bound=1, bits=bits)
    values = rng.uniform(-2 * clip, 2 * clip, 64)
    q = quantize(values, clip=clip, scale=scale, bits=bits, rng=rng).astype(np.int64)
    signed = np.where(q >= 1 << (bits - 1), q - (1 << bits), q)
    assert np.all(np.abs(signed) <= np.ceil(clip * scale))  # the integer M of choose_scale
    assert np.all(np.abs(signed - np.clip(values, -clip, clip) * scale) < 1)


# The no-wrap bound -----------------------------------------------------------------


def _sum(quantizer, vectors, rng):  # type: ignore[no-untyped-def]
    total = np.zeros(quantizer.size, dtype=vector_dtype(quantizer.bits))
    for v in vectors:
        modular_add(total, quantizer.quantize(v, rng), quantizer.bits)
    return total


@settings(max_examples=60, deadline=None)
@given(
    seed=st.integers(0, 2**32 - 1),
    q=st.integers(8, 16),
    n=st.integers(1, 40),
    clip=st.floats(1e-2, 10),
    data=st.data(),
)
def test_the_sum_of_n_quantized_updates_at_q_plus_log2_n_bits_never_wraps(
        seed: int, q: int, n: int, clip: float, data: st.DataObject) -> None:
    """Worst case: every element at +-clip and weights filling the whole bound, so the real sum sits at the edge
    of the range and every stochastic rounding may go outwards."""
    rng = np.random.default_rng(seed)
    members = data.draw(st.integers(n, 2 * n), label="members")  # the modulus uses the member list, n survive
    bits = q + log2_ceil(members)
    examples = data.draw(st.lists(st.integers(1, 10_000), min_size=n, max_size=n), label="examples")
    weight_bound = float(sum(examples))
    quantizer = fit_quantizer(parameters=6, weight_bound=weight_bound, clip=clip, bits=max(8, bits),
                              contributors=members)
    sign = data.draw(st.sampled_from([-1.0, 1.0]), label="sign")
    vectors = []
    for e in examples:
        delta = np.full(6, sign * clip)
        delta[3:] = rng.uniform(-clip, clip, 3)
        vectors.append(fit_vector(delta, examples=e, loss_sum=e * LOSS_CAP, clip=clip))
    out = quantizer.dequantize(_sum(quantizer, vectors, rng))
    true = np.sum(vectors, axis=0)
    step = 1 / quantizer.scales[0]
    # no wrap: the weighted sum is off by less than one step per contributor (a wrap would be 2**bits steps off)
    assert np.all(np.abs(out[:6] - true[:6]) < n * step + 1e-9 * abs(true[:6]).max())
    assert np.sign(out[0]) == sign
    assert out[6] == weight_bound  # the examples, exactly
    assert out[7] == pytest.approx(true[7], rel=1e-6)


def test_the_bound_is_tight_enough_to_matter() -> None:
    """Without the n steps of slack the worst case does wrap: the slack is what the proof needs."""
    bits, n, rng = 8, 64, np.random.default_rng(0)

    def worst_totals(scale: float) -> np.ndarray:  # n terms whose real sum is the whole bound, each just below 2 steps
        x = np.full(n, np.floor(1.0 * scale) / n / scale)
        assert x.sum() * scale <= np.floor(1.0 * scale) + 1e-9
        return np.array([quantize(x, clip=1.0, scale=scale, bits=bits, rng=rng).astype(np.int64).sum()
                         for _ in range(200)])

    assert worst_totals(choose_scale(clip=1.0, weight_bound=1, bits=bits)).max() > 127  # would read back negative
    assert worst_totals(choose_scale(clip=1.0, weight_bound=1, bits=bits, rounding_slack=n)).max() <= 127


def test_quantized_fedavg_is_close_to_the_exact_average() -> None:
    rng = np.random.default_rng(7)
    n, d, clip = 10, 2000, 1.0
    examples = rng.integers(100, 1000, n)
    deltas = [rng.normal(0, 0.05, d) for _ in range(n)]
    vectors = [fit_vector(x, examples=int(e), loss_sum=0.3 * e, clip=clip) for x, e in zip(deltas, examples)]
    quantizer = fit_quantizer(parameters=d, weight_bound=2.0 * examples.sum(), clip=clip, bits=8 + log2_ceil(n),
                              contributors=n)
    out = quantizer.dequantize(_sum(quantizer, vectors, rng))
    exact = np.sum(vectors, axis=0)
    assert out[d] == examples.sum()
    mean_err = (out[:d] - exact[:d]) / examples.sum()
    assert abs(mean_err.mean()) < 3 * mean_err.std() / np.sqrt(d) + 1e-12  # unbiased
    assert np.abs(mean_err).max() < 0.01  # a fraction of the update's scale (0.05)


def test_digits_carry_counts_a_narrow_modulus_cannot_hold() -> None:
    quantizer = fit_quantizer(parameters=1, weight_bound=1e6, clip=1.0, bits=12, contributors=10)
    assert quantizer.digit_bits == 7
    vectors = [np.array([0.0, 1e6 / 10, 1e6 / 10 * LOSS_CAP]) for _ in range(10)]
    out = quantizer.dequantize(_sum(quantizer, vectors, np.random.default_rng(0)))
    assert out[1] == 1e6 and out[2] == pytest.approx(1e6 * LOSS_CAP, rel=1e-7)


# Bit packing ---------------------------------------------------------------------------


@settings(max_examples=80, deadline=None)
@given(seed=st.integers(0, 2**32 - 1), bits=st.integers(8, 62), length=st.integers(0, 300))
def test_packing_round_trips_at_exactly_bits_per_element(seed: int, bits: int, length: int) -> None:
    rng = np.random.default_rng(seed)
    values = rng.integers(0, 1 << bits, length, dtype=np.uint64).astype(vector_dtype(bits))
    data = pack_bits(values, bits)
    assert len(data) == packed_size(length, bits) == (length * bits + 7) // 8
    back = unpack_bits(data, length, bits)
    assert back.dtype == vector_dtype(bits) and np.array_equal(back, values)


def test_packing_refuses_a_value_that_does_not_fit_and_nonzero_padding() -> None:
    with pytest.raises(ValueError, match="does not fit in 12 bits"):
        pack_bits(np.array([1 << 12], dtype=np.uint32), 12)
    data = bytearray(pack_bits(np.array([1, 2, 3], dtype=np.uint32), 12))  # 36 bits: 4 padding bits
    data[-1] |= 0x80
    with pytest.raises(ValueError, match="padding"):
        unpack_bits(bytes(data), 3, 12)


def test_the_wire_packs_masked_vectors_and_refuses_another_width() -> None:
    values = np.arange(1000, dtype=np.uint32) % 4096
    message = to_vector(values, bits=12)
    assert message.dtype == pb.Vector.PACKED and len(message.data) == 1500  # 37.5 % of float32's 4000
    assert np.array_equal(from_vector(message, expected_length=1000, bits=12), values)
    with pytest.raises(ValueError, match="packed at 12 bits, but this sum is modulo 2\\^13"):
        from_vector(message, expected_length=1000, bits=13)
    with pytest.raises(ValueError, match="packed vector where plain numbers"):
        from_vector(message, expected_length=1000)
    plain = to_vector(values.astype(np.uint32), bits=32)
    assert plain.dtype == pb.Vector.UINT32 and len(plain.data) == 4000  # bits 32: the format of protocol 4


def test_a_whole_secure_sum_masks_and_packs_modulo_the_narrow_modulus() -> None:
    """Masks are drawn modulo 2**12, each masked vector packed at 12 bits survives the wire, and the unmasked
    sum is the sum of the inputs."""
    round_ = Round(10, 300, SecAggParams(threshold=0.6, neighbours="complete", bits=12))
    round_.advertise()
    round_.share_keys()
    for cid in round_.u2:
        masked = round_.clients[cid].masked_input(round_.server.inbox_for(cid), round_.inputs[cid])
        wire = pb.Vector.FromString(to_vector(masked, bits=12).SerializeToString())
        assert len(wire.data) == 450
        round_.server.receive_masked(cid, from_vector(wire, expected_length=300, bits=12))
    round_.server.close_masked_input()
    round_.consistency()
    round_.unmask()
    assert np.array_equal(round_.server.finish(), round_.expected(round_.ids))


# The setting and the modulus both sides derive -----------------------------------------


def _spec(**secure: object) -> FederationSpec:
    return FederationSpec.model_validate({
        "task": {"target": "converted", "features": [{"name": "visits", "type": "numeric", "bound": 10}]},
        "privacy": {"secureAggregation": {"enabled": True, **secure}},
    })


def test_the_modulus_is_q_plus_log2_n_for_training_only() -> None:
    spec = _spec(quantizationBits=8)
    assert quantized_fit(spec) == 8
    assert sum_bits(spec, fit=True, members=10) == 12
    assert sum_bits(spec, fit=True, members=16) == 12
    assert sum_bits(spec, fit=True, members=17) == 13
    assert sum_bits(spec, fit=False, members=10) == 32  # evaluation counts stay at `bits`
    assert sum_bits(_spec(), fit=True, members=10) == 32  # unset: as before


def test_quantization_bits_are_validated_with_a_clear_message() -> None:
    with pytest.raises(ValidationError, match="quantizationBits must be from 8 to 24"):
        SecureAggregation.model_validate({"enabled": True, "quantizationBits": 4})
    with pytest.raises(ValidationError, match="set enabled: true"):
        SecureAggregation.model_validate({"quantizationBits": 8})
    assert SecureAggregation().quantization_bits is None
