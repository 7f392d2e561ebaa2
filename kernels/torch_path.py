"""Fast PyTorch linear attention: the default on CPU (and wherever Triton is not used).

Same maths and API as `kernels.reference.linear_attention_reference`, arranged for speed:

- bidirectional: a custom autograd.Function with a hand-written backward. Forward is two
  matmuls (S = φkᵀ v, then φq S) plus one fused elementwise op; backward is four matmuls.
  φq, φk and the outputs are not kept for backward (recomputed from q, k and the saved per-token
  inverse norms), so saved memory is the inputs plus O(N) + O(d²) per head, as in the kernels.
  The reference instead lets autograd record ~15 elementwise ops on (B, H, N, d) tensors,
  which is what made it slower than SDPA at N=197.
- causal: up to CAUSAL_DENSE_MAX_TOKENS tokens a masked N×N product (one matmul pair; at N=77
  that is cheaper than chunking, whose padding, cumsum over chunk states and reshapes dominate);
  above it the chunked O(N·d²) form of the reference (its autograd graph is O(N·C) per head).
- focused map: its own autograd.Function (`_FocusedFeatures`: forward keeps only x and s, backward
  recomputes and returns dx and ds by hand, ~2x faster than autograd's dozen recorded elementwise
  ops; on CPU from FUSE_MIN_ELEMENTS elements both directions run TorchInductor-compiled, another
  ~6x); the bidirectional Function then runs on φq, φk as given (map `identity`).
"""

from __future__ import annotations

import os
import warnings
from typing import Any, Callable

import torch

from kernels.options import LinearOptions, linear_backend
from kernels.reference import NORM_EPS, causal_product, features

# Crossover measured on this CPU (1 thread, B=8, H=8, d=64, causal linear-affine fwd+bwd, ms):
#   N=77: dense 30 vs chunked 62;  N=197: 107 vs 138;  N=256: 164 vs 125;  N=384: 530 vs 204.
# Dense memory is B*H*N² floats, so the bound also keeps that small.
CAUSAL_DENSE_MAX_TOKENS = 224


def _inverse_norm(x: torch.Tensor) -> torch.Tensor:
    """1 / max(||x||, eps) over the last dim, keepdim: (..., N, 1)."""
    return torch.linalg.vector_norm(x, dim=-1, keepdim=True).clamp_min_(NORM_EPS).reciprocal_()


def _features(x: torch.Tensor, kind: str, inv_norm: torch.Tensor | None) -> torch.Tensor:
    if kind == "affine":
        return x * inv_norm
    if kind == "elu":
        return torch.nn.functional.elu(x).add_(1.0)
    if kind == "identity":
        return x
    return torch.relu(x)


def _feature_grad_(x: torch.Tensor, d_phi: torch.Tensor, kind: str, inv_norm) -> torch.Tensor:
    """dx from dφ, overwriting d_phi (a fresh temporary) to save a pass and an allocation.

    affine, φ = x/n: dx = dφ/n - x (x·dφ)/n³ (no projection term where n was clamped to eps, like F.normalize).
    elu+1: dφ * min(φ, 1) (1 for x > 0, exp(x) = φ otherwise). relu: dφ * (x > 0).
    """
    if kind == "affine":
        proj = torch.linalg.vecdot(x, d_phi).unsqueeze(-1)
        clamped = inv_norm >= torch.tensor(NORM_EPS, dtype=inv_norm.dtype).reciprocal()  # same rounding as _inverse_norm
        proj.mul_(inv_norm).mul_(inv_norm).mul_(inv_norm).masked_fill_(clamped, 0.0)
        return d_phi.mul_(inv_norm).addcmul_(x, proj, value=-1.0)
    if kind == "elu":
        return d_phi.mul_(torch.nn.functional.elu(x).add_(1.0).clamp_(max=1.0))
    if kind == "identity":
        return d_phi
    return d_phi.mul_(x > 0)


