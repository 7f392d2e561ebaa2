"""The one Attention module (softmax or a linear variant, from one AttentionSpec) and the pre-LN block around it.

Parameter layout follows open_clip's `nn.MultiheadAttention` so pretrained weights map 1:1:
`qkv.weight` (3·width, width) = open_clip's `in_proj_weight` (rows: all q, then all k, then all v;
head h owns columns h·head_dim:(h+1)·head_dim of each), `qkv.bias` = `in_proj_bias`,
`out_proj` = `out_proj`.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, replace
from typing import Any, Mapping, Sequence

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from kernels import linear_attention
from kernels.reference import ALL_DENOMINATORS, ALL_FEATURE_MAPS, LinearSpec, pola_power

# `model.<tower>.attention`: softmax, `linear` (feature map from `feature_map`, default affine), or a
# shorthand naming the feature map; each shorthand has its default normaliser (`denominator`).
SHORTHANDS: dict[str, tuple[str, str]] = {
    "linear-affine": ("affine", "count"),  # the paper's
    "linear-focused": ("focused", "kernel"),  # FLatten's focused map
    "linear-elu": ("elu", "kernel"),
    "linear-relu": ("relu", "kernel"),
    "linear-pola": ("pola", "kernel"),  # PolaFormer's polarity map
}
ATTENTION_KINDS = ("softmax", "linear", *SHORTHANDS)
DEFAULT_DENOMINATOR = {feature_map: denominator for feature_map, denominator in SHORTHANDS.values()}
LOCAL_KERNELS = (0, 3, 5)
DEFAULT_FOCUSED_POWER = 3.0
# the output gate's bias where SiLU(bias) = 1: a gate added to a converted model (weight 0) starts open
GATE_OPEN_BIAS = 1.278464542761074


class AttentionSpecError(ValueError):
    """A bad attention description; `key` is the tower-relative config key it comes from."""

    def __init__(self, message: str, key: str):
        self.key = key
        super().__init__(message)


@dataclass(frozen=True)
class AttentionSpec:
    """One tower's attention, declaratively: softmax (`linear is None`) or a linear variant, and for
    the image tower an optional local branch (depthwise `local_kernel`² conv on V over the patch grid).
    `gate`: the mixed tokens times SiLU(W_g x + b_g) before out_proj (MLLA/RALA's output gate).
    `softmax_layers`: layer indices (negative from the end) that run softmax in a linear tower (a hybrid
    tower); those layers keep the local branch and the gate. `layer_spec` gives one layer's spec."""

    linear: LinearSpec | None = None
    local_kernel: int = 0
    gate: bool = False
    softmax_layers: tuple[int, ...] = ()

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
        base += (f"-local{self.local_kernel}" if self.local_kernel else "") + ("-gate" if self.gate else "")
        if self.softmax_layers:
            base += "-sm" + ".".join(_layer_token(index) for index in self.softmax_layers)
        return base

    def layer_spec(self, index: int, layers: int) -> "AttentionSpec":
        """The spec of layer `index` of `layers`: softmax where `softmax_layers` names it, else this one."""
        softmax = index in {i % layers for i in self.softmax_layers}
        return replace(self, linear=None if softmax else self.linear, softmax_layers=())

    def layer_specs(self, layers: int) -> list["AttentionSpec"]:
        """Every layer's spec of a `layers`-deep tower; AttentionSpecError if `softmax_layers` does not fit it."""
        _softmax_layers({"softmax_layers": list(self.softmax_layers), "layers": layers}, self.kind)
        return [self.layer_spec(index, layers) for index in range(layers)]

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
        if self.gate:
            out[f"model.{tower}.output_gate"] = True
        if self.softmax_layers:
            out[f"model.{tower}.softmax_layers"] = list(self.softmax_layers)
        return out


def _layer_token(index: int) -> str:
    """A softmax layer index in a name: `3`, `last` (-1), `last2` (-3: two before the last)."""
    return str(index) if index >= 0 else "last" + (str(-index - 1) if index < -1 else "")


def _layer_index(token: str) -> int:
    return -1 - int(token[4:] or 0) if token.startswith("last") else int(token)


SOFTMAX = AttentionSpec()


def _softmax_layers(tower: Mapping[str, Any], kind: str) -> tuple[int, ...]:
    """`softmax_layers` checked: integers, distinct, within `layers` where the mapping has it."""
    raw = tower.get("softmax_layers") or ()
    if isinstance(raw, (str, int)) or not all(isinstance(i, int) and not isinstance(i, bool) for i in raw):
        raise AttentionSpecError(f"{raw!r} is not a list of layer indices (e.g. [3, 7, 11] or [-1])", "softmax_layers")
    indices = tuple(raw)
    if not indices:
        return ()
    if kind == "softmax":
        raise AttentionSpecError("layers are named softmax but the whole tower is softmax already", "softmax_layers")
    layers = tower.get("layers")
    if layers is not None:
        outside = [i for i in indices if not -layers <= i < layers]
        if outside:
            raise AttentionSpecError(f"{outside} outside the tower's {layers} layers", "softmax_layers")
        if len({i % layers for i in indices}) < len(indices):
            raise AttentionSpecError(f"{list(indices)} names a layer twice", "softmax_layers")
        if len(indices) == layers:
            raise AttentionSpecError("every layer is named: use attention=softmax", "softmax_layers")
    elif len(set(indices)) < len(indices):
        raise AttentionSpecError(f"{list(indices)} names a layer twice", "softmax_layers")
    return indices


def resolve_attention(tower: Mapping[str, Any], causal: bool = False) -> AttentionSpec:
    """The one validation of a tower's attention keys (`attention`, `feature_map`, `denominator`,
    `focused_power`, `local_kernel`, `output_gate`, `softmax_layers`) -> AttentionSpec. Raises
    AttentionSpecError naming the key. Where the mapping has `layers` (and `width`, `heads`), the
    layer indices (and the pola map's even head dim) are checked against them."""
    kind = tower.get("attention", "softmax")
    feature_map = tower.get("feature_map")
    denominator = tower.get("denominator")
    power = float(tower.get("focused_power", DEFAULT_FOCUSED_POWER))
    local_kernel = int(tower.get("local_kernel", 0) or 0)
    gate = tower.get("output_gate", False)
    if not isinstance(gate, bool):
        raise AttentionSpecError(f"{gate!r} is not true or false", "output_gate")
    if kind not in ATTENTION_KINDS:
        raise AttentionSpecError(f"'{kind}' is not one of {', '.join(ATTENTION_KINDS)}", "attention")
    if local_kernel not in LOCAL_KERNELS:
        raise AttentionSpecError(f"{local_kernel} is not one of {', '.join(map(str, LOCAL_KERNELS))}", "local_kernel")
    if local_kernel and causal:
        raise AttentionSpecError("the local branch is for the image tower only (text is causal)", "local_kernel")
    softmax_layers = _softmax_layers(tower, kind)
    if kind == "softmax":
        for key, value in (("feature_map", feature_map), ("denominator", denominator)):
            if value is not None:
                raise AttentionSpecError(f"'{value}' is set but attention is softmax (use attention=linear)", key)
        return AttentionSpec(None, local_kernel, gate)
    if feature_map is not None and feature_map not in ALL_FEATURE_MAPS:
        raise AttentionSpecError(f"'{feature_map}' is not one of {', '.join(ALL_FEATURE_MAPS)}", "feature_map")
    if kind in SHORTHANDS:
        implied = SHORTHANDS[kind][0]
        if feature_map is not None and feature_map != implied:
            raise AttentionSpecError(
                f"'{feature_map}' contradicts attention={kind} (feature map {implied}); "
                "use attention=linear to choose the feature map freely", "feature_map")
        feature_map = implied
    feature_map = feature_map or "affine"
    if denominator is not None and denominator not in ALL_DENOMINATORS:
        raise AttentionSpecError(f"'{denominator}' is not one of {', '.join(ALL_DENOMINATORS)}", "denominator")
    if denominator == "mala" and feature_map == "affine":
        raise AttentionSpecError("the mala normaliser restores the query's magnitude, which the affine map "
                                 "L2-normalises away; use it with focused, elu, relu or pola", "denominator")
    if not power > 0:
        raise AttentionSpecError(f"{power} must be > 0", "focused_power")
    if feature_map == "pola" and "width" in tower and "heads" in tower and (tower["width"] // tower["heads"]) % 2:
        raise AttentionSpecError(f"the pola map splits each head's values in two halves; head dim "
                                 f"{tower['width'] // tower['heads']} is odd", "heads")
    linear = LinearSpec(feature_map, denominator or DEFAULT_DENOMINATOR[feature_map], power)
    return AttentionSpec(linear, local_kernel, gate, softmax_layers)


_LAYER = r"(?:\d+|last\d*)"
_NAME = re.compile(r"^(?P<base>softmax|linear-(?:affine|focused|elu|relu|pola))(?:-(?P<den>count|kernel|mala))?"
                   r"(?:-p(?P<power>\d+(?:\.\d+)?))?(?:-local(?P<local>\d+))?(?P<gate>-gate)?"
                   rf"(?:-sm(?P<sm>{_LAYER}(?:\.{_LAYER})*))?$")
NAME_GRAMMAR = ("softmax[-gate] | linear-{affine,focused,elu,relu,pola}[-count|-kernel|-mala][-p<power>][-local{3,5}]"
                "[-gate][-sm<layer>[.<layer>...]] (layer: an index, last, last<k> = k before the last)")


def parse_attention_name(name: str, causal: bool = False) -> AttentionSpec:
    """`linear-focused-local3` -> AttentionSpec (the grammar of `AttentionSpec.name`, NAME_GRAMMAR)."""
    match = _NAME.match(name)
    if not match:
        raise AttentionSpecError(f"'{name}' is not an attention name ({NAME_GRAMMAR})", "attention")
    tower: dict[str, Any] = {"attention": match["base"], "local_kernel": int(match["local"] or 0),
                             "output_gate": bool(match["gate"])}
    if match["sm"]:
        tower["softmax_layers"] = [_layer_index(token) for token in match["sm"].split(".")]
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
    L2-normalises q and k, the others are scale-free up to their normaliser; focused and pola have a
    learnable scale `focus_scale`, s = softplus(focus_scale), shape (heads, head_dim), init 0; pola has
    a learnable power `pola_power`, p = 1 + 4·sigmoid(pola_power), shape (heads, head_dim), init 0: p = 3).
    spec.local_kernel k > 0 adds a depthwise k×k conv of V over the patch grid (`local_conv`) to the
    attention output of the patch tokens (tokens before the grid, the CLS token, get nothing).
    With patch dropout (`kept_patches`, (batch, kept) grid indices of the patch tokens present) the
    kept tokens' V is scattered back into a zero grid, convolved, and read back at the kept
    places: a dropped patch contributes nothing, as if its V were 0.
    spec.gate adds `gate` (width -> width): the mixed tokens (after the local branch) times SiLU(gate(x)).
    causal: token i attends to tokens j <= i (the text tower).
    backend: where linear attention runs: auto | torch | triton.
    A spec with `softmax_layers` describes a tower, not a layer: give the module `spec.layer_spec(i, n)`.
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
        self.pola_power: nn.Parameter | None = None
        self.local_conv: nn.Conv2d | None = None
        self.gate: nn.Linear | None = None
        self.spec = SOFTMAX
        self.set_spec(as_spec(spec, causal))

    @property
    def kind(self) -> str:
        return self.spec.name

    def set_spec(self, spec: AttentionSpec, zero_init_new: bool = False) -> None:
        """Switch the variant in place (same qkv/out_proj weights). Parameters the new variant adds are
        created (`zero_init_new`: the local conv starts at 0 and the gate open (weight 0, SiLU(bias) = 1),
        so a converted model computes exactly its linear attention); parameters it no longer needs are dropped."""
        spec = as_spec(spec, self.causal)
        if spec.softmax_layers:
            raise ValueError(f"'{spec.name}' describes a tower (softmax_layers); give a layer its layer_spec(index, layers)")
        device = self.qkv.weight.device
        feature_map = spec.linear.feature_map if spec.linear is not None else None
        if feature_map == "pola" and self.head_dim % 2:
            raise ValueError(f"the pola map splits each head's values in two halves; head dim {self.head_dim} is odd")
        scaled = feature_map in ("focused", "pola")
        if scaled and self.focus_scale is None:
            self.focus_scale = nn.Parameter(torch.zeros(self.heads, self.head_dim, device=device))
        elif not scaled:
            self.focus_scale = None
        if feature_map == "pola" and self.pola_power is None:
            self.pola_power = nn.Parameter(torch.zeros(self.heads, self.head_dim, device=device))
        elif feature_map != "pola":
            self.pola_power = None
        if spec.gate and self.gate is None:
            self.gate = nn.Linear(self.width, self.width, device=device)
            if zero_init_new:
                nn.init.zeros_(self.gate.weight)
                nn.init.constant_(self.gate.bias, GATE_OPEN_BIAS)
        elif not spec.gate:
            self.gate = None
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
            kwargs = linear.kernel_kwargs()
            if self.pola_power is not None:
                kwargs["power"] = pola_power(self.pola_power).to(q.dtype)
            mixed = linear_attention(q, k, v, causal=self.causal, scale=scale, backend=self.backend, **kwargs)
        # (batch, heads, tokens, head_dim) -> (batch, tokens, width)
        mixed = mixed.transpose(1, 2).reshape(batch, tokens, width)
        if self.local_conv is not None:
            mixed = self._add_local(mixed, qkv[..., 2 * width:], grid, kept_patches)
        if self.gate is not None:
            mixed = mixed * F.silu(self.gate(x))
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
