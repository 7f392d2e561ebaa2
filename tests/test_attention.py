"""Linear attention (through kernels.linear_attention and the Attention module) vs a naive O(N²) oracle.

Float64 throughout, so differences are rounding only: outputs agree to ~1e-12, gradients to ~1e-9
(relu causal: the first tokens have tiny normalisers, which amplifies rounding).
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from ds_linclip.models.attention import Attention
from kernels import linear_attention

EPS = 1e-6
KIND_CASES = [
    ("linear-affine", "count"),
    ("linear-affine", "kernel"),
    ("linear-elu", "count"),
    ("linear-relu", "count"),
]


def naive_linear_attention(q, k, v, kind, causal, denominator="count", eps=EPS):
    """Builds the full (N, N) similarity matrix: the definition, written independently of kernels/."""
    tokens = q.shape[-2]
    if kind == "linear-affine":
        q_hat, k_hat = q / q.norm(dim=-1, keepdim=True), k / k.norm(dim=-1, keepdim=True)
        similarity = 1.0 + q_hat @ k_hat.transpose(-1, -2)  # (B, H, N, N)
    elif kind == "linear-elu":
        similarity = (F.elu(q) + 1) @ (F.elu(k) + 1).transpose(-1, -2)
    elif kind == "linear-relu":
        similarity = F.relu(q) @ F.relu(k).transpose(-1, -2)
    else:
        raise AssertionError(kind)
    if causal:
        allowed = torch.ones(tokens, tokens, dtype=torch.bool).tril()
        similarity = similarity * allowed
    numerator = similarity @ v
    if kind == "linear-affine" and denominator == "count":
        if causal:
            counts = torch.arange(1, tokens + 1, dtype=q.dtype).view(tokens, 1)  # token i (0-based) sees i+1
        else:
            counts = torch.full((tokens, 1), float(tokens), dtype=q.dtype)
        return numerator / counts
    if kind == "linear-affine":
        return numerator / similarity.sum(-1, keepdim=True)
    return numerator / (similarity.sum(-1, keepdim=True) + eps)


def random_qkv(batch=2, heads=3, tokens=150, head_dim=16, seed=0):
    # 150 tokens > the reference's causal chunk (64) and not a multiple of it: exercises padding + carry
    generator = torch.Generator().manual_seed(seed)
    return [
        torch.randn(batch, heads, tokens, head_dim, generator=generator, dtype=torch.float64, requires_grad=True)
        for _ in range(3)
    ]


@pytest.mark.parametrize("causal", [False, True], ids=["bidirectional", "causal"])
@pytest.mark.parametrize("kind,denominator", KIND_CASES, ids=[f"{k}-{d}" for k, d in KIND_CASES])
def test_linear_attention_matches_naive_oracle_outputs_and_gradients(kind, denominator, causal):
    q, k, v = random_qkv()
    ours = linear_attention(q, k, v, kind=kind, causal=causal, denominator=denominator, backend="torch")
    expected = naive_linear_attention(q, k, v, kind, causal, denominator)
    assert ours.shape == v.shape
    torch.testing.assert_close(ours, expected, rtol=1e-10, atol=1e-10)

    upstream = torch.randn_like(ours)
    grads_ours = torch.autograd.grad(ours, (q, k, v), upstream)
    grads_expected = torch.autograd.grad(expected, (q, k, v), upstream)
    for name, got, want in zip("qkv", grads_ours, grads_expected):
        assert got.abs().max() > 0, f"d/d{name} is all zero"
        torch.testing.assert_close(got, want, rtol=1e-7, atol=1e-8, msg=lambda m: f"d/d{name}: {m}")


def attention_module(kind, causal, denominator="count", width=48, heads=3, seed=1):
    torch.manual_seed(seed)
    return Attention(width, heads, kind=kind, causal=causal, denominator=denominator, backend="torch").double()


def module_oracle(module: Attention, x: torch.Tensor) -> torch.Tensor:
    """The module's computation with the oracle in place of the kernel; q/k/v split written out by hand."""
    batch, tokens, width = x.shape
    heads, head_dim = module.heads, module.head_dim
    weight, bias = module.qkv.weight, module.qkv.bias  # (3·width, width): rows q, then k, then v

    def project(part):  # -> (batch, heads, tokens, head_dim)
        rows = slice(part * width, (part + 1) * width)
        return (x @ weight[rows].T + bias[rows]).view(batch, tokens, heads, head_dim).transpose(1, 2)

    q, k, v = project(0), project(1), project(2)
    if module.kind == "softmax":
        scores = q @ k.transpose(-1, -2) / head_dim**0.5
        if module.causal:
            scores = scores.masked_fill(~torch.ones(tokens, tokens, dtype=torch.bool).tril(), float("-inf"))
        mixed = scores.softmax(-1) @ v
    else:
        mixed = naive_linear_attention(q, k, v, module.kind, module.causal, module.denominator)
    return module.out_proj(mixed.transpose(1, 2).reshape(batch, tokens, width))


ALL_KINDS = [("softmax", "count")] + KIND_CASES


@pytest.mark.parametrize("causal", [False, True], ids=["bidirectional", "causal"])
@pytest.mark.parametrize("kind,denominator", ALL_KINDS, ids=[f"{k}-{d}" for k, d in ALL_KINDS])
def test_attention_module_matches_oracle(kind, denominator, causal):
    module = attention_module(kind, causal, denominator)
    x = torch.randn(2, 70, module.width, dtype=torch.float64, requires_grad=True)
    ours, expected = module(x), module_oracle(module, x)
    torch.testing.assert_close(ours, expected, rtol=1e-10, atol=1e-10)
    upstream = torch.randn_like(ours)
    params = [x, module.qkv.weight, module.qkv.bias, module.out_proj.weight]
    for got, want in zip(torch.autograd.grad(ours, params, upstream), torch.autograd.grad(expected, params, upstream)):
        torch.testing.assert_close(got, want, rtol=1e-7, atol=1e-8)


@pytest.mark.parametrize("kind", ["softmax", "linear-affine", "linear-elu", "linear-relu"])
def test_causal_attention_ignores_later_tokens(kind):
    module = attention_module(kind, causal=True)
    x = torch.randn(2, 100, module.width, dtype=torch.float64)
    changed = x.clone()
    changed[:, 41:] = torch.randn_like(changed[:, 41:]) * 5  # tokens > 40 replaced
    before, after = module(x), module(changed)
    torch.testing.assert_close(after[:, :41], before[:, :41], rtol=0, atol=1e-12)
    assert (after[:, 41:] - before[:, 41:]).abs().max() > 1e-3, "later tokens should change"


@pytest.mark.parametrize("kind", ["linear-affine", "linear-elu", "linear-relu"])
def test_bidirectional_attention_sees_later_tokens(kind):
    # the converse of the causal test, so that one cannot pass by ignoring all context
    module = attention_module(kind, causal=False)
    x = torch.randn(1, 50, module.width, dtype=torch.float64)
    changed = x.clone()
    changed[:, 30:] += 1.0
    assert (module(changed)[:, :30] - module(x)[:, :30]).abs().max() > 1e-4


def test_unknown_kind_is_named():
    with pytest.raises(ValueError, match="linear-foo"):
        Attention(32, 4, kind="linear-foo")
