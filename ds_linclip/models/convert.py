"""open_clip ⇄ ds_linclip state dicts, and `load_pretrained` for either kind of file.

Name mapping (everything else is identical, tensors are not changed):

    open_clip                                   ds_linclip
    visual.conv1.weight                         visual.patch_embed.weight
    visual.transformer.resblocks.{i}.…          visual.blocks.{i}.…
    transformer.resblocks.{i}.…                 text.blocks.{i}.…
    token_embedding / positional_embedding /    text.token_embedding / text.positional_embedding /
      ln_final / text_projection                  text.ln_final / text.text_projection
    ….attn.in_proj_weight / in_proj_bias        ….attn.qkv.weight / qkv.bias
    visual.{class_embedding, positional_embedding, ln_pre, ln_post, proj}, logit_scale, logit_bias: unchanged

Attention kind is not part of the weights, so a softmax checkpoint loads into a model built with
linear attention as is ("linearize a pretrained CLIP, then fine-tune"). Parameters a linear variant
adds (`attn.focus_scale`, `attn.pola_power`, `attn.local_conv.*`, `attn.gate.*`) and the file lacks start
at zero, the gate's bias open: the focused/pola map's scale at softplus(0), pola's power at 3, a local
branch that adds nothing until it is trained and a gate of SiLU(bias) = 1, so the converted model
computes exactly its linear attention over the pretrained projections.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any, Mapping

import torch
from torch import nn

from ds_linclip.models.attention import GATE_OPEN_BIAS
from ds_linclip.models.vit import interpolate_pos_embed

# inside a block, open_clip name -> ours (None: same name)
_BLOCK_KEYS = {
    "ln_1.weight": None, "ln_1.bias": None,
    "attn.in_proj_weight": "attn.qkv.weight", "attn.in_proj_bias": "attn.qkv.bias",
    "attn.out_proj.weight": None, "attn.out_proj.bias": None,
    "ln_2.weight": None, "ln_2.bias": None,
    "mlp.c_fc.weight": None, "mlp.c_fc.bias": None,
    "mlp.c_proj.weight": None, "mlp.c_proj.bias": None,
}
_BLOCK_KEYS_BACK = {(ours or oc): oc for oc, ours in _BLOCK_KEYS.items()}
_VISUAL_SAME = {"class_embedding", "positional_embedding", "ln_pre.weight", "ln_pre.bias",
                "ln_post.weight", "ln_post.bias", "proj"}
_TEXT_TOP = {"token_embedding.weight", "positional_embedding", "ln_final.weight", "ln_final.bias",
             "text_projection"}
# the learned temperature and (SigLIP's) logit bias: same name, 0-dim in both layouts
_SCALARS = ("logit_scale", "logit_bias")
# non-weight entries some CLIP files carry (OpenAI's) and buffers older open_clip versions saved
_IGNORED_OPEN_CLIP = {"input_resolution", "context_length", "vocab_size", "attn_mask", "visual.attn_mask"}

_OC_VISUAL_BLOCK = re.compile(r"^visual\.transformer\.resblocks\.(\d+)\.(.+)$")
_OC_TEXT_BLOCK = re.compile(r"^(?:text\.)?transformer\.resblocks\.(\d+)\.(.+)$")  # CLIP or CustomTextCLIP
_OURS_BLOCK = re.compile(r"^(visual|text)\.blocks\.(\d+)\.(.+)$")
# parameters of linear variants (ds_linclip only): filled with zeros when a file lacks them
VARIANT_PARAMS = ("attn.focus_scale", "attn.pola_power", "attn.local_conv.weight", "attn.local_conv.bias",
                  "attn.gate.weight", "attn.gate.bias")


class CheckpointError(ValueError):
    """A weights file or state dict that does not fit; the message names the key and the file."""


def _block_key(key: str, inner: str) -> str:
    if inner not in _BLOCK_KEYS:
        raise CheckpointError(
            f"open_clip key '{key}': block parameter '{inner}' is not supported by ds_linclip "
            f"(supported: {', '.join(_BLOCK_KEYS)}); layer scale, qk-norm and similar variants are not"
        )
    return _BLOCK_KEYS[inner] or inner


def from_open_clip_state_dict(state_dict: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """open_clip `CLIP` (or `CustomTextCLIP` with its own text transformer) state dict -> ours."""
    ours: dict[str, torch.Tensor] = {}
    for key, value in state_dict.items():
        if key in _IGNORED_OPEN_CLIP:
            continue
        if match := _OC_VISUAL_BLOCK.match(key):
            new = f"visual.blocks.{match[1]}.{_block_key(key, match[2])}"
        elif match := _OC_TEXT_BLOCK.match(key):
            new = f"text.blocks.{match[1]}.{_block_key(key, match[2])}"
        elif key == "visual.conv1.weight":
            new = "visual.patch_embed.weight"
        elif key.startswith("visual.") and key[len("visual."):] in _VISUAL_SAME:
            new = key
        elif key in _TEXT_TOP:
            new = f"text.{key}"
        elif key.startswith("text.") and key[len("text."):] in _TEXT_TOP:
            new = key
        elif key in _SCALARS:
            new = key
            value = value.reshape(())  # some files store them as shape (1,)
        else:
            raise CheckpointError(
                f"open_clip key '{key}' has no counterpart in ds_linclip's ViT CLIP "
                "(ResNet towers, attentional pooling and HF text towers are not supported)"
            )
        ours[new] = value
    return ours


def to_open_clip_state_dict(state_dict: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Ours -> open_clip `CLIP` layout (loadable by `open_clip.create_model(...).load_state_dict`)."""
    theirs: dict[str, torch.Tensor] = {}
    for key, value in state_dict.items():
        if match := _OURS_BLOCK.match(key):
            tower, index, inner = match[1], match[2], match[3]
            if inner in VARIANT_PARAMS:
                raise CheckpointError(f"ds_linclip key '{key}': a linear-variant parameter, which open_clip's CLIP has no place for")
            if inner not in _BLOCK_KEYS_BACK:
                raise CheckpointError(f"ds_linclip key '{key}': unknown block parameter '{inner}'")
            prefix = "visual.transformer" if tower == "visual" else "transformer"
            new = f"{prefix}.resblocks.{index}.{_BLOCK_KEYS_BACK[inner]}"
        elif key == "visual.patch_embed.weight":
            new = "visual.conv1.weight"
        elif key.startswith("visual.") and key[len("visual."):] in _VISUAL_SAME:
            new = key
        elif key.startswith("text.") and key[len("text."):] in _TEXT_TOP:
            new = key[len("text."):]
        elif key in _SCALARS:
            new = key
        else:
            raise CheckpointError(f"ds_linclip key '{key}' has no counterpart in open_clip's CLIP")
        theirs[new] = value
    return theirs


