"""The one Attention module (softmax or linear, chosen by `kind`) and the pre-LN block around it.

Parameter layout follows open_clip's `nn.MultiheadAttention` so pretrained weights map 1:1:
`qkv.weight` (3·width, width) = open_clip's `in_proj_weight` (rows: all q, then all k, then all v;
head h owns columns h·head_dim:(h+1)·head_dim of each), `qkv.bias` = `in_proj_bias`,
`out_proj` = `out_proj`.
"""

from __future__ import annotations

from typing import Sequence

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from ds_linclip.config import ATTENTION_KINDS
from kernels import linear_attention


class Attention(nn.Module):
    """Multi-head self-attention over `(batch, tokens, width)`.

    kind: `softmax` -> F.scaled_dot_product_attention (scale 1/sqrt(head_dim), as open_clip);
          `linear-*` -> kernels.linear_attention (no scale: affine L2-normalises q and k,
          elu/relu are scale-free up to their normaliser).
    causal: token i attends to tokens j <= i (the text tower).
    denominator: `count` | `kernel`, used by `linear-affine` only.
    backend: where linear attention runs: auto | torch | triton.
    """

    def __init__(
        self,
        width: int,
        heads: int,
        kind: str = "softmax",
        causal: bool = False,
        denominator: str = "count",
        backend: str = "auto",
    ):
        super().__init__()
        if kind not in ATTENTION_KINDS:
            raise ValueError(f"unknown attention kind '{kind}' (known: {', '.join(ATTENTION_KINDS)})")
        if width % heads:
            raise ValueError(f"width {width} is not divisible by heads {heads}")
        self.width, self.heads, self.head_dim = width, heads, width // heads
        self.kind, self.causal, self.denominator, self.backend = kind, causal, denominator, backend
        self.qkv = nn.Linear(width, 3 * width)  # open_clip: in_proj_weight / in_proj_bias
        self.out_proj = nn.Linear(width, width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        batch, tokens, width = x.shape
        # (batch, tokens, 3·width) -> 3 × (batch, heads, tokens, head_dim)
        q, k, v = self.qkv(x).view(batch, tokens, 3, self.heads, self.head_dim).permute(2, 0, 3, 1, 4)
        if self.kind == "softmax":
            mixed = F.scaled_dot_product_attention(q, k, v, is_causal=self.causal)
        else:
            mixed = linear_attention(
                q, k, v, kind=self.kind, causal=self.causal, denominator=self.denominator, backend=self.backend
            )
        # (batch, heads, tokens, head_dim) -> (batch, tokens, width)
        return self.out_proj(mixed.transpose(1, 2).reshape(batch, tokens, width))

    def extra_repr(self) -> str:
        extra = f", denominator={self.denominator}" if self.kind == "linear-affine" else ""
        return f"kind={self.kind}, heads={self.heads}, head_dim={self.head_dim}, causal={self.causal}{extra}"


class MLP(nn.Module):
    """width -> mlp_width -> width with exact GELU (open_clip's `mlp.c_fc` / `mlp.c_proj`)."""

    def __init__(self, width: int, mlp_width: int):
        super().__init__()
        self.c_fc = nn.Linear(width, mlp_width)
        self.gelu = nn.GELU()
        self.c_proj = nn.Linear(mlp_width, width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.c_proj(self.gelu(self.c_fc(x)))


class Block(nn.Module):
    """Pre-LN transformer block: x + attn(ln_1(x)), then x + mlp(ln_2(x))."""

    def __init__(self, width: int, heads: int, mlp_ratio: float = 4.0, **attention_kwargs):
        super().__init__()
        self.ln_1 = nn.LayerNorm(width)
        self.attn = Attention(width, heads, **attention_kwargs)
        self.ln_2 = nn.LayerNorm(width)
        self.mlp = MLP(width, int(width * mlp_ratio))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.ln_1(x))
        return x + self.mlp(self.ln_2(x))


def run_blocks(blocks: Sequence[nn.Module], x: torch.Tensor, checkpoint_every: int = 0) -> torch.Tensor:
    """Apply blocks in order; with `checkpoint_every = k > 0` recompute every k-th block in backward.

    Non-reentrant checkpointing: it works with parameters that ZeRO-3 gathers in forward hooks
    (the hooks fire again during recomputation) and with inputs that do not require grad.
    """
    for index, block in enumerate(blocks):
        if checkpoint_every > 0 and index % checkpoint_every == 0 and torch.is_grad_enabled():
            x = checkpoint(block, x, use_reentrant=False)
        else:
            x = block(x)
    return x
