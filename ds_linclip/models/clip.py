"""CLIP: a vision tower, a text tower, and a learned temperature; `build_model` from the config."""

from __future__ import annotations

import dataclasses
import math
from typing import Any, Mapping

import torch
import torch.nn.functional as F
from torch import nn

from ds_linclip.models.text import TextTransformer
from kernels.reference import DENOMINATORS
from ds_linclip.models.vit import VisionTransformer

# Parameter names (leaf part) kept out of weight decay besides every 1-d parameter
# (biases, LayerNorm weights, class_embedding, logit_scale): the embeddings.
NO_DECAY_2D = ("positional_embedding", "token_embedding.weight")


class CLIP(nn.Module):
    """Two towers mapping images and captions into one `embed_dim` space.

    `forward(images (B,3,H,W), tokens (B,context)) -> (image_features (B,E), text_features (B,E),
    logit_scale.exp() ())`, features L2-normalised.
    """

    def __init__(self, visual: VisionTransformer, text: TextTransformer, init_logit_scale: float = math.log(1 / 0.07)):
        super().__init__()
        self.visual = visual
        self.text = text
        self.logit_scale = nn.Parameter(torch.tensor(float(init_logit_scale)))  # scalar, ln(temperature⁻¹)

    def encode_image(self, images: torch.Tensor) -> torch.Tensor:
        """(batch, 3, H, W) float -> (batch, embed_dim), unit L2 norm."""
        return F.normalize(self.visual(images), dim=-1)

    def encode_text(self, tokens: torch.Tensor) -> torch.Tensor:
        """(batch, context) long -> (batch, embed_dim), unit L2 norm."""
        return F.normalize(self.text(tokens), dim=-1)

    def forward(self, images: torch.Tensor, tokens: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        return self.encode_image(images), self.encode_text(tokens), self.logit_scale.exp()

    def set_grad_checkpointing(self, every: int = 1) -> None:
        """Recompute every `every`-th block of both towers in backward (0 = off)."""
        if every < 0:
            raise ValueError(f"grad checkpointing interval must be >= 0, got {every}")
        self.visual.checkpoint_every = int(every)
        self.text.checkpoint_every = int(every)

    def no_weight_decay_names(self) -> set[str]:
        """Names of parameters exempt from weight decay: biases, norms, embeddings, logit_scale."""
        return {
            name
            for name, param in self.named_parameters()
            if param.ndim < 2 or name.endswith(NO_DECAY_2D)
        }

    def attention_kinds(self) -> dict[str, str]:
        """{'image': kind, 'text': kind} as built."""
        return {"image": self.visual.blocks[0].attn.kind, "text": self.text.blocks[0].attn.kind}

    def set_attention(self, image: str | None = None, text: str | None = None, denominator: str | None = None) -> None:
        """Switch the attention kind of a tower in place (same weights): e.g. linearize a softmax model."""
        from ds_linclip.models.attention import ATTENTION_KINDS

        for kind in (image, text):
            if kind is not None and kind not in ATTENTION_KINDS:
                raise ValueError(f"unknown attention kind '{kind}' (known: {', '.join(ATTENTION_KINDS)})")
        if denominator is not None and denominator not in DENOMINATORS:
            raise ValueError(f"unknown denominator '{denominator}' (known: count, kernel)")
        for tower, kind in ((self.visual, image), (self.text, text)):
            for block in tower.blocks:
                if kind is not None:
                    block.attn.kind = kind
                if denominator is not None:
                    block.attn.denominator = denominator


def _as_dict(cfg: Any) -> dict[str, Any]:
    if dataclasses.is_dataclass(cfg):
        return dataclasses.asdict(cfg)
    try:
        from omegaconf import DictConfig, OmegaConf

        if isinstance(cfg, DictConfig):
            return OmegaConf.to_container(cfg, resolve=True)  # type: ignore[return-value]
    except ImportError:  # pragma: no cover - omegaconf is a dependency
        pass
    if isinstance(cfg, Mapping):
        return dict(cfg)
    raise TypeError(f"model config must be a DictConfig, dataclass or mapping, got {type(cfg).__name__}")


def model_config(preset: str, overrides: Mapping[str, Any] | None = None) -> Any:
    """The resolved `model` section for a preset plus `model.`-relative dotted overrides.

    >>> cfg = model_config("vit_b16", {"image.attention": "linear-affine"})
    """
    from ds_linclip.config import load_config

    dotlist = [f"model.preset={preset}"] + [f"model.{key}={value}" for key, value in (overrides or {}).items()]
    return load_config(overrides=dotlist).model


def build_model(cfg: Any, load_pretrained_weights: bool = True) -> CLIP:
    """A CLIP from the `model` config section (`cfg.model`), or from a preset name.

    If `cfg.pretrained` is set and `load_pretrained_weights`, the weights are loaded with
    `convert.load_pretrained` (open_clip or ours; a softmax checkpoint loads into linear attention).
    Pass `load_pretrained_weights=False` when the caller loads them itself (e.g. under ZeRO-3 init).
    """
    if isinstance(cfg, str):
        cfg = model_config(cfg)
    model_cfg = _as_dict(cfg)
    image, text = model_cfg["image"], model_cfg["text"]
    backend = model_cfg.get("attention_backend", "auto")
    embed_dim = model_cfg["embed_dim"]
    visual = VisionTransformer(
        image_size=image["image_size"], patch_size=image["patch_size"], width=image["width"],
        layers=image["layers"], heads=image["heads"], embed_dim=embed_dim,
        mlp_ratio=image.get("mlp_ratio", 4.0), attention=image.get("attention", "softmax"),
        denominator=image.get("denominator", "count"), backend=backend,
    )
    text_tower = TextTransformer(
        context_length=text["context_length"], vocab_size=text["vocab_size"], width=text["width"],
        layers=text["layers"], heads=text["heads"], embed_dim=embed_dim,
        mlp_ratio=text.get("mlp_ratio", 4.0), attention=text.get("attention", "softmax"),
        denominator=text.get("denominator", "count"), backend=backend,
    )
    model = CLIP(visual, text_tower, init_logit_scale=model_cfg.get("init_logit_scale", math.log(1 / 0.07)))
    pretrained = model_cfg.get("pretrained")
    if pretrained and load_pretrained_weights:
        from ds_linclip.models.convert import load_pretrained

        load_pretrained(model, pretrained)
    return model
