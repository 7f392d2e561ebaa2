"""Text tower: causal transformer over BPE tokens, pooled at the EOT token (open_clip layout)."""

from __future__ import annotations

import torch
from torch import nn

from ds_linclip.models.attention import AttentionSpec, Block, as_spec, run_blocks


class TextTransformer(nn.Module):
    """tokens (batch, context) long -> features (batch, embed_dim), not normalised.

    Pooling takes the token at `tokens.argmax(-1)`: the EOT id is the largest in the vocabulary,
    so that is the end of each caption (open_clip's `argmax` pooling). Inputs shorter than
    `context_length` are fine; the causal mask means padding after EOT never reaches it.
    """

    # roles of the top-level parameters for lock groups and layer ids (models/groups.py)
    EMBEDDING_PARAMS = ("token_embedding", "positional_embedding")
    FINAL_NORM_PARAMS = ("ln_final",)
    PROJECTION_PARAMS = ("text_projection",)

    def __init__(
        self,
        context_length: int,
        vocab_size: int,
        width: int,
        layers: int,
        heads: int,
        embed_dim: int,
        mlp_ratio: float = 4.0,
        attention: AttentionSpec | str = "softmax",
        backend: str = "auto",
    ):
        super().__init__()
        attention = as_spec(attention, causal=True)
        self.context_length, self.vocab_size, self.width = context_length, vocab_size, width
        self.checkpoint_every = 0
        self.token_embedding = nn.Embedding(vocab_size, width)
        self.positional_embedding = nn.Parameter(torch.empty(context_length, width))
        self.attention = attention  # the tower's spec; each block gets its layer's (`AttentionSpec.layer_specs`)
        self.blocks = nn.ModuleList(
            Block(width, heads, mlp_ratio, spec=layer_spec, causal=True, backend=backend)
            for layer_spec in attention.layer_specs(layers)
        )
        self.ln_final = nn.LayerNorm(width)
        self.text_projection = nn.Parameter(torch.empty(width, embed_dim))  # (width, embed_dim)
        self.init_parameters(layers)

    def init_parameters(self, layers: int) -> None:
        """open_clip's text-tower init (std 0.02 tokens, 0.01 positions, scaled projections)."""
        nn.init.normal_(self.token_embedding.weight, std=0.02)
        nn.init.normal_(self.positional_embedding, std=0.01)
        proj_std = self.width**-0.5 * (2 * layers) ** -0.5
        for block in self.blocks:
            nn.init.normal_(block.attn.qkv.weight, std=self.width**-0.5)
            nn.init.zeros_(block.attn.qkv.bias)
            nn.init.normal_(block.attn.out_proj.weight, std=proj_std)
            nn.init.zeros_(block.attn.out_proj.bias)
            nn.init.normal_(block.mlp.c_fc.weight, std=(2 * self.width) ** -0.5)
            nn.init.normal_(block.mlp.c_proj.weight, std=proj_std)
        nn.init.normal_(self.text_projection, std=self.width**-0.5)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        batch, length = tokens.shape
        if length > self.context_length:
            raise ValueError(f"{length} tokens given, context_length is {self.context_length}")
        x = self.token_embedding(tokens) + self.positional_embedding[:length]  # (batch, length, width)
        x = run_blocks(self.blocks, x, self.checkpoint_every)
        x = self.ln_final(x)
        pooled = x[torch.arange(batch, device=x.device), tokens.argmax(dim=-1)]  # (batch, width) at EOT
        return pooled @ self.text_projection  # (batch, embed_dim)
