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
from kernels import torch_path
from kernels.torch_path import CAUSAL_DENSE_MAX_TOKENS

EPS = 1e-6
# (feature_map, denominator): every map with its default normaliser, plus the other normaliser
KIND_CASES = [
    ("affine", "count"),
    ("affine", "kernel"),
    ("focused", "kernel"),
    ("focused", "count"),
    ("elu", "kernel"),
    ("elu", "count"),
    ("relu", "kernel"),
]
KIND_IDS = [f"{k}-{d}" for k, d in KIND_CASES]


def naive_features(x, feature_map, scale=None, power=3.0):
    """φ from the definitions, written independently of kernels/."""
    if feature_map == "affine":
        return x / x.norm(dim=-1, keepdim=True).clamp_min(1e-6)
    if feature_map == "focused":  # FLatten: y = relu(x)/s, φ = ‖y‖ y^p / ‖y^p‖
        y = torch.where(x > 0, x, torch.zeros_like(x)) / scale.view(1, scale.shape[0], 1, scale.shape[1])
        y_p = y**power
        return y_p * (y.norm(dim=-1, keepdim=True) / y_p.norm(dim=-1, keepdim=True).clamp_min(1e-6))
    if feature_map == "elu":
        return F.elu(x) + 1
    if feature_map == "relu":
        return F.relu(x)
    raise AssertionError(feature_map)


def naive_linear_attention(q, k, v, feature_map, causal, denominator="count", eps=EPS, scale=None, power=3.0):
    """out_i = Σ_j s(q_i, k_j) v_j / normaliser_i with the full (N, N) matrix s (float64 oracle)."""
    q, k, v = (t.double() for t in (q, k, v))
    scale = None if scale is None else scale.double()
    tokens = q.shape[-2]
    similarity = naive_features(q, feature_map, scale, power) @ naive_features(k, feature_map, scale, power).transpose(-1, -2)
    if feature_map == "affine":
        similarity = 1.0 + similarity
    if causal:
        similarity = similarity * torch.ones(tokens, tokens, dtype=torch.bool, device=q.device).tril()
    numerator = similarity @ v
    if denominator == "count":
        if causal:
            counts = torch.arange(1, tokens + 1, dtype=q.dtype, device=q.device).view(tokens, 1)
        else:
            counts = torch.full((tokens, 1), float(tokens), dtype=q.dtype, device=q.device)
        return numerator / counts
    if feature_map == "affine":
        return numerator / similarity.sum(-1, keepdim=True)
    return numerator / (similarity.sum(-1, keepdim=True) + eps)


def random_qkv(batch, heads, tokens, head_dim, dtype=torch.float32, device="cpu", seed=0, value_dim=None):
    generator = torch.Generator().manual_seed(seed)
    shapes = [(batch, heads, tokens, head_dim)] * 2 + [(batch, heads, tokens, value_dim or head_dim)]
    return [torch.randn(s, generator=generator, dtype=torch.float64).to(device=device, dtype=dtype).requires_grad_()
            for s in shapes]


def random_scale(heads, head_dim, dtype=torch.float32, device="cpu", seed=5):
    """A positive focused-map scale (heads, head_dim) in [0.5, 1.5], as softplus of the model's parameter gives."""
    generator = torch.Generator().manual_seed(seed)
    scale = 0.5 + torch.rand(heads, head_dim, generator=generator, dtype=torch.float64)
    return scale.to(device=device, dtype=dtype).requires_grad_()


def rel_err(got: torch.Tensor, want: torch.Tensor, floor: float = 1e-4) -> float:
    """max |got - want| / max |want|; the floor keeps near-vanishing gradients (one token: out ≈ v) from
    turning rounding into huge relative errors."""
    return ((got.double() - want.double()).abs().max() / want.double().abs().max().clamp_min(floor)).item()


def check_against_oracle(fn, q, k, v, feature_map, causal, denominator, tol, grad_tol=None, seed=1, floor=1e-4,
                         power=3.0):
    """fn's output and dq, dk, dv (and the focused map's d scale) vs the float64 oracle on float64 copies."""
    scale = random_scale(q.shape[1], q.shape[3], q.dtype, q.device) if feature_map == "focused" else None
    out = fn(q, k, v, feature_map=feature_map, causal=causal, denominator=denominator, scale=scale, power=power)
    inputs = [q, k, v] + ([scale] if scale is not None else [])
    inputs64 = [t.detach().double().requires_grad_() for t in inputs]
    expected = naive_linear_attention(*inputs64[:3], feature_map, causal, denominator,
                                      scale=inputs64[3] if scale is not None else None, power=power)
    assert out.shape == v.shape and out.dtype == v.dtype
    assert rel_err(out, expected) < tol, f"output: rel err {rel_err(out, expected):.2e} >= {tol}"
    generator = torch.Generator().manual_seed(seed)
    upstream = torch.randn(out.shape, generator=generator, dtype=torch.float64).to(out.device)
    grads = torch.autograd.grad(out, inputs, upstream.to(out.dtype))
    grads_expected = torch.autograd.grad(expected, inputs64, upstream)
    for name, got, want in zip(["q", "k", "v", "scale"], grads, grads_expected):
        assert got.dtype == q.dtype and got.shape == want.shape
        err = rel_err(got, want, floor)
        assert err < (grad_tol or tol), f"d/d{name}: rel err {err:.2e} >= {grad_tol or tol}"


