"""CLIP models with a per-tower attention kind (softmax or linear).

    from ds_linclip.models import build_model, load_pretrained
    model = build_model(cfg.model)            # or build_model("tiny")
    image_features, text_features, scale = model(images, tokens)
    load_pretrained(model, "open_clip_pytorch_model.bin")   # open_clip or ours, any attention kind

Sizes: `python -m ds_linclip.models --preset vit_b16 --attention linear-affine` (see `flops.py`).
"""

from ds_linclip.models.attention import ATTENTION_KINDS, Attention, Block
from ds_linclip.models.clip import CLIP, build_model, model_config
from ds_linclip.models.convert import (
    CheckpointError,
    from_open_clip_state_dict,
    load_pretrained,
    to_open_clip_state_dict,
)
from ds_linclip.models.flops import attention_flops_per_image, measure_forward_flops, model_cost
from ds_linclip.models.presets import OPEN_CLIP_NAMES, PRESETS
from ds_linclip.models.text import TextTransformer
from ds_linclip.models.vit import VisionTransformer, interpolate_pos_embed

__all__ = [
    "ATTENTION_KINDS", "Attention", "Block", "CLIP", "build_model", "model_config", "CheckpointError",
    "from_open_clip_state_dict", "to_open_clip_state_dict", "load_pretrained", "model_cost",
    "attention_flops_per_image", "measure_forward_flops", "PRESETS", "OPEN_CLIP_NAMES",
    "TextTransformer", "VisionTransformer", "interpolate_pos_embed",
]