def _focused_parts(x, inv_scale, power: float):
    y = torch.relu(x).mul_(inv_scale)
    z = y * y * y if power == 3.0 else y.pow(power)
    a = torch.linalg.vector_norm(y, dim=-1, keepdim=True)
    b = torch.linalg.vector_norm(z, dim=-1, keepdim=True)
    return y, z, a, b


def _focused_forward(x: torch.Tensor, inv_scale: torch.Tensor, power: float) -> torch.Tensor:
    """φ = a·z/max(‖z‖, eps), z = y^p, a = ‖y‖, y = relu(x)·inv_scale; inv_scale (H, 1, D)."""
    _, z, a, b = _focused_parts(x, inv_scale, power)
    return z.mul_(a / b.clamp_min(NORM_EPS))


def _focused_backward(x: torch.Tensor, inv_scale: torch.Tensor, grad: torch.Tensor, power: float):
    """(dx, ds) of `_focused_forward` from dφ, recomputing y, z and the norms from x."""
    y, z, a, b = _focused_parts(x, inv_scale, power)
    big = b > NORM_EPS
    bc = b.clamp_min(NORM_EPS)
    gz = torch.linalg.vecdot(grad, z).unsqueeze(-1)  # (.., N, 1): g·z
    # d/dz of a·z/‖z‖: a(g - z (z·g)/‖z‖²)/‖z‖ (below eps the norm is the constant eps: a·g/eps)
    dz = torch.addcmul(grad, z, torch.where(big, gz / (bc * bc), torch.zeros_like(gz)), value=-1.0).mul_(a / bc)
    # dy = dz · p y^(p-1) + (g·z/bc) · y/a
    dy = dz.mul_(y * y * 3.0 if power == 3.0 else y.pow(power - 1.0).mul_(power))
    dy.addcmul_(y, (gz / bc) / a.clamp_min(torch.finfo(a.dtype).tiny))
    d_scale = (dy * y).sum(dim=(0, 2)).mul_(inv_scale[:, 0, :]).neg_()  # -Σ dy·y / s over batch, tokens
    dx = dy.mul_(inv_scale).mul_(x > 0)
    return dx, d_scale


# ---- the focused map fused by TorchInductor on CPU
# Eagerly the map is ~7 passes over (B, H, N, D) forward and ~17 backward; TorchInductor compiles each of
# `_focused_forward`/`_focused_backward` into a loop or two of C++ (measured here: the map's forward +
# backward at (128, 2, 197, 32), 1 thread, 54 ms eager -> 9 ms fused). Compiling costs ~10-30 s per new
# shape once per process (then TorchInductor's on-disk cache), so only tensors of at least
# FUSE_MIN_ELEMENTS are fused. DS_LINCLIP_FUSE_FOCUSED = auto (default: CPU tensors from that size) |
# on (any size, any device) | off (never). A compiler failure warns once and falls back to eager.
FUSE_MIN_ELEMENTS = 1 << 18
FUSE_ENV = "DS_LINCLIP_FUSE_FOCUSED"
FUSE_MODES = ("auto", "on", "off")
_fused: dict[str, Any] = {}
_fuse_failed: list[str] = []


def fuse_mode() -> str:
    mode = os.environ.get(FUSE_ENV, "auto").strip().lower() or "auto"
    if mode not in FUSE_MODES:
        raise ValueError(f"environment variable {FUSE_ENV}={os.environ[FUSE_ENV]!r}: expected one of {', '.join(FUSE_MODES)}")
    return mode


def _wants_fusion(x: torch.Tensor) -> bool:
    mode = fuse_mode()
    if mode == "off" or _fuse_failed or torch.compiler.is_compiling():
        return False
    return mode == "on" or (x.device.type == "cpu" and x.numel() >= FUSE_MIN_ELEMENTS)


