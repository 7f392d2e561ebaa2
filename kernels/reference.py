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


# ---------------------------------------------------------------------------------------------
# Variants: the polarity map (Triton with the kernel/count normalisers on materialised features, see
# kernels.linear_attention.pola_attention_triton; else the torch path) and the MALA normaliser (torch path only).
# Their oracle below is quadratic on purpose: it builds the (N, N) score matrix A explicitly, so
# out = A @ v can be checked row by row (rows of `kernel` and `mala` scores sum to one).
# ---------------------------------------------------------------------------------------------

# `pola` (PolaFormer): x± = relu(±x)/s per (head, channel), φ_same = [x+^p, x-^p], φ_opp = [x-^p, x+^p]
# (2·head_dim wide), keys always φ_same; the first half of v's channels mixes through the same-sign
# similarity φ_same(q)·φ(k) = q+·k+ + q-·k-, the second half through the opposite-sign one q-·k+ + q+·k-.
# The power p is learnable per (head, channel): p = 1 + POLA_POWER_RANGE·sigmoid(w), w = 0 -> p = 3.
VARIANT_FEATURE_MAPS = ("pola",)
# `mala` (magnitude-aware): with s_ij = φq_i·φk_j/√head_dim and m_i its mean over the n_i attended keys,
# A_ij = ((1 + 1/(m_i + eps))·s_ij - m_i)/n_i: rows sum to m_i/(m_i + eps) (one up to eps), and scaling
# φq by a sharpens the row (the s_ij - m_i part grows with a) instead of cancelling as `kernel` does.
VARIANT_DENOMINATORS = ("mala",)
ALL_FEATURE_MAPS = FEATURE_MAPS + VARIANT_FEATURE_MAPS
ALL_DENOMINATORS = DENOMINATORS + VARIANT_DENOMINATORS
POLA_POWER_RANGE = 4.0


def is_variant(feature_map: str, denominator: str) -> bool:
    """Whether (feature_map, denominator) is one of the variants above (checked by `check_variant_args`)."""
    return feature_map in VARIANT_FEATURE_MAPS or denominator in VARIANT_DENOMINATORS


def pola_power(raw: torch.Tensor) -> torch.Tensor:
    """The polarity map's power p = 1 + POLA_POWER_RANGE·sigmoid(raw), raw (heads, head_dim) -> same shape, in (1, 5)."""
    return 1.0 + POLA_POWER_RANGE * torch.sigmoid(raw)


def check_variant_args(q, k, v, feature_map: str, denominator: str, scale, power) -> None:
    """The argument check of the variants (`is_variant`); the entry point calls it."""
    if feature_map not in ALL_FEATURE_MAPS:
        raise ValueError(f"unknown feature map '{feature_map}' (known: {', '.join(ALL_FEATURE_MAPS)})")
    if denominator not in ALL_DENOMINATORS:
        raise ValueError(f"unknown denominator '{denominator}' (known: {', '.join(ALL_DENOMINATORS)})")
    if feature_map == "affine" and denominator == "mala":
        raise ValueError("the mala normaliser needs a map that keeps the query's magnitude; affine L2-normalises it away")
    if feature_map != "pola":
        check_linear_args(q, k, v, feature_map, "kernel", scale, power)
        return
    check_linear_args(q, k, v, "elu", "kernel", None, 1.0)  # shapes only
    want = (q.shape[1], q.shape[3])
    for name, tensor in (("scale", scale), ("power", power)):
        if not isinstance(tensor, torch.Tensor) or tuple(tensor.shape) != want:
            got = tuple(tensor.shape) if isinstance(tensor, torch.Tensor) else tensor
            raise ValueError(f"the pola map needs {name} of shape (heads, head_dim) = {want}; got {got}")
    if v.shape[-1] % 2:
        raise ValueError(f"the pola map splits v's channels in two halves; value dim {v.shape[-1]} is odd")


