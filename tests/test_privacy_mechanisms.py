"""Client-level DP mechanism: discrete Gaussian noise, distributed shares, and its fit with secure aggregation."""

from __future__ import annotations

import math

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from fedcrm.privacy.mechanisms import ClientNoise, clip_l2, discrete_gaussian, secure_uniform
from fedcrm.secagg.quantization import modular_add
from fedcrm.training.secure_vectors import client_dp_fit_quantizer, client_dp_fit_vector


def test_secure_uniforms_are_in_the_open_unit_interval() -> None:
    u = secure_uniform(100_000)
    assert u.min() > 0 and u.max() < 1
    assert abs(u.mean() - 0.5) < 0.01


@pytest.mark.parametrize("sigma", [0.7, 3.0, 250.0, 2.5e6])
def test_discrete_gaussian_is_centred_integers_with_the_right_variance(sigma: float) -> None:
    x = discrete_gaussian(sigma, 200_000)
    assert x.dtype == np.int64
    assert abs(x.mean()) < 5 * sigma / math.sqrt(len(x))
    # For sigma >= 1 the discrete Gaussian's variance is sigma^2 to many digits; below, slightly less.
    ratio = x.var() / sigma**2
    assert 0.97 < ratio < 1.03 if sigma >= 1 else 0.85 < ratio < 1.01


def _noise(t_min: int = 3, n: int = 5, d: int = 4000, sigma: float = 1.5) -> ClientNoise:
    return ClientNoise(clipping_norm=1.0, noise_multiplier=sigma, survivors_min=t_min, contributors_max=n,
                       dimension=d, bits=32)


def test_a_threshold_cohort_carries_the_full_noise() -> None:
    """Exactly t_min survivors: the sum's noise variance per element is sigma^2 * Delta^2."""
    noise = _noise()
    zero = np.zeros(noise.dimension)
    total = sum(noise.privatize(zero) for _ in range(noise.survivors_min))
    expected = (noise.noise_multiplier * noise.sensitivity) ** 2
    assert total.var() / expected == pytest.approx(1.0, abs=0.06)
    # More survivors only add noise.
    everyone = sum(noise.privatize(zero) for _ in range(noise.contributors_max))
    assert everyone.var() > total.var()


def test_noise_fits_the_quantization_range_and_the_sum_cannot_wrap() -> None:
    noise = _noise(t_min=2, n=4, d=500, sigma=30.0)
    assert noise.scale * noise.clipping_norm + 8 * noise.participant_std <= noise.element_bound
    quantizer = client_dp_fit_quantizer(noise)
    rng = np.random.default_rng(0)
    vectors = [client_dp_fit_vector(noise.privatize(rng.normal(size=500)), loss_mean=0.4) for _ in range(4)]
    acc = np.zeros(quantizer.size, dtype=np.uint32)
    for v in vectors:
        modular_add(acc, quantizer.quantize(v), 32)
    total = quantizer.dequantize(acc)
    assert np.array_equal(total[:500], np.sum(vectors, axis=0)[:500])  # integers, exactly
    assert total[500] == 4 and total[501] == pytest.approx(1.6, abs=1e-6)


def test_the_update_is_clipped_to_the_clipping_norm_before_noise() -> None:
    noise = _noise(d=10, sigma=1.0)
    big = np.full(10, 10.0)
    signal = np.mean([noise.privatize(big) for _ in range(2000)], axis=0) / noise.scale
    assert np.linalg.norm(signal) == pytest.approx(1.0, rel=0.1)


def test_too_few_bits_for_the_noise_is_refused() -> None:
    with pytest.raises(ValueError, match="raise spec.privacy.secureAggregation.bits"):
        ClientNoise(clipping_norm=1.0, noise_multiplier=500.0, survivors_min=1, contributors_max=200,
                    dimension=10_000, bits=16)


@settings(max_examples=40, deadline=None)
@given(st.lists(st.floats(-1e3, 1e3), min_size=1, max_size=50), st.floats(0.01, 100))
def test_clip_l2_never_lengthens_and_keeps_direction(values: list[float], norm: float) -> None:
    v = np.array(values)
    c = clip_l2(v, norm)
    assert np.linalg.norm(c) <= max(norm, np.linalg.norm(v)) * (1 + 1e-12)
    if np.linalg.norm(v) <= norm:
        assert np.array_equal(c, v)
