"""Parameters and forward FLOPs of a CLIP config, counted analytically (no model is built).

FLOPs are matmul FLOPs, 2·m·n·k for an (m×k)·(k×n) product (a multiply-add counts 2), per image
(batch 1) and per caption; elementwise work (norms, GELU, softmax, feature maps) is not counted,
as `torch.utils.flop_counter` does. Attention ("token mixing") is reported apart from the rest:

- softmax, per layer: Q·Kᵀ and A·V = 2 · 2·N²·d per head = 4·N²·width. Causal (text) is
  counted in full, as the math path computes it (a causal flash kernel skips about half).
- linear (any kind), per layer: Kᵀ·V state and Q·state = 2 · 2·N·d² per head = 4·N·d·width,
  bidirectional or causal (the recurrent form; the chunked causal reference does extra
  intra-chunk work on top, see `measure_forward_flops`); the `kernel` and `mala` normalisers add
  φ(q)·Σφ(k) (mala: ·mean φ(k)), 2·N·width. The pola map doubles both: its features are 2·d wide and
  each half of the values mixes through its own query features: 8·N·d·width, normaliser 8·N·width.
- hybrid towers (`softmax_layers`): each layer counted as what it runs.

Everything else: patch embedding, qkv/out projections 8·N·width², the output gate's projection
2·N·width² where a layer has one, MLP 4·N·width·mlp_width, and the output projection of the pooled
token 2·width·embed_dim.

Patch dropout (a training forward): the blocks see N = 1 + kept tokens (`kept_patch_count`);
the patch embedding still runs on every patch, and a local branch convolves the full grid
(the kept tokens are scattered back into it, see Attention), so both count every patch.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

import torch

from ds_linclip.models.attention import AttentionSpec, as_spec
from ds_linclip.models.clip import _as_dict, build_model, tower_attention
from ds_linclip.models.vit import kept_patch_count


@dataclass(frozen=True)
class TowerCost:
    """One tower: parameter count and forward FLOPs for one input (image or caption)."""

    name: str
    attention: str
    tokens: int
    params: int
    attention_flops: int  # token mixing only (see module docstring)
    other_flops: int  # projections, MLP, patch embedding, output projection

    @property
    def flops(self) -> int:
        return self.attention_flops + self.other_flops


@dataclass(frozen=True)
class ModelCost:
    image: TowerCost
    text: TowerCost
    other_params: int  # logit_scale

    @property
    def params(self) -> int:
        return self.image.params + self.text.params + self.other_params

    def as_dict(self) -> dict[str, Any]:
        out = {"params": self.params, "other_params": self.other_params}
        for tower in (self.image, self.text):
            out[tower.name] = dict(asdict(tower), flops=tower.flops)
        return out


def attention_flops(spec: AttentionSpec | str, tokens: int, width: int, heads: int, patches: int = 0) -> int:
    """Token-mixing FLOPs of one attention layer for one sequence of `tokens`.

    Linear variants: the state Kᵀ·V and Q·state (4·N·d per head and value column), plus, with the
    `kernel` normaliser (the denominator depends on the keys), φ(q)·Σφ(k): 2·N·d per head. A local
    branch adds its depthwise conv over the `patches` tokens: 2·k²·width per patch.
    """
    spec = as_spec(spec)
    if spec.softmax_layers:
        raise ValueError(f"'{spec.name}' describes a hybrid tower: count each layer's `layer_spec`")
    head_dim = width // heads
    local = 2 * spec.local_kernel**2 * width * patches
    if spec.linear is None:
        return 4 * tokens * tokens * width + local
    widen = 2 if spec.linear.feature_map == "pola" else 1  # pola: 2·d features, each query twice (same, opposite)
    normaliser = 2 * widen**2 * tokens * width if spec.linear.denominator in ("kernel", "mala") else 0
    return 4 * widen * tokens * head_dim * width + normaliser + local


def chunked_causal_linear_flops(tokens: int, width: int, heads: int, chunk: int) -> int:
    """Matmul FLOPs of one causal linear-attention layer as `kernels/reference.py` computes it.

    Tokens are padded to P = a multiple of `chunk`; per head: masked Q·Kᵀ and ·V inside each chunk
    (4·P·chunk·d) plus chunk states Kᵀ·V and Q·prefix-state (4·P·d²).
    """
    head_dim = width // heads
    padded = -(-tokens // chunk) * chunk
    return heads * (4 * padded * chunk * head_dim + 4 * padded * head_dim * head_dim)


def _block_params(width: int, mlp_width: int) -> int:
    layer_norms = 2 * 2 * width
    qkv_and_out = (3 * width * width + 3 * width) + (width * width + width)
    mlp = (width * mlp_width + mlp_width) + (mlp_width * width + width)
    return layer_norms + qkv_and_out + mlp


def _variant_params(spec: AttentionSpec, width: int) -> int:
    """Per-layer parameters a variant adds: the focused/pola scale, pola's power, the local depthwise conv,
    the output gate."""
    feature_map = spec.linear.feature_map if spec.linear is not None else None
    scale = width if feature_map in ("focused", "pola") else 0
    power = width if feature_map == "pola" else 0
    gate = width * width + width if spec.gate else 0
    return scale + power + gate + (width * spec.local_kernel**2 + width if spec.local_kernel else 0)


def _block_other_flops(tokens: int, width: int, mlp_width: int, gate: bool = False) -> int:
    projections = 4 + (1 if gate else 0)  # qkv (3), out_proj, the gate's
    return 2 * tokens * width * projections * width + 2 * 2 * tokens * width * mlp_width


def _tower_layers(spec: AttentionSpec, tokens: int, width: int, heads: int, mlp_width: int, layers: int,
                  patches: int = 0) -> tuple[int, int, int]:
    """(parameters the variants add, attention FLOPs, other block FLOPs) summed over a tower's layers."""
    params = attention = other = 0
    for layer in spec.layer_specs(layers):
        params += _variant_params(layer, width)
        attention += attention_flops(layer, tokens, width, heads, patches)
        other += _block_other_flops(tokens, width, mlp_width, layer.gate)
    return params, attention, other


