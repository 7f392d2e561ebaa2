"""kernels/: the fast PyTorch path and the dispatch, against a naive O(N²) float64 oracle.

The oracle below builds the full N×N similarity matrix from the definition; it is written
independently of kernels/ and lives only here (tests/test_kernels_triton.py imports it).
Errors are measured relative to the largest reference magnitude (`rel_err`, floored), since relu/elu
causal normalisers can be tiny for the first tokens and amplify rounding elementwise.
"""

from __future__ import annotations

import importlib

import pytest
import torch
import torch.nn.functional as F

from kernels import BACKENDS, linear_attention, linear_attention_reference, linear_attention_torch
from kernels.torch_path import CAUSAL_DENSE_MAX_TOKENS

EPS = 1e-6
KIND_CASES = [
    ("linear-affine", "count"),
    ("linear-affine", "kernel"),
    ("linear-elu", "count"),
    ("linear-relu", "count"),
]
KIND_IDS = [f"{k}-{d}" for k, d in KIND_CASES]


def naive_linear_attention(q, k, v, kind, causal, denominator="count", eps=EPS):
    """out_i = Σ_j s(q_i, k_j) v_j / normaliser_i with the full (N, N) matrix s (float64 oracle)."""
    q, k, v = (t.double() for t in (q, k, v))
    tokens = q.shape[-2]
    if kind == "linear-affine":
        q_hat = q / q.norm(dim=-1, keepdim=True).clamp_min(1e-6)
        k_hat = k / k.norm(dim=-1, keepdim=True).clamp_min(1e-6)
        similarity = 1.0 + q_hat @ k_hat.transpose(-1, -2)
    elif kind == "linear-elu":
        similarity = (F.elu(q) + 1) @ (F.elu(k) + 1).transpose(-1, -2)
    elif kind == "linear-relu":
        similarity = F.relu(q) @ F.relu(k).transpose(-1, -2)
    else:
        raise AssertionError(kind)
    if causal:
        similarity = similarity * torch.ones(tokens, tokens, dtype=torch.bool, device=q.device).tril()
    numerator = similarity @ v
    if kind == "linear-affine" and denominator == "count":
        if causal:
            counts = torch.arange(1, tokens + 1, dtype=q.dtype, device=q.device).view(tokens, 1)
        else:
            counts = torch.full((tokens, 1), float(tokens), dtype=q.dtype, device=q.device)
        return numerator / counts
    if kind == "linear-affine":
        return numerator / similarity.sum(-1, keepdim=True)
    return numerator / (similarity.sum(-1, keepdim=True) + eps)


def random_qkv(batch, heads, tokens, head_dim, dtype=torch.float32, device="cpu", seed=0, value_dim=None):
    generator = torch.Generator().manual_seed(seed)
    shapes = [(batch, heads, tokens, head_dim)] * 2 + [(batch, heads, tokens, value_dim or head_dim)]
    return [torch.randn(s, generator=generator, dtype=torch.float64).to(device=device, dtype=dtype).requires_grad_()
            for s in shapes]


def rel_err(got: torch.Tensor, want: torch.Tensor, floor: float = 1e-4) -> float:
    """max |got - want| / max |want|; the floor keeps near-vanishing gradients (one token: out ≈ v) from
    turning rounding into huge relative errors."""
    return ((got.double() - want.double()).abs().max() / want.double().abs().max().clamp_min(floor)).item()


def check_against_oracle(fn, q, k, v, kind, causal, denominator, tol, grad_tol=None, seed=1, floor=1e-4):
    """fn's output and dq, dk, dv vs the float64 oracle on float64 copies of the same inputs."""
    out = fn(q, k, v, kind=kind, causal=causal, denominator=denominator)
    q64, k64, v64 = (t.detach().double().requires_grad_() for t in (q, k, v))
    expected = naive_linear_attention(q64, k64, v64, kind, causal, denominator)
    assert out.shape == v.shape and out.dtype == v.dtype
    assert rel_err(out, expected) < tol, f"output: rel err {rel_err(out, expected):.2e} >= {tol}"
    generator = torch.Generator().manual_seed(seed)
    upstream = torch.randn(out.shape, generator=generator, dtype=torch.float64).to(out.device)
    grads = torch.autograd.grad(out, (q, k, v), upstream.to(out.dtype))
    grads_expected = torch.autograd.grad(expected, (q64, k64, v64), upstream)
    for name, got, want in zip("qkv", grads, grads_expected):
        assert got.dtype == q.dtype and got.shape == want.shape
        err = rel_err(got, want, floor)
        assert err < (grad_tol or tol), f"d/d{name}: rel err {err:.2e} >= {grad_tol or tol}"


# ---------------------------------------------------------------------------------------------
# fast PyTorch path
# ---------------------------------------------------------------------------------------------

# 300 > CAUSAL_DENSE_MAX_TOKENS: the chunked causal branch; 77 and 197: the dense masked branch
TORCH_TOKENS = [1, 7, 77, 197, 300]
assert max(TORCH_TOKENS) > CAUSAL_DENSE_MAX_TOKENS > 197


@pytest.mark.parametrize("tokens", TORCH_TOKENS)
@pytest.mark.parametrize("causal", [False, True], ids=["bidirectional", "causal"])
@pytest.mark.parametrize("kind,denominator", KIND_CASES, ids=KIND_IDS)
def test_torch_path_matches_oracle_float64(kind, denominator, causal, tokens):
    q, k, v = random_qkv(2, 3, tokens, 16, dtype=torch.float64)
    check_against_oracle(linear_attention_torch, q, k, v, kind, causal, denominator, tol=1e-11, grad_tol=1e-9)


