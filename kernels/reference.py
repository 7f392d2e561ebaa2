"""Plain-PyTorch linear attention: the oracle for the Triton kernels and the CPU path.

Cost O(N·d²) in time and never an N×N matrix: the bidirectional form contracts keys with
values first (a d×d state per head); the causal form works in chunks of C tokens (a C×C
masked product inside a chunk plus the running d×d state of the chunks before it).

All functions take `(batch, heads, tokens, head_dim)` tensors and return the same shape as `v`.

A linear-attention variant is a feature map φ times a normaliser (`LinearSpec`):
- feature maps: `affine` (the paper's: φ(x) = x/‖x‖, similarity 1 + φq·φk), `focused`
  (FLatten: y = relu(x)/s with a positive per-(head, channel) scale s, φ = ‖y‖·y^p/‖y^p‖,
  similarity φq·φk), `elu` (φ = elu + 1), `relu` (φ = relu). Only `affine` has the constant 1.
- normalisers (`denominator`): `count` divides token i's sum by the number of tokens it attends
  to (N, or i 1-based when causal; the paper's); `kernel` divides by Σ_j sim(q_i, k_j), plus eps
  for every map but `affine` (whose similarities are ≥ 0 and sum to ≥ N·0).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from kernels.options import LinearOptions, linear_backend

FEATURE_MAPS = ("affine", "focused", "elu", "relu")
DENOMINATORS = ("count", "kernel")
CAUSAL_CHUNK = 64
NORM_EPS = 1e-6  # F.normalize's eps: the affine and focused maps divide by max(norm, NORM_EPS)


@dataclass(frozen=True)
class LinearSpec:
    """What the kernels need to know about a linear-attention variant (validated by the caller)."""

    feature_map: str = "affine"
    denominator: str = "count"
    power: float = 3.0  # focused map only

    def kernel_kwargs(self) -> dict:
        return {"feature_map": self.feature_map, "denominator": self.denominator, "power": self.power}


def check_linear_args(q, k, v, feature_map: str, denominator: str, scale, power: float) -> None:
    """The one argument check of the public entry point (`kernels.linear_attention`); backends trust it."""
    if feature_map not in FEATURE_MAPS:
        raise ValueError(f"unknown feature map '{feature_map}' (known: {', '.join(FEATURE_MAPS)})")
    if denominator not in DENOMINATORS:
        raise ValueError(f"unknown denominator '{denominator}' (known: {', '.join(DENOMINATORS)})")
    if q.dim() != 4 or k.shape != q.shape or v.shape[:-1] != q.shape[:-1]:
        raise ValueError(
            f"expected q, k (batch, heads, tokens, head_dim) and v (batch, heads, tokens, value_dim); "
            f"got q {tuple(q.shape)}, k {tuple(k.shape)}, v {tuple(v.shape)}")
    if feature_map == "focused":
        if scale is None or tuple(scale.shape) != (q.shape[1], q.shape[3]):
            got = None if scale is None else tuple(scale.shape)
            raise ValueError(f"the focused map needs scale of shape (heads, head_dim) = {(q.shape[1], q.shape[3])}; got {got}")
        if not power > 0:
            raise ValueError(f"focused power must be > 0, got {power}")
    elif scale is not None:
        raise ValueError(f"scale is only used by the focused map, not '{feature_map}'")


def focused_features(x: torch.Tensor, scale: torch.Tensor, power: float) -> torch.Tensor:
    """FLatten's focused map: y = relu(x)/s, φ = ‖y‖ · y^p / max(‖y^p‖, eps). x (B,H,N,D), s (H,D)."""
    y = F.relu(x) / scale[:, None, :]
    return F.normalize(y.pow(power), dim=-1, eps=NORM_EPS) * torch.linalg.vector_norm(y, dim=-1, keepdim=True)


def features(x: torch.Tensor, name: str, scale: torch.Tensor | None = None, power: float = 3.0) -> torch.Tensor:
    """φ applied to queries/keys."""
    if name == "affine":
        return F.normalize(x, dim=-1, eps=NORM_EPS)
    if name == "focused":
        return focused_features(x, scale, power)
    if name == "elu":
        return F.elu(x) + 1.0
    return F.relu(x)


def causal_product(phi_q: torch.Tensor, phi_k: torch.Tensor, v: torch.Tensor, chunk: int = CAUSAL_CHUNK) -> torch.Tensor:
    """Σ_{j≤i} (φq_i·φk_j) v_j for every i, chunked: (B,H,N,D),(B,H,N,D),(B,H,N,E) -> (B,H,N,E)."""
    batch, heads, tokens, dim = phi_q.shape
    value_dim = v.shape[-1]
    n_chunks = -(-tokens // chunk)
    pad = n_chunks * chunk - tokens
    if pad:
        phi_q, phi_k, v = (F.pad(t, (0, 0, 0, pad)) for t in (phi_q, phi_k, v))
    q_c = phi_q.reshape(batch, heads, n_chunks, chunk, dim)
    k_c = phi_k.reshape(batch, heads, n_chunks, chunk, dim)
    v_c = v.reshape(batch, heads, n_chunks, chunk, value_dim)
    mask = torch.ones(chunk, chunk, dtype=torch.bool, device=v.device).tril()
    intra = (q_c @ k_c.transpose(-1, -2)).masked_fill(~mask, 0.0) @ v_c
    chunk_states = k_c.transpose(-1, -2) @ v_c  # (B,H,nc,D,E)
    prefix_states = chunk_states.cumsum(dim=2) - chunk_states  # state of the chunks strictly before
    out = intra + q_c @ prefix_states
    return out.reshape(batch, heads, n_chunks * chunk, value_dim)[:, :, :tokens]


@linear_backend
def linear_attention_reference(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, options: LinearOptions
) -> torch.Tensor:
    """Linear attention of one variant, O(N·d²). Shapes `(batch, heads, tokens, head_dim)`; autograd
    gives every gradient (q, k, v and the focused map's scale). Keyword signature: `kernels.options`."""
    feature_map, denominator, causal, scale, power, eps = options
    phi_q = features(q, feature_map, scale, power)
    phi_k = features(k, feature_map, scale, power)
    tokens = q.shape[-2]
    affine = feature_map == "affine"
    if causal:
        numerator = causal_product(phi_q, phi_k, v)
        key_sums = phi_k.cumsum(dim=-2)  # (B,H,N,D): Σ_{j≤i} φk_j
        counts = torch.arange(1, tokens + 1, device=q.device, dtype=q.dtype).view(1, 1, tokens, 1)
        value_sums = v.cumsum(dim=-2)
    else:
        numerator = phi_q @ (phi_k.transpose(-1, -2) @ v)
        key_sums = phi_k.sum(dim=-2, keepdim=True)
        counts = torch.full((1, 1, 1, 1), float(tokens), device=q.device, dtype=q.dtype)
        value_sums = v.sum(dim=-2, keepdim=True)
    if affine:
        numerator = numerator + value_sums
    if denominator == "count":
        return numerator / counts
    rowsum = (phi_q * key_sums).sum(-1, keepdim=True)
    return numerator / (counts + rowsum) if affine else numerator / (rowsum + eps)