def _call_focused(name: str, eager: Callable, x: torch.Tensor, *args):
    """`eager(x, *args)`, through its TorchInductor-compiled twin where `_wants_fusion(x)`."""
    if _wants_fusion(x):
        if name not in _fused:
            _fused[name] = torch.compile(eager, fullgraph=True, dynamic=None)
        try:
            return _fused[name](x, *args)
        except Exception as err:  # no C++ compiler, an inductor bug: the eager maths is the same
            _fuse_failed.append(f"{type(err).__name__}: {err}")
            warnings.warn(f"kernels.torch_path: compiling the focused feature map failed ({_fuse_failed[0].splitlines()[0]}); "
                          f"using the eager map from now on (set {FUSE_ENV}=off to skip the attempt)", RuntimeWarning)
    return eager(x, *args)


class _FocusedFeatures(torch.autograd.Function):
    """φ = a·z/max(‖z‖, eps), z = y^p, a = ‖y‖, y = relu(x)/s; x (B, H, N, D), s (H, D) -> φ (B, H, N, D)."""

    @staticmethod
    def forward(ctx, x, scale, power: float):
        ctx.save_for_backward(x, scale)
        ctx.power = power
        return _call_focused("forward", _focused_forward, x, scale.reciprocal()[:, None, :], power)

    @staticmethod
    def backward(ctx, grad):
        x, scale = ctx.saved_tensors
        dx, d_scale = _call_focused("backward", _focused_backward, x, scale.reciprocal()[:, None, :], grad, ctx.power)
        return dx, d_scale, None


