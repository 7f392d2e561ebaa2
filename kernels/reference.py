"""Plain-PyTorch linear attention: the oracle for the Triton kernels and the CPU path.

Cost O(N·d²) in time and never an N×N matrix: the bidirectional form contracts keys with
values first (a d×d state per head); the causal form works in chunks of C tokens (a C×C
masked product inside a chunk plus the running d×d state of the chunks before it).

All functions take `(batch, heads, tokens, head_dim)` tensors and return the same shape as `v`.

Kinds (the paper's is `linear-affine`):
- `linear-affine`: q̂, k̂ = L2-normalised q, k. Similarity 1 + q̂·k̂. Denominator `count`
  divides by the number of attended tokens (N, or i for causal token i, 1-based); `kernel`
  divides by Σ_j (1 + q̂_i·k̂_j).
- `linear-elu`: φ = elu + 1; out_i = φ(q_i)·Σ_j φ(k_j) v_jᵀ / (φ(q_i)·Σ_j φ(k_j) + eps).
- `linear-relu`: φ = relu, same normaliser (+eps keeps an all-zero row finite).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

LINEAR_KINDS = ("linear-affine", "linear-elu", "linear-relu")
DENOMINATORS = ("count", "kernel")
CAUSAL_CHUNK = 64


def feature_map(x: torch.Tensor, kind: str) -> torch.Tensor:
    """φ applied to queries/keys (the L2 normalisation for `linear-affine`)."""
    if kind == "linear-affine":
        return F.normalize(x, dim=-1, eps=1e-6)
    if kind == "linear-elu":
        return F.elu(x) + 1.0
    if kind == "linear-relu":
        return F.relu(x)
    raise ValueError(f"unknown linear attention kind '{kind}' (known: {', '.join(LINEAR_KINDS)})")


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


def linear_attention_reference(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    kind: str = "linear-affine",
    causal: bool = False,
    denominator: str = "count",
    eps: float = 1e-6,
) -> torch.Tensor:
    """Linear attention of one kind, O(N·d²). Shapes `(batch, heads, tokens, head_dim)`."""
    if denominator not in DENOMINATORS:
        raise ValueError(f"unknown denominator '{denominator}' (known: {', '.join(DENOMINATORS)})")
    phi_q, phi_k = feature_map(q, kind), feature_map(k, kind)
    tokens = q.shape[-2]
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
    if kind == "linear-affine":
        numerator = numerator + value_sums
        if denominator == "count":
            return numerator / counts
        return numerator / (counts + (phi_q * key_sums).sum(-1, keepdim=True))
    return numerator / ((phi_q * key_sums).sum(-1, keepdim=True) + eps)
