"""The one Attention module (softmax or a linear variant, from one AttentionSpec) and the pre-LN block around it.

Parameter layout follows open_clip's `nn.MultiheadAttention` so pretrained weights map 1:1:
`qkv.weight` (3·width, width) = open_clip's `in_proj_weight` (rows: all q, then all k, then all v;
head h owns columns h·head_dim:(h+1)·head_dim of each), `qkv.bias` = `in_proj_bias`,
`out_proj` = `out_proj`.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any, Mapping, Sequence

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from kernels import linear_attention
from kernels.reference import DENOMINATORS, FEATURE_MAPS, LinearSpec

# `model.<tower>.attention`: softmax, `linear` (feature map from `feature_map`, default affine), or a
# shorthand naming the feature map; each shorthand has its default normaliser (`denominator`).
SHORTHANDS: dict[str, tuple[str, str]] = {
    "linear-affine": ("affine", "count"),  # the paper's
    "linear-focused": ("focused", "kernel"),  # FLatten's focused map
    "linear-elu": ("elu", "kernel"),
    "linear-relu": ("relu", "kernel"),
}
ATTENTION_KINDS = ("softmax", "linear", *SHORTHANDS)
DEFAULT_DENOMINATOR = {feature_map: denominator for feature_map, denominator in SHORTHANDS.values()}
LOCAL_KERNELS = (0, 3, 5)
DEFAULT_FOCUSED_POWER = 3.0


class AttentionSpecError(ValueError):
    """A bad attention description; `key` is the tower-relative config key it comes from."""

    def __init__(self, message: str, key: str):
        self.key = key
        super().__init__(message)


@dataclass(frozen=True)
class AttentionSpec:
    """One tower's attention, declaratively: softmax (`linear is None`) or a linear variant, and for
    the image tower an optional local branch (depthwise `local_kernel`² conv on V over the patch grid)."""

    linear: LinearSpec | None = None
    local_kernel: int = 0

    @property
    def kind(self) -> str:
        return "softmax" if self.linear is None else "linear"

    @property
    def name(self) -> str:
        """A name in the grammar `parse_attention_name` reads, e.g. `linear-focused-local3`."""
        if self.linear is None:
            base = "softmax"
        else:
            base = f"linear-{self.linear.feature_map}"
            if self.linear.denominator != DEFAULT_DENOMINATOR[self.linear.feature_map]:
                base += f"-{self.linear.denominator}"
            if self.linear.feature_map == "focused" and self.linear.power != DEFAULT_FOCUSED_POWER:
                base += f"-p{self.linear.power:g}"
        return base + (f"-local{self.local_kernel}" if self.local_kernel else "")

    def config_overrides(self, tower: str) -> dict[str, Any]:
        """`model.<tower>.*` config values that describe this spec (the inverse of `resolve_attention`):
        the shorthand naming the feature map and the normaliser always, the power and the local branch
        where they are not the defaults."""
        out: dict[str, Any] = {f"model.{tower}.attention": "softmax" if self.linear is None
                               else f"linear-{self.linear.feature_map}"}
        if self.linear is not None:
            out[f"model.{tower}.denominator"] = self.linear.denominator
            if self.linear.power != DEFAULT_FOCUSED_POWER:
                out[f"model.{tower}.focused_power"] = self.linear.power
        if self.local_kernel:
            if tower != "image":
                raise AttentionSpecError("the local branch is for the image tower only", "local_kernel")
            out[f"model.{tower}.local_kernel"] = self.local_kernel
        return out


SOFTMAX = AttentionSpec()


def resolve_attention(tower: Mapping[str, Any], causal: bool = False) -> AttentionSpec:
    """The one validation of a tower's attention keys (`attention`, `feature_map`, `denominator`,
    `focused_power`, `local_kernel`) -> AttentionSpec. Raises AttentionSpecError naming the key."""
    kind = tower.get("attention", "softmax")
    feature_map = tower.get("feature_map")
    denominator = tower.get("denominator")
    power = float(tower.get("focused_power", DEFAULT_FOCUSED_POWER))
    local_kernel = int(tower.get("local_kernel", 0) or 0)
    if kind not in ATTENTION_KINDS:
        raise AttentionSpecError(f"'{kind}' is not one of {', '.join(ATTENTION_KINDS)}", "attention")
    if local_kernel not in LOCAL_KERNELS:
        raise AttentionSpecError(f"{local_kernel} is not one of {', '.join(map(str, LOCAL_KERNELS))}", "local_kernel")
    if local_kernel and causal:
        raise AttentionSpecError("the local branch is for the image tower only (text is causal)", "local_kernel")
    if kind == "softmax":
        for key, value in (("feature_map", feature_map), ("denominator", denominator)):
            if value is not None:
                raise AttentionSpecError(f"'{value}' is set but attention is softmax (use attention=linear)", key)
        return AttentionSpec(None, local_kernel)
    if feature_map is not None and feature_map not in FEATURE_MAPS:
        raise AttentionSpecError(f"'{feature_map}' is not one of {', '.join(FEATURE_MAPS)}", "feature_map")
    if kind in SHORTHANDS:
        implied = SHORTHANDS[kind][0]
        if feature_map is not None and feature_map != implied:
            raise AttentionSpecError(
                f"'{feature_map}' contradicts attention={kind} (feature map {implied}); "
                "use attention=linear to choose the feature map freely", "feature_map")
        feature_map = implied
    feature_map = feature_map or "affine"
    if denominator is not None and denominator not in DENOMINATORS:
        raise AttentionSpecError(f"'{denominator}' is not one of {', '.join(DENOMINATORS)}", "denominator")
    if not power > 0:
        raise AttentionSpecError(f"{power} must be > 0", "focused_power")
    return AttentionSpec(LinearSpec(feature_map, denominator or DEFAULT_DENOMINATOR[feature_map], power), local_kernel)


_NAME = re.compile(r"^(?P<base>softmax|linear-(?:affine|focused|elu|relu))(?:-(?P<den>count|kernel))?"
                   r"(?:-p(?P<power>\d+(?:\.\d+)?))?(?:-local(?P<local>\d+))?$")
NAME_GRAMMAR = "softmax | linear-{affine,focused,elu,relu}[-count|-kernel][-p<power>][-local{3,5}]"


def parse_attention_name(name: str, causal: bool = False) -> AttentionSpec:
    """`linear-focused-local3` -> AttentionSpec (the grammar of `AttentionSpec.name`, NAME_GRAMMAR)."""
    match = _NAME.match(name)
    if not match:
        raise AttentionSpecError(f"'{name}' is not an attention name ({NAME_GRAMMAR})", "attention")
    tower: dict[str, Any] = {"attention": match["base"], "local_kernel": int(match["local"] or 0)}
    if match["den"]:
        tower["denominator"] = match["den"]
    if match["power"]:
        if match["base"] != "linear-focused":
            raise AttentionSpecError(f"'{name}': a power is for linear-focused only", "focused_power")
        tower["focused_power"] = float(match["power"])
    if match["base"] == "softmax" and match["den"]:
        raise AttentionSpecError(f"'{name}': softmax has no denominator choice", "denominator")
    return resolve_attention(tower, causal)


def as_spec(spec: AttentionSpec | str, causal: bool = False) -> AttentionSpec:
    return parse_attention_name(spec, causal) if isinstance(spec, str) else spec


class Attention(nn.Module):
    """Multi-head self-attention over `(batch, tokens, width)`.

    spec.linear None -> F.scaled_dot_product_attention (scale 1/sqrt(head_dim), as open_clip);
    else kernels.linear_attention with the spec's feature map and normaliser (no scale: affine
    L2-normalises q and k, the others are scale-free up to their normaliser; focused has its own
    learnable scale `focus_scale`, s = softplus(focus_scale), shape (heads, head_dim), init 0).
    spec.local_kernel k > 0 adds a depthwise k×k conv of V over the patch grid (`local_conv`) to the
    attention output of the patch tokens (tokens before the grid, the CLS token, get nothing).
    With patch dropout (`kept_patches`, (batch, kept) grid indices of the patch tokens present) the
    kept tokens' V is scattered back into a zero grid, convolved, and read back at the kept
    places: a dropped patch contributes nothing, as if its V were 0.
    causal: token i attends to tokens j <= i (the text tower).
    backend: where linear attention runs: auto | torch | triton.
    """

    def __init__(self, width: int, heads: int, spec: AttentionSpec | str = SOFTMAX, causal: bool = False,
                 backend: str = "auto"):
        super().__init__()
        if width % heads:
            raise ValueError(f"width {width} is not divisible by heads {heads}")
        self.width, self.heads, self.head_dim = width, heads, width // heads
        self.causal, self.backend = causal, backend
        self.qkv = nn.Linear(width, 3 * width)  # open_clip: in_proj_weight / in_proj_bias
        self.out_proj = nn.Linear(width, width)
        self.focus_scale: nn.Parameter | None = None
        self.local_conv: nn.Conv2d | None = None
        self.spec = SOFTMAX
        self.set_spec(as_spec(spec, causal))

    @property
    def kind(self) -> str:
        return self.spec.name

    def set_spec(self, spec: AttentionSpec, zero_init_new: bool = False) -> None:
        """Switch the variant in place (same qkv/out_proj weights). Parameters the new variant adds are
        created (`zero_init_new`: the local conv starts at 0, so a converted model computes exactly its
        linear attention); parameters it no longer needs are dropped."""
        spec = as_spec(spec, self.causal)
        device = self.qkv.weight.device
        focused = spec.linear is not None and spec.linear.feature_map == "focused"
        if focused and self.focus_scale is None:
            self.focus_scale = nn.Parameter(torch.zeros(self.heads, self.head_dim, device=device))
        elif not focused:
            self.focus_scale = None
        if spec.local_kernel and (self.local_conv is None or self.local_conv.kernel_size[0] != spec.local_kernel):
            self.local_conv = nn.Conv2d(self.width, self.width, spec.local_kernel, padding=spec.local_kernel // 2,
                                        groups=self.width, device=device)
            if zero_init_new:
                nn.init.zeros_(self.local_conv.weight)
                nn.init.zeros_(self.local_conv.bias)
        elif not spec.local_kernel:
            self.local_conv = None
        self.spec = spec

    def forward(self, x: torch.Tensor, grid: tuple[int, int] | None = None,
                kept_patches: torch.Tensor | None = None) -> torch.Tensor:
        batch, tokens, width = x.shape
        qkv = self.qkv(x)  # (batch, tokens, 3·width)
        # -> (3, batch, heads, tokens, head_dim)
        heads = qkv.view(batch, tokens, 3, self.heads, self.head_dim).permute(2, 0, 3, 1, 4)
        linear = self.spec.linear
        if linear is None:
            q, k, v = heads
            mixed = F.scaled_dot_product_attention(q, k, v, is_causal=self.causal)
        else:
            # one copy into head-major order, instead of one inside every matmul that meets a permuted
            # q, k or v (forward and backward: ~20 strided copies per call on CPU)
            q, k, v = heads.contiguous()
            scale = F.softplus(self.focus_scale).to(q.dtype) if self.focus_scale is not None else None
            mixed = linear_attention(q, k, v, causal=self.causal, scale=scale, backend=self.backend,
                                     **linear.kernel_kwargs())
        # (batch, heads, tokens, head_dim) -> (batch, tokens, width)
        mixed = mixed.transpose(1, 2).reshape(batch, tokens, width)
        if self.local_conv is not None:
            mixed = self._add_local(mixed, qkv[..., 2 * width:], grid, kept_patches)
        return self.out_proj(mixed)

    def _add_local(self, mixed: torch.Tensor, values: torch.Tensor, grid: tuple[int, int] | None,
                   kept_patches: torch.Tensor | None = None) -> torch.Tensor:
        """mixed, values: (batch, tokens, width); the last grid[0]·grid[1] tokens are the patches, or
        with `kept_patches` (batch, kept) the last `kept` tokens are the patches at those grid indices."""
        batch, tokens, width = values.shape
        if grid is None:  # a square grid after one CLS token
            side = int(round((tokens - 1) ** 0.5))
            grid = (side, side)
        patches = grid[0] * grid[1]
        present = patches if kept_patches is None else kept_patches.shape[1]
        prefix = tokens - present
        if prefix < 0:
            raise ValueError(f"grid {grid} has more patches than the {tokens} tokens")
        patch_values = values[:, prefix:]  # (batch, present, width)
        if kept_patches is not None:
            index = kept_patches.unsqueeze(-1).expand(-1, -1, width)  # (batch, kept, width)
            patch_values = patch_values.new_zeros(batch, patches, width).scatter(1, index, patch_values)
        # channels-last in and out: the tokens' (patches, width) layout is NHWC already, so no transposes
        patch_values = patch_values.reshape(batch, grid[0], grid[1], width).permute(0, 3, 1, 2)
        patch_values = patch_values.contiguous(memory_format=torch.channels_last)
        local = self.local_conv(patch_values).permute(0, 2, 3, 1).reshape(batch, patches, width)
        if kept_patches is not None:
            local = local.gather(1, index)  # (batch, kept, width)
        return torch.cat([mixed[:, :prefix], mixed[:, prefix:] + local], dim=1)

    def extra_repr(self) -> str:
        return f"spec={self.spec.name}, heads={self.heads}, head_dim={self.head_dim}, causal={self.causal}"


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

    def forward(self, x: torch.Tensor, grid: tuple[int, int] | None = None,
                kept_patches: torch.Tensor | None = None) -> torch.Tensor:
        x = x + self.attn(self.ln_1(x), grid, kept_patches)
        return x + self.mlp(self.ln_2(x))


def run_blocks(blocks: Sequence[nn.Module], x: torch.Tensor, checkpoint_every: int = 0,
               grid: tuple[int, int] | None = None, kept_patches: torch.Tensor | None = None) -> torch.Tensor:
    """Apply blocks in order; with `checkpoint_every = k > 0` recompute every k-th block in backward.
    `grid`, `kept_patches`: the image tower's patch layout (see Attention).

    Non-reentrant checkpointing: it works with parameters that ZeRO-3 gathers in forward hooks
    (the hooks fire again during recomputation) and with inputs that do not require grad.
    """
    for index, block in enumerate(blocks):
        if checkpoint_every > 0 and index % checkpoint_every == 0 and torch.is_grad_enabled():
            x = checkpoint(block, x, grid, kept_patches, use_reentrant=False)
        else:
            x = block(x, grid, kept_patches)
    return x
