"""CLIP models with a per-tower attention kind (softmax or linear).

    from ds_linclip.models import build_model
    model = build_model(cfg.model)            # or build_model("tiny")
    image_features, text_features, scale = model(images, tokens)
"""

from ds_linclip.models.attention import ATTENTION_KINDS, Attention, Block
from ds_linclip.models.clip import CLIP, build_model, model_config
from ds_linclip.models.presets import OPEN_CLIP_NAMES, PRESETS
from ds_linclip.models.text import TextTransformer
from ds_linclip.models.vit import VisionTransformer, interpolate_pos_embed

__all__ = [
    "ATTENTION_KINDS", "Attention", "Block", "CLIP", "build_model", "model_config", "PRESETS",
    "OPEN_CLIP_NAMES", "TextTransformer", "VisionTransformer", "interpolate_pos_embed",
]