@pytest.mark.parametrize("causal", [False, True], ids=["bidirectional", "causal"])
@pytest.mark.parametrize("kind,denominator", KIND_CASES, ids=KIND_IDS)
def test_torch_path_float32_head_dim_64_and_80(kind, denominator, causal):
    for head_dim in (64, 80):
        q, k, v = random_qkv(1, 2, 197, head_dim)
        check_against_oracle(linear_attention_torch, q, k, v, kind, causal, denominator, tol=2e-6, grad_tol=2e-5)


@pytest.mark.parametrize("causal", [False, True], ids=["bidirectional", "causal"])
@pytest.mark.parametrize("kind,denominator", KIND_CASES, ids=KIND_IDS)
def test_torch_path_gradcheck(kind, denominator, causal):
    q, k, v = random_qkv(1, 2, 5, 4, dtype=torch.float64)
    assert torch.autograd.gradcheck(
        lambda q, k, v: linear_attention_torch(q, k, v, kind=kind, causal=causal, denominator=denominator), (q, k, v))


def test_torch_path_non_contiguous_inputs_and_value_dim():
    """The model slices q, k, v out of one qkv projection: strided views, no copies needed."""
    generator = torch.Generator().manual_seed(3)
    qkv = torch.randn(2, 37, 3, 4, 16, generator=generator, dtype=torch.float64)  # (B, N, 3, H, d)
    q, k, v = qkv.permute(2, 0, 3, 1, 4)
    assert not q.is_contiguous()
    for causal in (False, True):
        torch.testing.assert_close(
            linear_attention_torch(q, k, v, causal=causal),
            naive_linear_attention(q, k, v, "linear-affine", causal), rtol=1e-11, atol=1e-12)
    q, k, v = random_qkv(1, 2, 9, 16, dtype=torch.float64, value_dim=24)
    check_against_oracle(linear_attention_torch, q, k, v, "linear-affine", False, "kernel", tol=1e-11)


def test_torch_path_zero_vector_matches_reference_gradient():
    """A zero query/key row: F.normalize clamps the norm to eps; our hand-written backward must agree."""
    q, k, v = random_qkv(1, 1, 6, 8, dtype=torch.float64)
    with torch.no_grad():
        q[0, 0, 2].zero_()
        k[0, 0, 4].mul_(1e-8)  # below eps, nonzero
    for denominator in ("count", "kernel"):
        ours = linear_attention_torch(q, k, v, denominator=denominator)
        ref = linear_attention_reference(q, k, v, denominator=denominator)
        torch.testing.assert_close(ours, ref, rtol=1e-12, atol=1e-12)
        upstream = torch.randn_like(ours)
        for got, want in zip(torch.autograd.grad(ours, (q, k, v), upstream), torch.autograd.grad(ref, (q, k, v), upstream)):
            torch.testing.assert_close(got, want, rtol=1e-9, atol=1e-9)


def test_torch_path_bfloat16_close_to_float64():
    q, k, v = random_qkv(2, 2, 77, 32, dtype=torch.bfloat16)
    for causal in (False, True):
        check_against_oracle(linear_attention_torch, q, k, v, "linear-affine", causal, "count", tol=3e-2)


# ---------------------------------------------------------------------------------------------
# dispatch
# ---------------------------------------------------------------------------------------------


def test_function_not_shadowed_by_the_triton_module():
    import kernels

    importlib.import_module("kernels.linear_attention")
    from kernels import linear_attention as entry_point

    assert callable(entry_point) and entry_point is kernels.linear_attention
    assert entry_point.__module__ == "kernels"


def test_auto_backend_on_cpu_is_the_torch_path():
    q, k, v = random_qkv(1, 2, 33, 16)
    for causal in (False, True):
        assert torch.equal(linear_attention(q, k, v, causal=causal), linear_attention_torch(q, k, v, causal=causal))
        assert torch.equal(linear_attention(q, k, v, causal=causal, backend="torch"),
                           linear_attention_torch(q, k, v, causal=causal))


def test_forced_triton_backend_runs_the_triton_wrapper(monkeypatch):
    triton_module = importlib.import_module("kernels.linear_attention")  # `kernels.linear_attention` is the function

    calls = []
    original = triton_module.linear_attention_triton
    monkeypatch.setattr(triton_module, "linear_attention_triton",
                        lambda *a, **kw: calls.append(kw) or original(*a, **kw))
    q, k, v = random_qkv(1, 1, 3, 16)
    out = linear_attention(q, k, v, kind="linear-elu", causal=True, backend="triton")
    assert calls == [dict(kind="linear-elu", causal=True, denominator="count", eps=1e-6)]
    torch.testing.assert_close(out, linear_attention_torch(q, k, v, kind="linear-elu", causal=True))


@pytest.mark.parametrize("bad,message", [
    (dict(backend="cuda"), "unknown backend 'cuda'"),
    (dict(kind="softmax"), "unknown linear attention kind 'softmax'"),
    (dict(denominator="sum"), "unknown denominator 'sum'"),
])
def test_bad_arguments_name_the_value(bad, message):
    q, k, v = random_qkv(1, 1, 3, 16)
    for backend in ("torch", "triton"):
        with pytest.raises(ValueError, match=message):
            linear_attention(q, k, v, **{"backend": backend, **bad})
    assert set(BACKENDS) == {"auto", "torch", "triton"}