def polarity_features(x: torch.Tensor, scale: torch.Tensor, power: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """x (B, H, N, D), scale and power (H, D) -> (φ_same, φ_opp), each (B, H, N, 2D)."""
    y = x / scale[:, None, :]
    p = power[:, None, :]
    positive, negative = F.relu(y).pow(p), F.relu(-y).pow(p)
    return torch.cat([positive, negative], dim=-1), torch.cat([negative, positive], dim=-1)


def polarity_attention(q, k, v, scale, power, attend) -> torch.Tensor:
    """The pola map around one normaliser `attend(phi_q, phi_k, v_half) -> out_half` (a backend's sweep on
    non-negative features): the first half of v's channels through (φ_same(q), φ(k)), the second through
    (φ_opp(q), φ(k)). q, k (B, H, N, D), v (B, H, N, E), scale and power (H, D) -> (B, H, N, E)."""
    same, opposite = polarity_features(q, scale, power)
    phi_k = polarity_features(k, scale, power)[0]
    first, second = v.chunk(2, dim=-1)
    return torch.cat([attend(same, phi_k, first), attend(opposite, phi_k, second)], dim=-1)


def variant_scores(phi_q: torch.Tensor, phi_k: torch.Tensor, denominator: str, causal: bool, head_dim: int,
                   eps: float = 1e-6) -> torch.Tensor:
    """The (B, H, N, N) score matrix A of one normaliser on given features (no affine "1 +"); out = A @ v."""
    tokens = phi_q.shape[-2]
    similarity = phi_q @ phi_k.transpose(-1, -2)
    if causal:
        similarity = similarity * torch.ones(tokens, tokens, dtype=torch.bool, device=phi_q.device).tril()
        counts = torch.arange(1, tokens + 1, dtype=phi_q.dtype, device=phi_q.device).view(tokens, 1)
    else:
        counts = torch.full((tokens, 1), float(tokens), dtype=phi_q.dtype, device=phi_q.device)
    if denominator == "count":
        return similarity / counts
    if denominator == "kernel":
        return similarity / (similarity.sum(-1, keepdim=True) + eps)
    similarity = similarity * head_dim**-0.5
    mean = similarity.sum(-1, keepdim=True) / counts  # m_i
    scores = ((1.0 + 1.0 / (mean + eps)) * similarity - mean) / counts
    if causal:  # the shift -m_i/n_i lands on attended keys only
        scores = scores * torch.ones(tokens, tokens, dtype=torch.bool, device=phi_q.device).tril()
    return scores


def variant_score_matrices(q, k, feature_map: str, denominator: str, causal: bool, scale=None, power=3.0,
                           eps: float = 1e-6) -> list[torch.Tensor]:
    """The score matrices of a variant: one (B, H, N, N) for a plain map, [same-sign, opposite-sign] for pola
    (applied to the first and the second half of v's channels)."""
    head_dim = q.shape[-1]
    if feature_map == "pola":
        same, opposite = polarity_features(q, scale, power)
        phi_k = polarity_features(k, scale, power)[0]
        return [variant_scores(same, phi_k, denominator, causal, head_dim, eps),
                variant_scores(opposite, phi_k, denominator, causal, head_dim, eps)]
    phi_q, phi_k = features(q, feature_map, scale, power), features(k, feature_map, scale, power)
    return [variant_scores(phi_q, phi_k, denominator, causal, head_dim, eps)]


def variant_attention_reference(q, k, v, feature_map: str = "pola", denominator: str = "kernel", causal: bool = False,
                                scale=None, power=3.0, eps: float = 1e-6) -> torch.Tensor:
    """Quadratic oracle of the variants: out = A @ v per score matrix (pola: per half of v)."""
    scores = variant_score_matrices(q, k, feature_map, denominator, causal, scale, power, eps)
    halves = v.chunk(len(scores), dim=-1)
    return torch.cat([a @ part for a, part in zip(scores, halves)], dim=-1)