def is_open_clip_state_dict(state_dict: Mapping[str, Any]) -> bool:
    """True for open_clip's layout, False for ours (decided by the block names)."""
    keys = list(state_dict)
    if any(_OURS_BLOCK.match(k) for k in keys) or "visual.patch_embed.weight" in state_dict:
        return False
    return any(_OC_VISUAL_BLOCK.match(k) or _OC_TEXT_BLOCK.match(k) for k in keys) or "visual.conv1.weight" in state_dict


def _unwrap(obj: Any, path: Path) -> dict[str, torch.Tensor]:
    """The tensor dict inside a checkpoint: plain, {'state_dict': …} (open_clip training), {'model': …}/{'module': …};
    strips the `module.` prefix that DDP/DeepSpeed add."""
    for wrapper in ("state_dict", "model", "module"):
        if isinstance(obj, Mapping) and isinstance(obj.get(wrapper), Mapping):
            obj = obj[wrapper]
            break
    if not isinstance(obj, Mapping) or not obj:
        raise CheckpointError(f"{path}: no state dict found (got {type(obj).__name__})")
    state_dict = {}
    for key, value in obj.items():
        if key.startswith("module."):
            key = key[len("module."):]
        if isinstance(value, torch.Tensor):
            state_dict[key] = value
        elif key not in _IGNORED_OPEN_CLIP:
            raise CheckpointError(f"{path}: entry '{key}' is a {type(value).__name__}, not a tensor")
    return state_dict


# looked for, in order, when `load_pretrained` is given a directory (ours, then open_clip's hub names)
WEIGHT_FILE_NAMES = ("model.safetensors", "open_clip_model.safetensors", "open_clip_pytorch_model.bin",
                     "pytorch_model.bin", "model.pt")


def read_state_dict(path: str | Path) -> dict[str, torch.Tensor]:
    """Tensors of a weights file: .safetensors, or a torch file (.pt/.bin/.pth; OpenAI's TorchScript too).

    A directory stands for the first of `WEIGHT_FILE_NAMES` in it (e.g. a run's `final/`).
    """
    path = Path(path)
    if path.is_dir():
        found = [path / name for name in WEIGHT_FILE_NAMES if (path / name).is_file()]
        if not found:
            raise CheckpointError(f"{path}: directory holds none of {', '.join(WEIGHT_FILE_NAMES)}")
        path = found[0]
    if not path.is_file():
        raise CheckpointError(f"weights file not found: {path}")
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        return _unwrap(load_file(str(path), device="cpu"), path)
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except RuntimeError as err:
        if "TorchScript" not in str(err) and "constants.pkl" not in str(err):
            raise CheckpointError(f"{path}: cannot read as a torch checkpoint: {err}") from err
        obj = torch.jit.load(str(path), map_location="cpu").state_dict()  # OpenAI's JIT archives
    except Exception as err:  # pickle errors, truncated files
        raise CheckpointError(f"{path}: cannot read as a torch checkpoint: {err}") from err
    return _unwrap(obj, path)