# ---------------------------------------------------------------------------------------------
# fast PyTorch path
# ---------------------------------------------------------------------------------------------

# 300, 1025 > CAUSAL_DENSE_MAX_TOKENS: the chunked causal branch; 50, 77 and 197: the dense masked branch
TORCH_TOKENS = [1, 7, 50, 77, 197, 300, 1025]
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
    scale = random_scale(2, 4, torch.float64) if kind == "focused" else None
    assert torch.autograd.gradcheck(
        lambda q, k, v: linear_attention_torch(q, k, v, feature_map=kind, causal=causal, denominator=denominator,
                                               scale=scale, power=3.0), (q, k, v))
    if scale is not None:  # the focused map's scale too
        assert torch.autograd.gradcheck(
            lambda s: linear_attention_torch(q, k, v, feature_map=kind, causal=causal, denominator=denominator,
                                             scale=s, power=3.0), (scale,))


def test_torch_path_non_contiguous_inputs_and_value_dim():
    """The model slices q, k, v out of one qkv projection: strided views, no copies needed."""
    generator = torch.Generator().manual_seed(3)
    qkv = torch.randn(2, 37, 3, 4, 16, generator=generator, dtype=torch.float64)  # (B, N, 3, H, d)
    q, k, v = qkv.permute(2, 0, 3, 1, 4)
    assert not q.is_contiguous()
    for causal in (False, True):
        torch.testing.assert_close(
            linear_attention_torch(q, k, v, causal=causal),
            naive_linear_attention(q, k, v, "affine", causal), rtol=1e-11, atol=1e-12)
    q, k, v = random_qkv(1, 2, 9, 16, dtype=torch.float64, value_dim=24)
    check_against_oracle(linear_attention_torch, q, k, v, "affine", False, "kernel", tol=1e-11)
    check_against_oracle(linear_attention_torch, q, k, v, "focused", False, "kernel", tol=1e-11)


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
        check_against_oracle(linear_attention_torch, q, k, v, "affine", causal, "count", tol=3e-2)
        check_against_oracle(linear_attention_torch, q, k, v, "focused", causal, "kernel", tol=3e-2)


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
    out = linear_attention(q, k, v, feature_map="elu", denominator="kernel", causal=True, backend="triton")
    assert calls == [dict(feature_map="elu", denominator="kernel", causal=True, scale=None, power=3.0, eps=1e-6)]
    torch.testing.assert_close(out, linear_attention_torch(q, k, v, feature_map="elu", denominator="kernel", causal=True))


@pytest.mark.parametrize("bad,message", [
    (dict(backend="cuda"), "unknown backend 'cuda'"),
    (dict(feature_map="softmax"), "unknown feature map 'softmax'"),
    (dict(denominator="sum"), "unknown denominator 'sum'"),
    (dict(feature_map="focused"), r"focused map needs scale of shape \(heads, head_dim\) = \(1, 16\); got None"),
    (dict(scale=torch.ones(1, 16)), "scale is only used by the focused map"),
])
def test_bad_arguments_name_the_value(bad, message):
    q, k, v = random_qkv(1, 1, 3, 16)
    for backend in ("torch", "triton"):
        with pytest.raises(ValueError, match=message):
            linear_attention(q, k, v, **{"backend": backend, **bad})
    assert set(BACKENDS) == {"auto", "torch", "triton"}


def test_focused_map_rows_without_positive_entries_match_reference():
    """relu(x) = 0 for a whole row (φ = 0) and a row with one tiny positive entry (‖y^p‖ < eps):
    the hand-written backward of the focused map must agree with autograd through the reference."""
    q, k, v = random_qkv(1, 2, 6, 8, dtype=torch.float64)
    scale = random_scale(2, 8, torch.float64)
    with torch.no_grad():
        q[0, 0, 1] = -q[0, 0, 1].abs()  # no positive entry
        k[0, 1, 3] = -k[0, 1, 3].abs()
        k[0, 1, 3, 0] = 1e-4  # one small positive entry: ‖y³‖ ~ 1e-12 < eps
    for causal in (False, True):
        for power in (3.0, 2.5):
            ours = linear_attention_torch(q, k, v, feature_map="focused", denominator="kernel", causal=causal,
                                          scale=scale, power=power)
            ref = linear_attention_reference(q, k, v, feature_map="focused", denominator="kernel", causal=causal,
                                             scale=scale, power=power)
            torch.testing.assert_close(ours, ref, rtol=1e-12, atol=1e-12)
            upstream = torch.randn_like(ours)
            inputs = (q, k, v, scale)
            for got, want in zip(torch.autograd.grad(ours, inputs, upstream), torch.autograd.grad(ref, inputs, upstream)):
                assert torch.isfinite(got).all()
                torch.testing.assert_close(got, want, rtol=1e-9, atol=1e-9)


