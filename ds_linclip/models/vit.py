"""Vision tower: ViT with CLS token, learned position embedding and pre-LN blocks (open_clip layout)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ds_linclip.models.attention import AttentionSpec, Block, as_spec, run_blocks


def interpolate_pos_embed(pos_embed: torch.Tensor, grid: tuple[int, int]) -> torch.Tensor:
    """Resize `(1 + h·w, width)` position embeddings to `(1 + grid[0]·grid[1], width)`.

    The CLS row is kept as is; the patch rows are resized bicubically on their square grid
    (same as open_clip's `resize_pos_embed`, antialiased when shrinking).
    """
    cls_row, patch_rows = pos_embed[:1], pos_embed[1:]
    old_side = int(round(patch_rows.shape[0] ** 0.5))
    if old_side * old_side != patch_rows.shape[0]:
        raise ValueError(f"position embedding has {patch_rows.shape[0]} patch rows, not a square grid")
    if (old_side, old_side) == tuple(grid):
        return pos_embed
    width = pos_embed.shape[-1]
    # (h·w, width) -> (1, width, h, w) -> resize -> (grid0·grid1, width)
    patch_grid = patch_rows.reshape(1, old_side, old_side, width).permute(0, 3, 1, 2)
    resized = F.interpolate(
        patch_grid.float(), size=tuple(grid), mode="bicubic", antialias=True, align_corners=False
    ).to(pos_embed.dtype)
    resized = resized.permute(0, 2, 3, 1).reshape(grid[0] * grid[1], width)
    return torch.cat([cls_row, resized], dim=0)


def kept_patch_count(patches: int, patch_dropout: float) -> int:
    """Patches a training forward keeps out of `patches` (FLIP / open_clip's rule: at least one)."""
    return max(1, int(patches * (1 - patch_dropout))) if patch_dropout > 0 else patches


def draw_kept_patches(batch: int, patches: int, patch_dropout: float,
                      generator: torch.Generator | None = None) -> torch.Tensor:
    """(batch, kept) indices into the patch grid (row-major) of the patches a forward keeps.

    The same draw as open_clip's `PatchDropout`: one standard normal score per patch from the
    default device's generator (or `generator`), the `kept` highest in descending score order,
    so the same torch seed keeps the same tokens in the same order.
    """
    scores = torch.randn(batch, patches, generator=generator, device=generator.device if generator else None)
    return scores.topk(kept_patch_count(patches, patch_dropout), dim=-1).indices


class VisionTransformer(nn.Module):
    """images (batch, 3, H, W) -> features (batch, embed_dim), not normalised.

    The position embedding is stored for `image_size`; other input sizes (multiples of
    `patch_size`) use it interpolated on the fly.

    `patch_dropout` p in [0, 1) (FLIP): in training mode each image keeps a random
    `kept_patch_count(patches, p)` of its patch tokens (the CLS token always) after the position
    embedding; eval mode keeps all. `patch_dropout_generator` (a CPU torch.Generator, or None for
    the global one) is what the draw uses.
    """

    # roles of the top-level parameters for lock groups and layer ids (models/groups.py)
    EMBEDDING_PARAMS = ("patch_embed", "class_embedding", "positional_embedding", "ln_pre")
    FINAL_NORM_PARAMS = ("ln_post",)
    PROJECTION_PARAMS = ("proj",)

    def __init__(
        self,
        image_size: int,
        patch_size: int,
        width: int,
        layers: int,
        heads: int,
        embed_dim: int,
        mlp_ratio: float = 4.0,
        attention: AttentionSpec | str = "softmax",
        backend: str = "auto",
        patch_dropout: float = 0.0,
    ):
        super().__init__()
        if not 0 <= patch_dropout < 1:
            raise ValueError(f"patch_dropout {patch_dropout} is not in [0, 1)")
        self.patch_dropout = float(patch_dropout)
        self.patch_dropout_generator: torch.Generator | None = None
        attention = as_spec(attention)
        self.image_size, self.patch_size, self.width = image_size, patch_size, width
        self.grid = (image_size // patch_size, image_size // patch_size)
        self.checkpoint_every = 0
        scale = width**-0.5
        # no bias: matches open_clip's conv1 (and ln_pre follows, which would absorb one)
        self.patch_embed = nn.Conv2d(3, width, kernel_size=patch_size, stride=patch_size, bias=False)
        self.class_embedding = nn.Parameter(scale * torch.randn(width))  # (width,)
        self.positional_embedding = nn.Parameter(scale * torch.randn(1 + self.grid[0] * self.grid[1], width))
        self.ln_pre = nn.LayerNorm(width)
        self.attention = attention  # the tower's spec; each block gets its layer's (`AttentionSpec.layer_specs`)
        self.blocks = nn.ModuleList(
            Block(width, heads, mlp_ratio, spec=layer_spec, causal=False, backend=backend)
            for layer_spec in attention.layer_specs(layers)
        )
        self.ln_post = nn.LayerNorm(width)
        self.proj = nn.Parameter(scale * torch.randn(width, embed_dim))  # (width, embed_dim)
        for block in self.blocks:
            # what nn.MultiheadAttention does for open_clip's vision tower (it sets no init of its own)
            nn.init.xavier_uniform_(block.attn.qkv.weight)
            nn.init.zeros_(block.attn.qkv.bias)
            nn.init.zeros_(block.attn.out_proj.bias)

    def pos_embed_for(self, height: int, width: int) -> torch.Tensor:
        """(1 + tokens, width) position embedding for an input of height × width pixels."""
        if height % self.patch_size or width % self.patch_size:
            raise ValueError(f"image size {height}x{width} is not a multiple of patch size {self.patch_size}")
        grid = (height // self.patch_size, width // self.patch_size)
        if grid == self.grid:
            return self.positional_embedding
        return interpolate_pos_embed(self.positional_embedding, grid)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        batch, _, height, width = images.shape
        # float32 pixels from the loader into a bf16/fp16 model (DeepSpeed casts weights, not inputs)
        patches = self.patch_embed(images.to(self.patch_embed.weight.dtype))  # (batch, width, grid_h, grid_w)
        patches = patches.flatten(2).transpose(1, 2)  # (batch, grid_h·grid_w, width)
        cls = self.class_embedding.to(patches.dtype).expand(batch, 1, -1)  # (batch, 1, width)
        x = torch.cat([cls, patches], dim=1) + self.pos_embed_for(height, width).to(patches.dtype)
        grid = (height // self.patch_size, width // self.patch_size)
        kept_patches = None
        if self.training and self.patch_dropout > 0:
            kept_patches = draw_kept_patches(batch, grid[0] * grid[1], self.patch_dropout,
                                             self.patch_dropout_generator).to(x.device)
            kept = x[:, 1:].gather(1, kept_patches.unsqueeze(-1).expand(-1, -1, x.shape[-1]))
            x = torch.cat([x[:, :1], kept], dim=1)  # (batch, 1 + kept, width)
        x = self.ln_pre(x)  # (batch, 1 + patches kept, width)
        x = run_blocks(self.blocks, x, self.checkpoint_every, grid, kept_patches)
        pooled = self.ln_post(x[:, 0])  # CLS token, (batch, width)
        return pooled @ self.proj  # (batch, embed_dim)