def _fit_to_model(state_dict: dict[str, torch.Tensor], model: nn.Module, source: str) -> list[str]:
    """Adapt position embeddings to the model's image grid / context; check names and shapes.

    Returns notes on what was adapted.
    """
    notes: list[str] = []
    expected = model.state_dict()
    key = "visual.positional_embedding"
    if key in state_dict and key in expected and state_dict[key].shape != expected[key].shape:
        grid = model.visual.grid
        old_tokens = state_dict[key].shape[0]
        state_dict[key] = interpolate_pos_embed(state_dict[key], grid)
        notes.append(f"{key}: {old_tokens} -> {state_dict[key].shape[0]} tokens (bicubic, CLS kept)")
    key = "text.positional_embedding"
    if key in state_dict and key in expected and state_dict[key].shape[0] > expected[key].shape[0]:
        # causal: the first positions never see later ones, so keeping the prefix is exact
        notes.append(f"{key}: context {state_dict[key].shape[0]} -> {expected[key].shape[0]} (prefix kept)")
        state_dict[key] = state_dict[key][: expected[key].shape[0]]
    filled = [key for key in expected.keys() - state_dict.keys() if key.endswith(VARIANT_PARAMS)]
    for key in sorted(filled):  # the gate opens (SiLU(bias) = 1), the rest is 0: the file's attention unchanged
        state_dict[key] = torch.full_like(expected[key], GATE_OPEN_BIAS if key.endswith("attn.gate.bias") else 0.0)
    if filled:
        notes.append(f"{len(filled)} linear-variant parameters not in the file start at 0, an open gate "
                     f"({', '.join(sorted({k.split('.attn.')[1] for k in filled}))})")
    if "logit_bias" in expected and "logit_bias" not in state_dict:
        # a CLIP checkpoint fine-tuned with the sigmoid loss: the bias starts at the model's init
        state_dict["logit_bias"] = expected["logit_bias"].clone()
        notes.append(f"logit_bias not in the file: starts at model.init_logit_bias ({float(expected['logit_bias']):g})")
    missing = sorted(expected.keys() - state_dict.keys())
    unexpected = sorted(state_dict.keys() - expected.keys())
    if "logit_bias" in unexpected:
        unexpected[unexpected.index("logit_bias")] = "logit_bias (a SigLIP checkpoint: train with train.loss=siglip)"
    if missing or unexpected:
        parts = []
        if missing:
            parts.append(f"missing keys {missing[:5]}{' …' if len(missing) > 5 else ''}")
        if unexpected:
            parts.append(f"unexpected keys {unexpected[:5]}{' …' if len(unexpected) > 5 else ''}")
        raise CheckpointError(f"{source}: does not fit the model: " + "; ".join(parts)
                              + " (different number of layers or a different model family?)")
    for key, value in state_dict.items():
        if value.shape != expected[key].shape:
            raise CheckpointError(
                f"{source}: key '{key}' has shape {tuple(value.shape)}, the model expects "
                f"{tuple(expected[key].shape)} (a different preset or width?)"
            )
    return notes


def load_pretrained(model: nn.Module, path_or_state_dict: str | Path | Mapping[str, torch.Tensor]) -> list[str]:
    """Load open_clip or ds_linclip weights into `model` (any attention kinds); returns notes on adaptations.

    Accepts a path (.pt/.bin/.pth/.safetensors, plain or wrapped in `state_dict`, `module.` prefixes
    stripped) or a state dict. The image position embedding is interpolated to the model's image
    size; a longer text context is cut to the model's. Anything else that differs is an error
    naming the key.
    """
    if isinstance(path_or_state_dict, Mapping):
        source, state_dict = "state dict", _unwrap(path_or_state_dict, Path("<state dict>"))
    else:
        source, state_dict = str(path_or_state_dict), read_state_dict(path_or_state_dict)
    try:
        if is_open_clip_state_dict(state_dict):
            state_dict = from_open_clip_state_dict(state_dict)
    except CheckpointError as err:
        raise CheckpointError(f"{source}: {err}") from None
    notes = _fit_to_model(state_dict, model, source)
    model.load_state_dict(state_dict, strict=True)
    return notes
