"""The variants (pola map, mala normaliser) against the quadratic float64 oracle
(`kernels.reference.variant_attention_reference`: the (N, N) score matrix built explicitly): the torch
path for all of them, the Triton path (interpreted on CPU) for pola with the kernel and count normalisers.

Every case compares outputs and the gradients of q, k, v and the variant's own inputs (the pola/focused
scale s and pola's raw power w, p = 1 + 4·sigmoid(w)), bidirectional and causal, at N = 1, 7, 50, 197
(the dense causal branch) and 300 (the chunked one).
"""

from __future__ import annotations

import pytest
import torch

from kernels import linear_attention
from kernels.reference import (features, pola_power, polarity_features, variant_attention_reference,
                               variant_score_matrices, variant_scores)
from kernels.torch_path import CAUSAL_DENSE_MAX_TOKENS, variant_attention_torch
from test_kernels import random_qkv, random_scale, rel_err

# (feature_map, denominator): pola with each normaliser, mala with each map that keeps the query's magnitude
VARIANT_CASES = [("pola", "kernel"), ("pola", "count"), ("pola", "mala"),
                 ("focused", "mala"), ("elu", "mala"), ("relu", "mala")]
VARIANT_IDS = [f"{f}-{d}" for f, d in VARIANT_CASES]
TOKENS = [1, 7, 50, 197, 300]
assert 197 <= CAUSAL_DENSE_MAX_TOKENS < 300


def variant_inputs(feature_map, heads, head_dim, dtype=torch.float64, seed=3):
    """(scale, raw power) as the module holds them (None where the map has none); power from raw."""
    scale = random_scale(heads, head_dim, dtype) if feature_map in ("focused", "pola") else None
    raw = None
    if feature_map == "pola":
        raw = torch.randn(heads, head_dim, generator=torch.Generator().manual_seed(seed), dtype=dtype).requires_grad_()
    return scale, raw


def power_of(feature_map, raw):
    return pola_power(raw) if feature_map == "pola" else 3.0