def _matmul_add(row: torch.Tensor | None, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """a @ b (+ row broadcast over the token dim) as one baddbmm: one pass over the output, not two.

    a: (B, H, N, K), b: (B, H, K, M), row: (B, H, 1, M) or None -> (B, H, N, M).
    """
    if row is None:
        return a @ b
    batch, heads, tokens, _ = a.shape
    out = torch.baddbmm(row.flatten(0, 1).expand(-1, tokens, -1), a.flatten(0, 1), b.flatten(0, 1))
    return out.view(batch, heads, tokens, b.shape[-1])


class _BidirectionalLinearAttention(torch.autograd.Function):
    """out_i = (φq_i S + C Σv) / den_i, S = Σ_j φk_j v_jᵀ. See kernels/_triton_kernels.py for the notation."""

    @staticmethod
    def forward(ctx, q, k, v, kind: str, denominator: str, eps: float):
        tokens = q.shape[-2]
        affine = kind == "affine"
        count = denominator == "count"
        inv_q = _inverse_norm(q) if affine else None
        inv_k = _inverse_norm(k) if affine else None
        phi_q = _features(q, kind, inv_q)
        phi_k = _features(k, kind, inv_k)
        state = phi_k.transpose(-1, -2) @ v  # (B, H, D, E)
        value_sum = v.sum(dim=-2, keepdim=True) if affine else None
        key_sum = phi_k.sum(dim=-2, keepdim=True).transpose(-1, -2) if not count else None
        if count and affine:
            # (φq S + Σv) / N as one matmul into the broadcast mean: no N×E temporaries
            out = torch.baddbmm(
                (value_sum / tokens).flatten(0, 1).expand(-1, tokens, -1),
                phi_q.flatten(0, 1), state.flatten(0, 1), alpha=1.0 / tokens,
            ).view(v.shape)
            den = None
        elif count:
            out = (phi_q @ state).div_(tokens)
            den = None
        else:
            num = phi_q @ state
            den = phi_q @ key_sum  # (B, H, N, 1)
            if affine:
                num += value_sum
                den += tokens
            else:
                den += eps
            out = num.div_(den)
        ctx.kind, ctx.denominator, ctx.tokens = kind, denominator, tokens
        ctx.save_for_backward(q, k, v, inv_q, inv_k, state, key_sum, den)
        return out

    @staticmethod
    def backward(ctx, grad_out):
        q, k, v, inv_q, inv_k, state, key_sum, den = ctx.saved_tensors
        kind, tokens = ctx.kind, ctx.tokens
        affine = kind == "affine"
        phi_q = _features(q, kind, inv_q)
        if den is None:  # count: den = N for every token; fold 1/N into the d×d matrices
            d_phi_q = grad_out @ (state.transpose(-1, -2) / tokens)
            d_state = (phi_q.transpose(-1, -2) @ grad_out).div_(tokens)  # (B, H, D, E)
            d_value_sum = grad_out.sum(dim=-2, keepdim=True).div_(tokens) if affine else None
            d_key_sum = None
        else:
            g = grad_out / den
            num = phi_q @ state
            if affine:
                num += v.sum(dim=-2, keepdim=True)
            r = torch.linalg.vecdot(g, num).unsqueeze(-1).div_(den)  # (B, H, N, 1): dO·O / den
            d_phi_q = torch.baddbmm(
                (g @ state.transpose(-1, -2)).flatten(0, 1), r.flatten(0, 1), key_sum.transpose(-1, -2).flatten(0, 1),
                alpha=-1.0).view(q.shape)
            d_key_sum = -(phi_q.transpose(-1, -2) @ r)  # (B, H, D, 1)
            d_state = phi_q.transpose(-1, -2) @ g
            d_value_sum = g.sum(dim=-2, keepdim=True) if affine else None
        del phi_q
        d_q = _feature_grad_(q, d_phi_q, kind, inv_q)
        phi_k = _features(k, kind, inv_k)
        d_v = _matmul_add(d_value_sum, phi_k, d_state)
        del phi_k
        d_phi_k = _matmul_add(None if d_key_sum is None else d_key_sum.transpose(-1, -2), v, d_state.transpose(-1, -2))
        d_k = _feature_grad_(k, d_phi_k, kind, inv_k)
        return d_q, d_k, d_v, None, None, None


def _causal(phi_q, phi_k, v, affine: bool, denominator: str, eps: float) -> torch.Tensor:
    """Causal linear attention on φq, φk (autograd records everything)."""
    tokens = phi_q.shape[-2]
    rowsum_den = denominator == "kernel"
    if tokens <= CAUSAL_DENSE_MAX_TOKENS:
        scores = phi_q @ phi_k.transpose(-1, -2)
        if affine:
            scores = scores + 1.0
        scores = scores * torch.ones(tokens, tokens, dtype=torch.bool, device=v.device).tril()
        num = scores @ v
        rowsum = scores.sum(dim=-1, keepdim=True) if rowsum_den else None
    else:
        num = causal_product(phi_q, phi_k, v)
        if affine:
            num = num + v.cumsum(dim=-2)
        rowsum = None
        if rowsum_den:
            rowsum = (phi_q * phi_k.cumsum(dim=-2)).sum(-1, keepdim=True)
            if affine:
                rowsum = rowsum + torch.arange(1, tokens + 1, device=v.device, dtype=v.dtype).view(tokens, 1)
    if not rowsum_den:
        return num / torch.arange(1, tokens + 1, device=v.device, dtype=v.dtype).view(tokens, 1)
    return num / rowsum if affine else num / (rowsum + eps)


@linear_backend
def linear_attention_torch(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, options: LinearOptions
) -> torch.Tensor:
    """Linear attention, fast PyTorch path. q, k: (B, H, N, D); v: (B, H, N, E) -> (B, H, N, E).

    Arguments as `kernels.linear_attention` (which validates them; this path trusts its caller).
    """
    feature_map, denominator, causal, scale, power, eps = options
    affine = feature_map == "affine"
    if feature_map == "focused":  # its own Function; the products below then take φq, φk as given
        q, k, feature_map = _FocusedFeatures.apply(q, scale, power), _FocusedFeatures.apply(k, scale, power), "identity"
    if causal:
        if feature_map != "identity":
            q, k = features(q, feature_map, scale, power), features(k, feature_map, scale, power)
        return _causal(q, k, v, affine, denominator, eps)
    return _BidirectionalLinearAttention.apply(q, k, v, feature_map, denominator, eps)


__all__ = ["linear_attention_torch", "CAUSAL_DENSE_MAX_TOKENS", "FUSE_ENV", "FUSE_MIN_ELEMENTS", "fuse_mode"]


# ---- the variants (kernels.reference: VARIANT_FEATURE_MAPS, VARIANT_DENOMINATORS) on the torch path: mala
# always, pola where it does not run on Triton (CPU tensors, backend torch)
# Written with autograd (no hand-written backward yet) and O(N·d²) like the forms above: bidirectional
# through the d×d state, causal as the dense masked product up to CAUSAL_DENSE_MAX_TOKENS, chunked above.

from kernels.reference import polarity_attention  # noqa: E402

__all__ += ["variant_attention_torch"]


def _mala(phi_q: torch.Tensor, phi_k: torch.Tensor, v: torch.Tensor, causal: bool, head_dim: int, eps: float):
    """out_i = ((1 + 1/(m_i + eps))·(φq_i·Σ_j φk_j v_jᵀ)/√d - m_i Σ_j v_j)/n_i, m_i = φq_i·Σ_j φk_j/(√d n_i)."""
    tokens = phi_q.shape[-2]
    inv_sqrt_d = head_dim**-0.5
    if not causal:
        state = phi_k.transpose(-1, -2) @ v  # (B, H, D, E)
        key_mean = phi_k.mean(dim=-2, keepdim=True).transpose(-1, -2)  # (B, H, D, 1)
        mean = (phi_q @ key_mean).mul_(inv_sqrt_d)  # (B, H, N, 1): m_i
        num = (phi_q @ state).mul_(inv_sqrt_d / tokens)
        return num * (1.0 + 1.0 / (mean + eps)) - mean * v.mean(dim=-2, keepdim=True)
    counts = torch.arange(1, tokens + 1, device=v.device, dtype=v.dtype).view(tokens, 1)
    if tokens <= CAUSAL_DENSE_MAX_TOKENS:
        scores = (phi_q @ phi_k.transpose(-1, -2)) * torch.ones(tokens, tokens, dtype=torch.bool, device=v.device).tril()
        num, rowsum = scores @ v, scores.sum(dim=-1, keepdim=True)
    else:
        num, rowsum = causal_product(phi_q, phi_k, v), (phi_q * phi_k.cumsum(dim=-2)).sum(-1, keepdim=True)
    mean = rowsum * inv_sqrt_d / counts
    return (num * (inv_sqrt_d * (1.0 + 1.0 / (mean + eps))) - mean * v.cumsum(dim=-2)) / counts


def _on_features(phi_q, phi_k, v, denominator: str, causal: bool, head_dim: int, eps: float) -> torch.Tensor:
    """One normaliser on given features (no affine "1 +"): (B, H, N, D'), (B, H, N, D'), (B, H, N, E) -> (B, H, N, E)."""
    if denominator == "mala":
        return _mala(phi_q, phi_k, v, causal, head_dim, eps)
    if causal:
        return _causal(phi_q, phi_k, v, False, denominator, eps)
    return _BidirectionalLinearAttention.apply(phi_q, phi_k, v, "identity", denominator, eps)


@linear_backend
def variant_attention_torch(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, options: LinearOptions) -> torch.Tensor:
    """The variants (pola map, mala normaliser) on the torch path, O(N·d²); same maths as
    `kernels.reference.variant_attention_reference`. q, k: (B, H, N, D); v: (B, H, N, E) -> (B, H, N, E).
    options.power: the focused map's float, or pola's (H, D) tensor p."""
    feature_map, denominator, causal, scale, power, eps = options
    head_dim = q.shape[-1]
    if feature_map == "pola":
        return polarity_attention(q, k, v, scale, power, lambda phi_q, phi_k, half: _on_features(
            phi_q, phi_k, half, denominator, causal, head_dim, eps))
    if feature_map == "focused":
        phi_q, phi_k = _FocusedFeatures.apply(q, scale, power), _FocusedFeatures.apply(k, scale, power)
    else:
        phi_q, phi_k = features(q, feature_map), features(k, feature_map)
    return _on_features(phi_q, phi_k, v, denominator, causal, head_dim, eps)