# ---------------------------------------------------------------------------------------------
# the focused map fused by TorchInductor (kernels/torch_path.py: DS_LINCLIP_FUSE_FOCUSED)
# ---------------------------------------------------------------------------------------------


@pytest.fixture
def fresh_fusion(monkeypatch):
    """A clean record of compiled maps and compiler failures, restored after the test."""
    monkeypatch.setattr(torch_path, "_fused", {})
    monkeypatch.setattr(torch_path, "_fuse_failed", [])
    return monkeypatch


@pytest.mark.slow  # TorchInductor compiles the map's forward and backward (tens of seconds on 2 cores)
def test_fused_focused_map_matches_the_oracle(fresh_fusion):
    fresh_fusion.setenv(torch_path.FUSE_ENV, "on")
    for causal in (False, True):
        q, k, v = random_qkv(2, 3, 50, 16, dtype=torch.float64)
        check_against_oracle(linear_attention_torch, q, k, v, "focused", causal, "kernel", tol=1e-11, grad_tol=1e-9)
        q, k, v = random_qkv(1, 2, 197, 64)
        check_against_oracle(linear_attention_torch, q, k, v, "focused", causal, "kernel", tol=2e-6, grad_tol=2e-5)
    assert set(torch_path._fused) == {"forward", "backward"} and torch_path._fuse_failed == []
    # rows below the norm's eps (no positive entry; one tiny one) take the same branches compiled
    test_focused_map_rows_without_positive_entries_match_reference()
    assert torch_path._fuse_failed == []


def test_fusion_is_skipped_below_the_size_threshold_and_when_off(fresh_fusion):
    def no_compile(*args, **kwargs):
        raise AssertionError("torch.compile called")
    fresh_fusion.setattr(torch, "compile", no_compile)
    q, k, v = random_qkv(2, 3, 50, 16, dtype=torch.float64)
    assert q.numel() < torch_path.FUSE_MIN_ELEMENTS
    fresh_fusion.delenv(torch_path.FUSE_ENV, raising=False)  # auto
    check_against_oracle(linear_attention_torch, q, k, v, "focused", False, "kernel", tol=1e-11, grad_tol=1e-9)
    fresh_fusion.setenv(torch_path.FUSE_ENV, "off")
    big = torch.randn(1, 1, torch_path.FUSE_MIN_ELEMENTS // 8, 8, requires_grad=True)
    linear_attention_torch(big, big, big, feature_map="focused", denominator="kernel", scale=torch.ones(1, 8)).sum().backward()
    assert torch_path._fused == {}


def test_a_compiler_failure_warns_once_and_falls_back_to_the_eager_map(fresh_fusion):
    calls = []

    def broken_compile(fn, **kwargs):
        def run(*args):
            calls.append(fn.__name__)
            raise RuntimeError("InductorError: no working C++ compiler\n(details)")
        return run
    fresh_fusion.setattr(torch, "compile", broken_compile)
    fresh_fusion.setenv(torch_path.FUSE_ENV, "on")
    q, k, v = random_qkv(2, 3, 50, 16, dtype=torch.float64)
    with pytest.warns(RuntimeWarning, match=r"compiling the focused feature map failed \(RuntimeError: InductorError: "
                                            r"no working C\+\+ compiler\); using the eager map"):
        check_against_oracle(linear_attention_torch, q, k, v, "focused", False, "kernel", tol=1e-11, grad_tol=1e-9)
    assert calls == ["_focused_forward"]  # tried once; the backward and later calls go straight to eager
    check_against_oracle(linear_attention_torch, q, k, v, "focused", True, "kernel", tol=1e-11, grad_tol=1e-9)
    assert calls == ["_focused_forward"]


def test_a_bad_fusion_setting_names_the_variable(fresh_fusion):
    fresh_fusion.setenv(torch_path.FUSE_ENV, "yes")
    q, k, v = random_qkv(1, 1, 4, 4)
    with pytest.raises(ValueError, match=r"environment variable DS_LINCLIP_FUSE_FOCUSED='yes': expected one of auto, on, off"):
        linear_attention_torch(q, k, v, feature_map="focused", denominator="kernel", scale=torch.ones(1, 4))