@pytest.mark.parametrize("tokens", TOKENS)
@pytest.mark.parametrize("causal", [False, True], ids=["bidirectional", "causal"])
@pytest.mark.parametrize("feature_map,denominator", VARIANT_CASES, ids=VARIANT_IDS)
def test_variant_torch_path_matches_quadratic_oracle(feature_map, denominator, causal, tokens):
    q, k, v = random_qkv(2, 2, tokens, 8, dtype=torch.float64)
    scale, raw = variant_inputs(feature_map, 2, 8)
    kwargs = dict(feature_map=feature_map, denominator=denominator, causal=causal, scale=scale)
    out = linear_attention(q, k, v, power=power_of(feature_map, raw), backend="torch", **kwargs)
    expected = variant_attention_reference(q, k, v, power=power_of(feature_map, raw), **kwargs)
    assert out.shape == v.shape
    assert rel_err(out, expected) < 1e-12, f"output: rel err {rel_err(out, expected):.2e}"
    inputs = [t for t in (q, k, v, scale, raw) if t is not None]
    upstream = torch.randn(out.shape, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    grads = torch.autograd.grad(out, inputs, upstream)
    grads_expected = torch.autograd.grad(expected, inputs, upstream)
    for name, got, want in zip(["q", "k", "v", "scale", "raw power"][:len(inputs)], grads, grads_expected):
        assert torch.isfinite(got).all(), f"d/d{name} not finite"
        assert tokens == 1 or want.abs().max() > 0, f"d/d{name} is all zero"
        assert rel_err(got, want) < 1e-8, f"d/d{name}: rel err {rel_err(got, want):.2e}"


@pytest.mark.parametrize("causal", [False, True], ids=["bidirectional", "causal"])
@pytest.mark.parametrize("feature_map,denominator", VARIANT_CASES, ids=VARIANT_IDS)
def test_variant_score_rows_sum_to_one(feature_map, denominator, causal):
    """kernel rows sum to Σ sim/(Σ sim + eps), mala rows to m/(m + eps): one wherever a query meets its keys
    (relu-based maps can give a query no overlap at all: that row is 0); causal rows see j <= i only."""
    q, k, _ = random_qkv(2, 2, 50, 8, dtype=torch.float64)
    scale, raw = variant_inputs(feature_map, 2, 8)
    power = power_of(feature_map, raw)
    if feature_map == "pola":
        phi_k = polarity_features(k, scale, power)[0]
        phi_qs = polarity_features(q, scale, power)
    else:
        phi_k, phi_qs = features(k, feature_map, scale, power), [features(q, feature_map, scale, power)]
    mask = torch.ones(50, 50, dtype=torch.bool).tril() if causal else torch.ones(50, 50, dtype=torch.bool)
    score_matrices = variant_score_matrices(q, k, feature_map, denominator, causal, scale, power)
    for scores, phi_q in zip(score_matrices, phi_qs, strict=True):
        assert scores.shape == (2, 2, 50, 50)
        assert (scores[..., ~mask] == 0).all()
        rowsum = ((phi_q @ phi_k.transpose(-1, -2)) * mask).sum(-1)
        if denominator == "count":
            torch.testing.assert_close(scores.sum(-1), rowsum / mask.sum(-1))
            continue
        if denominator == "mala":  # m_i: the mean scaled similarity
            rowsum = rowsum / 8**0.5 / mask.sum(-1)
        torch.testing.assert_close(scores.sum(-1), rowsum / (rowsum + 1e-6))
        met = rowsum > 1e-2
        assert met.float().mean() > 0.9
        torch.testing.assert_close(scores.sum(-1)[met], torch.ones_like(rowsum[met]), rtol=0, atol=1e-4)


def test_mala_sharpens_with_the_query_magnitude_and_kernel_does_not():
    """The point of mala: scaling φ(q) by a > 1 moves weight to the best-matching key; `kernel` cancels a."""
    generator = torch.Generator().manual_seed(0)
    phi_q = torch.rand(1, 1, 20, 8, generator=generator, dtype=torch.float64)
    phi_k = torch.rand(1, 1, 20, 8, generator=generator, dtype=torch.float64)
    for causal in (False, True):
        kernel = [variant_scores(a * phi_q, phi_k, "kernel", causal, 8) for a in (1.0, 4.0)]
        torch.testing.assert_close(kernel[0], kernel[1], rtol=0, atol=1e-5)  # equal up to eps
        mala = [variant_scores(a * phi_q, phi_k, "mala", causal, 8) for a in (1.0, 4.0)]
        # the top key's weight and the spread between keys grow with the magnitude
        assert (mala[1].amax(-1) > mala[0].amax(-1)).all()
        assert (mala[1].std(-1) > mala[0].std(-1))[..., 1:].all()


@pytest.mark.parametrize("causal", [False, True], ids=["bidirectional", "causal"])
def test_pola_gradcheck_scale_and_power(causal):
    q, k, v = random_qkv(1, 2, 5, 4, dtype=torch.float64)
    scale, raw = variant_inputs("pola", 2, 4)
    for denominator in ("kernel", "mala"):
        assert torch.autograd.gradcheck(
            lambda q, k, v, s, w: variant_attention_torch(q, k, v, "pola", denominator, causal, s, pola_power(w)),
            (q, k, v, scale, raw))


# pola on Triton (kernels.linear_attention.pola_attention_triton), interpreted on CPU (each call: two sweeps
# of the kernels): N = 1, non-powers-of-two 7, 197 and 300 (several interpreted blocks of 64 rows, the last
# partial), 1025 (causal: the chunk-parallel form, ranges of 256 tokens with prefix / suffix states)
# (1025 only causal with the kernel normaliser: the one code path it adds; the bidirectional kernels and
# the count normaliser run the same blocks at 197 and 300)
POLA_TRITON_CASES = [(denominator, causal, tokens) for denominator in ("kernel", "count") for causal in (False, True)
                     for tokens in (1, 7, 197, 300)]
POLA_TRITON_CASES.append(pytest.param("kernel", True, 1025, marks=pytest.mark.slow))


@pytest.mark.parametrize("denominator,causal,tokens", POLA_TRITON_CASES)
def test_pola_triton_matches_quadratic_oracle(denominator, causal, tokens):
    """Output and the gradients of q, k, v, the scale and the raw power, float64 (interpreted kernels)."""
    q, k, v = random_qkv(2, 2, tokens, 8, dtype=torch.float64)
    scale, raw = variant_inputs("pola", 2, 8)
    kwargs = dict(feature_map="pola", denominator=denominator, causal=causal, scale=scale)
    out = linear_attention(q, k, v, power=pola_power(raw), backend="triton", **kwargs)
    expected = variant_attention_reference(q, k, v, power=pola_power(raw), **kwargs)
    assert out.shape == v.shape
    assert rel_err(out, expected) < 1e-12, f"output: rel err {rel_err(out, expected):.2e}"
    inputs = [q, k, v, scale, raw]
    upstream = torch.randn(out.shape, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    grads = torch.autograd.grad(out, inputs, upstream)
    grads_expected = torch.autograd.grad(expected, inputs, upstream)
    for name, got, want in zip(["q", "k", "v", "scale", "raw power"], grads, grads_expected):
        assert torch.isfinite(got).all(), f"d/d{name} not finite"
        assert tokens == 1 or want.abs().max() > 0, f"d/d{name} is all zero"
        assert rel_err(got, want) < 1e-8, f"d/d{name}: rel err {rel_err(got, want):.2e}"


def test_pola_triton_fp32_with_zero_inputs_and_padding():
    """fp32 at the kernels' real widths (head dim 32: features 64 wide, value halves 16), inputs with exact
    zeros (where relu's gradient is cut at 0), N = 77 (not a multiple of any block): against the float64 oracle."""
    q, k, v = random_qkv(1, 2, 77, 32, dtype=torch.float64)
    q.detach()[..., ::5] = 0.0
    k.detach()[..., 1::7] = 0.0
    scale, raw = variant_inputs("pola", 2, 32)
    inputs64 = [q, k, v, scale, raw]
    inputs32 = [t.detach().float().requires_grad_() for t in inputs64]
    for causal in (False, True):
        out = linear_attention(*inputs32[:3], "pola", "kernel", causal, inputs32[3], pola_power(inputs32[4]),
                               backend="triton")
        expected = variant_attention_reference(*inputs64[:3], "pola", "kernel", causal, scale, pola_power(raw))
        assert out.dtype == torch.float32 and rel_err(out, expected) < 1e-5
        upstream = torch.randn(out.shape, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
        grads = torch.autograd.grad(out, inputs32, upstream.float())
        grads_expected = torch.autograd.grad(expected, inputs64, upstream)
        for name, got, want in zip(["q", "k", "v", "scale", "raw power"], grads, grads_expected):
            assert rel_err(got, want) < 1e-4, f"{'causal' if causal else 'bidirectional'} d/d{name}: {rel_err(got, want):.2e}"


def test_variants_refuse_triton_and_bad_arguments():
    q, k, v = random_qkv(1, 2, 7, 8, dtype=torch.float64)
    scale, raw = variant_inputs("pola", 2, 8)
    # the mala normaliser has no Triton kernel, with any map, pola included
    with pytest.raises(ValueError, match="linear attention pola/mala has no Triton kernel yet"):
        linear_attention(q, k, v, "pola", "mala", scale=scale, power=pola_power(raw), backend="triton")
    with pytest.raises(ValueError, match="linear attention elu/mala has no Triton kernel yet"):
        linear_attention(q, k, v, "elu", "mala", backend="triton")
    # auto on CPU runs every variant on the torch path (on CUDA: pola-kernel/-count on Triton, mala on torch)
    torch.testing.assert_close(linear_attention(q, k, v, "elu", "mala", backend="auto"),
                               variant_attention_torch(q, k, v, "elu", "mala"), rtol=0, atol=0)
    torch.testing.assert_close(
        linear_attention(q, k, v, "pola", "kernel", scale=scale, power=pola_power(raw), backend="auto"),
        variant_attention_torch(q, k, v, "pola", "kernel", scale=scale, power=pola_power(raw)), rtol=0, atol=0)
    with pytest.raises(ValueError, match="affine L2-normalises"):
        linear_attention(q, k, v, "affine", "mala")
    with pytest.raises(ValueError, match="power of shape"):
        linear_attention(q, k, v, "pola", "kernel", scale=scale, power=3.0)
    with pytest.raises(ValueError, match="value dim 7 is odd"):
        linear_attention(q, k, v[..., :7], "pola", "kernel", scale=scale, power=pola_power(raw))
    with pytest.raises(ValueError, match="unknown denominator"):
        linear_attention(q, k, v, "pola", "rowsum", scale=scale, power=pola_power(raw))
