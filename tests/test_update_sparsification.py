"""Shared random sparsification (``keepFraction``): one support per round that every party derives alone, gathered
by the participants, masked and summed on k coordinates, scattered back by the aggregator."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from pydantic import ValidationError
from secagg_harness import Round

from fedcrm.protocol.vectors import from_vector, to_vector
from fedcrm.secagg.client import ProtocolViolation
from fedcrm.secagg.params import SecAggParams
from fedcrm.secagg.quantization import log2_ceil, modular_add, vector_dtype
from fedcrm.secagg.sparsification import gather, kept, scatter, support
from fedcrm.spec.manifests import FederationSpec, SecureAggregation
from fedcrm.spec.terms import terms_differences, terms_digest
from fedcrm.training.secure_vectors import expand_fit, fit_quantizer, fit_support, fit_vector

FED = "coordinator/churn"

# The support ---------------------------------------------------------------------------


@settings(max_examples=60, deadline=None)
@given(d=st.integers(1, 5000), fraction=st.floats(1e-4, 1.0), seed=st.integers(0, 2**32), round_=st.integers(0, 500))
def test_every_party_derives_the_same_support_of_exactly_k_distinct_sorted_coordinates(
        d: int, fraction: float, seed: int, round_: int) -> None:
    a = support(d, fraction, federation=FED, seed=seed, round_=round_)
    b = support(d, fraction, federation=FED, seed=seed, round_=round_)
    assert np.array_equal(a, b)
    k = kept(d, fraction)
    assert k == min(d, max(1, int(np.ceil(fraction * d))))
    assert a.shape == (k,) and a.dtype == np.int64
    assert np.all(np.diff(a) > 0) and a[0] >= 0 and a[-1] < d


def test_k_is_ceil_of_fraction_times_d_and_one_keeps_everything() -> None:
    assert kept(1000, 0.25) == 250 and kept(1001, 0.25) == 251 and kept(3, 1e-9) == 1
    assert np.array_equal(support(10, 1.0, federation=FED, seed=0, round_=1), np.arange(10))
    with pytest.raises(ValueError, match="in \\(0, 1\\]"):
        kept(10, 0.0)


def test_the_support_changes_with_the_round_the_seed_and_the_federation() -> None:
    base = support(2000, 0.1, federation=FED, seed=0, round_=1)
    for other in (support(2000, 0.1, federation=FED, seed=0, round_=2),
                  support(2000, 0.1, federation=FED, seed=1, round_=1),
                  support(2000, 0.1, federation="coordinator/other", seed=0, round_=1)):
        assert len(np.intersect1d(base, other)) < 0.25 * base.size  # about 10 % overlap by chance


def test_every_coordinate_is_kept_about_equally_often() -> None:
    """Uniform: over 400 rounds at 25 % each of 200 coordinates is kept ~100 times (binomial sd ~8.7)."""
    d, rounds = 200, 400
    counts = np.zeros(d)
    for r in range(rounds):
        counts[support(d, 0.25, federation=FED, seed=3, round_=r)] += 1
    assert counts.sum() == rounds * 50
    assert np.all(np.abs(counts - 100) < 5 * 8.7)
    # a chi-square statistic near its 199 degrees of freedom, not far above (p ~ 1e-6 at 300)
    assert ((counts - 100) ** 2 / 100).sum() < 300


@settings(max_examples=40, deadline=None)
@given(d=st.integers(1, 3000), fraction=st.floats(0.01, 1.0), seed=st.integers(0, 2**16))
def test_scatter_inverts_gather_on_the_support_and_is_zero_elsewhere(d: int, fraction: float, seed: int) -> None:
    x = np.random.default_rng(seed).normal(size=d)
    s = support(d, fraction, federation=FED, seed=seed, round_=1)
    back = scatter(gather(x, s), s, d)
    assert np.array_equal(back[s], x[s])
    off = np.ones(d, dtype=bool)
    off[s] = False
    assert np.all(back[off] == 0)
    assert np.array_equal(gather(back, s), gather(x, s))


def test_scatter_refuses_a_length_that_does_not_match_the_support() -> None:
    s = support(100, 0.25, federation=FED, seed=0, round_=1)
    with pytest.raises(ValueError, match="24 values for a support of 25"):
        scatter(np.zeros(24), s, 100)
    with pytest.raises(ValueError, match="training sum of 26 values for a support of 25"):
        expand_fit(np.zeros(26), s, 100, rescale=True)


def test_rescaling_by_d_over_k_makes_the_sparsified_step_unbiased() -> None:
    """Each coordinate is kept with probability k / d: times d / k, the mean over rounds is the full update; the
    examples and loss sum are never scaled."""
    d, rounds = 50, 4000
    full = np.concatenate([np.linspace(-1, 1, d), [7.0, 3.0]])
    mean = np.zeros(d + 2)
    for r in range(rounds):
        s = support(d, 0.2, federation=FED, seed=0, round_=r)
        total = np.concatenate([gather(full[:d], s), full[d:]])
        out = expand_fit(total, s, d, rescale=True)
        assert np.allclose(out[s], full[s] * 5) and out[d] == 7.0 and out[d + 1] == 3.0
        mean += out / rounds
    # each coordinate: a mean of 4000 draws of 5x with probability 0.2, sd 2x/sqrt(4000): within 5 sd
    assert np.all(np.abs(mean[:d] - full[:d]) <= 5 * 2 * np.abs(full[:d]) / np.sqrt(rounds) + 1e-12)
    assert np.array_equal(expand_fit(total, s, d, rescale=False)[s], full[s])


# The masked sum on the support ------------------------------------------------------------


def _masked_sum(n: int, inputs: list[np.ndarray], bits: int) -> np.ndarray:
    ids = [3 * i + 2 for i in range(n)]
    round_ = Round(n, inputs[0].size, SecAggParams(threshold=0.6, neighbours="complete", bits=bits),
                   inputs=dict(zip(ids, inputs)))
    out = round_.run()
    assert np.array_equal(out, round_.expected(ids))
    return out


def test_the_masked_sum_of_sparsified_updates_is_the_plain_sparse_sum() -> None:
    """Unquantized (the layout at ``bits`` 32): the unmasked sum, dequantized and scattered, is the plain sum of
    the updates on the support and zero off it."""
    rng = np.random.default_rng(4)
    n, d, clip = 4, 400, 1.0
    s = support(d, 0.25, federation=FED, seed=0, round_=7)
    examples = [50, 80, 120, 30]
    deltas = [rng.normal(0, 0.05, d) for _ in range(n)]
    quantizer = fit_quantizer(parameters=s.size, weight_bound=2.0 * sum(examples), clip=clip, bits=32)
    vectors = [fit_vector(gather(x, s), examples=e, loss_sum=0.4 * e, clip=clip) for x, e in zip(deltas, examples)]
    inputs = [quantizer.quantize(v) for v in vectors]
    total = expand_fit(quantizer.dequantize(_masked_sum(n, inputs, 32)), s, d, rescale=False)
    plain = sum(np.concatenate([scatter(gather(x * e, s), s, d), [e, 0.4 * e]]) for x, e in zip(deltas, examples))
    assert total.shape == (d + 2,)
    assert np.allclose(total, plain, atol=n * 2 * sum(examples) * clip / 2**31)
    off = np.setdiff1d(np.arange(d), s)
    assert np.all(total[off] == 0) and total[d] == sum(examples)


def test_the_masked_sum_of_sparsified_8_bit_updates_is_close_to_the_plain_sparse_sum() -> None:
    """With quantizationBits 8: the k kept values are what is quantized, modulo 2^(8 + ceil(log2 n))."""
    rng = np.random.default_rng(5)
    n, d, clip = 5, 1200, 1.0
    s = support(d, 0.25, federation=FED, seed=2, round_=3)
    examples = rng.integers(100, 1000, n)
    bits = 8 + log2_ceil(n)
    quantizer = fit_quantizer(parameters=s.size, weight_bound=2.0 * examples.sum(), clip=clip, bits=bits,
                              contributors=n)
    assert quantizer.size < 310  # 300 kept values, then the examples and loss sum as a few digits
    deltas = [rng.normal(0, 0.05, d) for _ in range(n)]
    vectors = [fit_vector(gather(x, s), examples=int(e), loss_sum=0.3 * e, clip=clip) for x, e in zip(deltas, examples)]
    inputs = [quantizer.quantize(v, rng).astype(vector_dtype(bits)) for v in vectors]
    total = expand_fit(quantizer.dequantize(_masked_sum(n, inputs, bits)), s, d, rescale=False)
    plain = np.zeros(quantizer.size, dtype=vector_dtype(bits))
    for v in inputs:
        modular_add(plain, v, bits)
    assert np.array_equal(total, expand_fit(quantizer.dequantize(plain), s, d, rescale=False))  # masking changed nothing
    exact = sum(scatter(gather(x * e, s), s, d) for x, e in zip(deltas, examples))
    step = 1 / quantizer.scales[0]
    assert np.all(np.abs(total[:d] - exact) < n * step)
    assert total[d] == examples.sum()


def test_a_member_that_derived_another_support_size_is_refused_not_summed() -> None:
    """keepFraction 0.25 on the aggregator, 0.3 on one member: its masked vector has another length, refused on the
    wire (the aggregator decodes with the length it derived) and by the secure sum itself."""
    d, bits = 400, 12
    agreed = fit_quantizer(parameters=kept(d, 0.25), weight_bound=1e4, clip=1.0, bits=bits, contributors=3)
    other = fit_quantizer(parameters=kept(d, 0.3), weight_bound=1e4, clip=1.0, bits=bits, contributors=3)
    wrong = other.quantize(np.zeros(kept(d, 0.3) + 2), np.random.default_rng(0)).astype(vector_dtype(bits))
    with pytest.raises(ValueError, match=f"vector has {other.size} values, expected {agreed.size}"):
        from_vector(to_vector(wrong, bits=bits), expected_length=agreed.size, bits=bits)
    round_ = Round(3, agreed.size, SecAggParams(threshold=0.6, neighbours="complete", bits=bits))
    round_.advertise()
    round_.share_keys()
    cid = round_.u2[0]
    with pytest.raises(ProtocolViolation, match=f"length {agreed.size}"):
        round_.server.receive_masked(cid, wrong)


# The setting --------------------------------------------------------------------------------


def _spec(dp: dict | None = None, **secure: object) -> FederationSpec:
    return FederationSpec.model_validate({
        "task": {"target": "converted", "features": [{"name": "visits", "type": "numeric", "bound": 10}]},
        "privacy": {"secureAggregation": {"enabled": True, **secure}, **({"differentialPrivacy": dp} if dp else {})},
    })


def test_keep_fraction_is_off_by_default_and_derived_from_the_terms() -> None:
    assert SecureAggregation().keep_fraction == 1.0 and SecureAggregation().rescale_kept
    assert fit_support(_spec(), federation=FED, round_=1, parameters=100) is None
    spec = _spec(keepFraction=0.25, quantizationBits=8)
    s = fit_support(spec, federation=FED, round_=1, parameters=100)
    assert s is not None and np.array_equal(s, support(100, 0.25, federation=FED, seed=0, round_=1))
    # part of the terms a participant compares and the digest it consents to
    assert terms_digest(spec) != terms_digest(_spec(quantizationBits=8))
    assert terms_differences(spec, _spec(quantizationBits=8)) == [
        "spec.privacy.secureAggregation.keepFraction: own 0.25, served 1.0"]


def test_keep_fraction_is_refused_where_it_does_not_compose() -> None:
    with pytest.raises(ValidationError, match="greater than 0"):
        SecureAggregation.model_validate({"enabled": True, "keepFraction": 0})
    with pytest.raises(ValidationError, match="less than or equal to 1"):
        SecureAggregation.model_validate({"enabled": True, "keepFraction": 1.5})
    with pytest.raises(ValidationError, match="keepFraction 0.5 sparsifies the masked sum"):
        SecureAggregation.model_validate({"keepFraction": 0.5})
    for mode, extra in (("client", {"clippingNorm": 1.0}), ("pooled", {})):
        with pytest.raises(ValidationError, match=f"keepFraction 0.5 cannot be combined with differentialPrivacy "
                                                  f"mode '{mode}'"):
            _spec({"mode": mode, "epsilon": 4, "delta": 1e-5, **extra}, keepFraction=0.5)
    spec = _spec({"mode": "sample", "epsilon": 4, "delta": 1e-5}, keepFraction=0.5)  # DP-SGD: post-processing
    assert fit_support(spec, federation=FED, round_=1, parameters=10) is not None