def model_cost(model_cfg: Any, image_size: int | None = None, patch_dropout: float = 0.0) -> ModelCost:
    """Parameters and per-input forward FLOPs of the model `build_model(model_cfg)` would build.

    `image_size` (pixels, a multiple of the patch size) overrides the config's: the position
    embedding, and so the parameter count, follows it. `patch_dropout`: the cost of a training
    forward that drops this fraction of patches (the default 0: every patch, as in eval);
    `image.tokens` is then the tokens the blocks see.
    """
    cfg = _as_dict(model_cfg)
    embed_dim, image, text = cfg["embed_dim"], cfg["image"], cfg["text"]

    size, patch, width = image_size or image["image_size"], image["patch_size"], image["width"]
    if size % patch:
        raise ValueError(f"image size {size} is not a multiple of patch size {patch}")
    patches = (size // patch) ** 2
    tokens = 1 + kept_patch_count(patches, patch_dropout)  # what the blocks see
    mlp_width = int(width * image.get("mlp_ratio", 4.0))
    image_spec = tower_attention(image, "image")
    variant_params, mixing, blocks = _tower_layers(image_spec, tokens, width, image["heads"], mlp_width,
                                                   image["layers"], patches)
    image_params = (
        3 * patch * patch * width  # patch embedding, no bias
        + width + (1 + patches) * width  # class + position embeddings
        + 2 * width  # ln_pre
        + image["layers"] * _block_params(width, mlp_width) + variant_params
        + 2 * width + width * embed_dim  # ln_post, proj
    )
    image_cost = TowerCost(
        name="image",
        attention=image_spec.name,
        tokens=tokens,
        params=image_params,
        attention_flops=mixing,
        other_flops=2 * patches * (3 * patch * patch) * width + blocks + 2 * width * embed_dim,
    )

    context, width = text["context_length"], text["width"]
    mlp_width = int(width * text.get("mlp_ratio", 4.0))
    text_spec = tower_attention(text, "text")
    variant_params, mixing, blocks = _tower_layers(text_spec, context, width, text["heads"], mlp_width, text["layers"])
    text_params = (
        text["vocab_size"] * width + context * width
        + text["layers"] * _block_params(width, mlp_width) + variant_params
        + 2 * width + width * embed_dim  # ln_final, text_projection
    )
    text_cost = TowerCost(
        name="text",
        attention=text_spec.name,
        tokens=context,
        params=text_params,
        attention_flops=mixing,
        other_flops=blocks + 2 * width * embed_dim,
    )
    return ModelCost(image=image_cost, text=text_cost, other_params=1)


def attention_flops_per_image(model_cfg: Any, image_size: int | None = None) -> int:
    """Image-tower token-mixing FLOPs for one image (the comparison experiment's x-axis)."""
    return model_cost(model_cfg, image_size).image.attention_flops


def measure_forward_flops(model_cfg: Any, image_size: int | None = None, patch_dropout: float = 0.0,
                          batch: int = 1) -> dict[str, int]:
    """FLOPs counted by `torch.utils.flop_counter.FlopCounterMode` on `batch` images / captions
    (a training-mode forward: `patch_dropout` drops patches as in training; 0 keeps all).

    The model is built on the meta device (no memory, no arithmetic; on meta, SDPA decomposes
    into matmuls the counter sees, while on CPU its fused kernel is not counted).
    Returns {'image': flops, 'text': flops}.
    """
    from torch.utils.flop_counter import FlopCounterMode

    cfg = _as_dict(model_cfg)
    cfg["pretrained"] = None
    cfg["image"] = dict(cfg["image"], patch_dropout=patch_dropout, **({"image_size": image_size} if image_size else {}))
    with torch.device("meta"):
        model = build_model(cfg)
        size, context = cfg["image"]["image_size"], cfg["text"]["context_length"]
        images = torch.empty(batch, 3, size, size)
        tokens = torch.zeros(batch, context, dtype=torch.long)
    measured = {}
    with torch.no_grad():
        with FlopCounterMode(display=False) as counter:
            model.visual(images)
        measured["image"] = counter.get_total_flops()
        with FlopCounterMode(display=False) as counter:
            model.text(tokens)
        measured["text"] = counter.get_total_flops()
    return measured


def _giga(value: int) -> str:
    return f"{value / 1e9:.3f}"


def _millions(value: int) -> str:
    return f"{value / 1e6:.2f}M"


def format_table(cost: ModelCost, title: str = "", measured: dict[str, int] | None = None) -> str:
    """A plain-text table: parameters per tower, forward GFLOPs per image / caption, attention apart."""
    header = ["tower", "attention", "tokens", "params", "fwd GFLOPs", "attn GFLOPs", "attn %", "non-attn GFLOPs"]
    if measured:
        header.append("measured GFLOPs")
    rows = []
    for label, tower in (("image (per image)", cost.image), ("text (per caption)", cost.text)):
        row = [label, tower.attention, str(tower.tokens), _millions(tower.params), _giga(tower.flops),
               _giga(tower.attention_flops), f"{100 * tower.attention_flops / tower.flops:.1f}",
               _giga(tower.other_flops)]
        if measured:
            row.append(_giga(measured[tower.name]))
        rows.append(row)
    rows.append(["logit_scale", "", "", str(cost.other_params), "", "", "", ""] + ([""] if measured else []))
    total_flops = cost.image.flops + cost.text.flops
    total_attn = cost.image.attention_flops + cost.text.attention_flops
    rows.append(["total (1 image + 1 caption)", "", "", _millions(cost.params), _giga(total_flops), _giga(total_attn),
                 f"{100 * total_attn / total_flops:.1f}", _giga(total_flops - total_attn)]
                + ([_giga(sum(measured.values()))] if measured else []))
    widths = [max(len(r[i]) for r in [header] + rows) for i in range(len(header))]
    line = lambda cells: "  ".join(c.ljust(w) if i < 2 else c.rjust(w) for i, (c, w) in enumerate(zip(cells, widths)))
    out = [title] if title else []
    out += [line(header), line(["-" * w for w in widths])] + [line(r) for r in rows]
    return "\n".join(out)


# ----------------------------------------------------------------------------- activation memory
# Elements autograd saves per token and width in one pre-LN block (forward, training), from what
# each op keeps for its backward: ln_1 input, qkv input, q/k/v, the attention output and its
# (tokens, width) copy for out_proj, ln_2 input, c_fc input, GELU input (4·width) and c_proj input
# (4·width) = 16. The focused feature map keeps φ(q), φ(k) besides q, k (+2); the local branch
# keeps its V grid (1 per grid patch, see `_block_saved_elements`). Per-row statistics (LayerNorm
# mean/rstd, softmax logsumexp, feature-map norms) and the linear state (heads·head_dim² per
# sequence) are left out: a few percent at head_dim 64 (tests/test_phases.py measures the gap).
SAVED_PER_TOKEN_WIDTH = 16
FOCUSED_EXTRA_PER_TOKEN_WIDTH = 2


@dataclass(frozen=True)
class ActivationEstimate:
    """Bytes of activations one rank holds for backward, for `batch` image-caption pairs."""

    saved_after_forward: int  # what autograd holds when the forward (and the loss) is done
    recompute_peak: int  # with checkpointing: the most one recomputed segment adds during backward

    @property
    def peak(self) -> int:
        return self.saved_after_forward + self.recompute_peak


def _block_saved_elements(spec: AttentionSpec, tokens: int, width: int, grid_patches: int) -> int:
    focused = spec.linear is not None and spec.linear.feature_map == "focused"
    per_token = SAVED_PER_TOKEN_WIDTH + (FOCUSED_EXTRA_PER_TOKEN_WIDTH if focused else 0)
    return tokens * width * per_token + (grid_patches * width if spec.local_kernel else 0)


def _tower_saved_elements(spec: AttentionSpec, layers: int, tokens: int, width: int, grid_patches: int,
                          checkpoint_every: int) -> tuple[int, int]:
    """(elements saved after the forward, elements one recomputed segment adds) for one sequence:
    a checkpointed segment of k blocks keeps only its input (tokens·width) until backward
    recomputes it; the others keep everything."""
    block = _block_saved_elements(spec, tokens, width, grid_patches)
    if checkpoint_every <= 0:
        return layers * block, 0
    # run_blocks checkpoints every k-th block alone; the k-1 after it run normally
    checkpointed = len(range(0, layers, checkpoint_every))
    return checkpointed * tokens * width + (layers - checkpointed) * block, block


def activation_bytes(model_cfg: Any, batch: int, image_size: int | None = None, patch_dropout: float = 0.0,
                     checkpoint_every: int = 0, bytes_per_element: int = 2) -> ActivationEstimate:
    """Estimated activation memory of one training micro-batch of `batch` pairs, from the shapes:
    the blocks of both towers (see SAVED_PER_TOKEN_WIDTH), the pixels the patch embedding keeps,
    the embeddings' LayerNorm inputs; not the parameters, gradients or optimizer state."""
    cfg = _as_dict(model_cfg)
    image, text = cfg["image"], cfg["text"]
    size, patch = image_size or image["image_size"], image["patch_size"]
    grid_patches = (size // patch) ** 2
    image_tokens = 1 + kept_patch_count(grid_patches, patch_dropout)
    image_saved, image_peak = _tower_saved_elements(tower_attention(image, "image"), image["layers"], image_tokens,
                                                    image["width"], grid_patches, checkpoint_every)
    image_saved += 3 * size * size + image_tokens * image["width"]  # pixels (patch embedding), ln_pre input
    context = text["context_length"]
    text_saved, text_peak = _tower_saved_elements(tower_attention(text, "text"), text["layers"], context,
                                                  text["width"], 0, checkpoint_every)
    text_saved += context * text["width"]  # ln_final input
    return ActivationEstimate(batch * (image_saved + text_saved) * bytes_per_element,
                              batch * max(image_peak, text_peak) * bytes_per_element)
