"""CLIP: a vision tower, a text tower, and a learned temperature; `build_model` from the config."""

from __future__ import annotations

import dataclasses
import math
from typing import Any, Mapping

import torch
import torch.nn.functional as F
from torch import nn

from ds_linclip.models.attention import AttentionSpec, AttentionSpecError, as_spec, resolve_attention
from ds_linclip.models.groups import lock_tower
from ds_linclip.models.text import TextTransformer
from ds_linclip.models.vit import VisionTransformer

# Parameter names (leaf part) kept out of weight decay besides every 1-d parameter
# (biases, LayerNorm weights, class_embedding, logit_scale): the embeddings.
NO_DECAY_2D = ("positional_embedding", "token_embedding.weight")


class CLIP(nn.Module):
    """Two towers mapping images and captions into one `embed_dim` space.

    `forward(images (B,3,H,W), tokens (B,context)) -> (image_features (B,E), text_features (B,E),
    logit_scale.exp() ())`, features L2-normalised; with a logit bias (`init_logit_bias` not None,
    SigLIP's) a fourth element, `logit_bias` (), as open_clip's CLIP returns it.
    """

    def __init__(self, visual: VisionTransformer, text: TextTransformer, init_logit_scale: float = math.log(1 / 0.07),
                 init_logit_bias: float | None = None):
        super().__init__()
        self.visual = visual
        self.text = text
        self.logit_scale = nn.Parameter(torch.tensor(float(init_logit_scale)))  # scalar, ln(temperature⁻¹)
        # scalar added to every logit (SigLIP's sigmoid loss); None keeps the plain CLIP state dict
        self.logit_bias = None if init_logit_bias is None else nn.Parameter(torch.tensor(float(init_logit_bias)))

    def encode_image(self, images: torch.Tensor) -> torch.Tensor:
        """(batch, 3, H, W) float -> (batch, embed_dim), unit L2 norm."""
        return F.normalize(self.visual(images), dim=-1)

    def encode_text(self, tokens: torch.Tensor) -> torch.Tensor:
        """(batch, context) long -> (batch, embed_dim), unit L2 norm."""
        return F.normalize(self.text(tokens), dim=-1)

    def forward(self, images: torch.Tensor, tokens: torch.Tensor) -> tuple[torch.Tensor, ...]:
        outputs = (self.encode_image(images), self.encode_text(tokens), self.logit_scale.exp())
        return outputs if self.logit_bias is None else outputs + (self.logit_bias,)

    def set_grad_checkpointing(self, every: int = 1) -> None:
        """Recompute every `every`-th block of both towers in backward (0 = off)."""
        if every < 0:
            raise ValueError(f"grad checkpointing interval must be >= 0, got {every}")
        self.visual.checkpoint_every = int(every)
        self.text.checkpoint_every = int(every)

    def lock_image_tower(self, unlocked_groups: int = 0) -> list[str]:
        """LiT: freeze the image tower but its last `unlocked_groups` lock groups (open_clip's grouping,
        models/groups.py); returns the frozen parameter names (model-relative)."""
        return [f"visual.{name}" for name in lock_tower(self.visual, unlocked_groups)]

    def lock_text_tower(self, unlocked_layers: int = 0, freeze_layer_norm: bool = True) -> list[str]:
        """Freeze the text tower but its last `unlocked_layers` lock groups; freeze_layer_norm=False keeps
        the frozen groups' LayerNorms trainable. Returns the frozen parameter names (model-relative)."""
        return [f"text.{name}" for name in lock_tower(self.text, unlocked_layers, freeze_layer_norm)]

    def no_weight_decay_names(self) -> set[str]:
        """Names of parameters exempt from weight decay: biases, norms, embeddings, logit_scale, logit_bias."""
        return {
            name
            for name, param in self.named_parameters()
            if param.ndim < 2 or name.endswith(NO_DECAY_2D)
        }

    def attention_kinds(self) -> dict[str, str]:
        """{'image': name, 'text': name} as built, e.g. {'image': 'linear-focused-local3', 'text': 'linear-focused'}."""
        return {"image": self.visual.attention.name, "text": self.text.attention.name}

    def set_attention(self, image: AttentionSpec | str | None = None, text: AttentionSpec | str | None = None) -> None:
        """Switch a tower's attention in place (same weights): e.g. linearise a softmax model.

        Specs or names (`linear-focused-local3`; see `parse_attention_name`). Parameters a variant adds
        start where a converted model stays sensible: focus_scale 0 (s = softplus(0)), pola_power 0 (p = 3),
        local conv 0, gate open (weight 0, SiLU(bias) = 1).
        """
        for tower, spec in ((self.visual, image), (self.text, text)):
            if spec is None:
                continue
            spec = as_spec(spec, causal=tower is self.text)
            for block, layer_spec in zip(tower.blocks, spec.layer_specs(len(tower.blocks))):
                block.attn.set_spec(layer_spec, zero_init_new=True)
            tower.attention = spec


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


def tower_attention(tower: Mapping[str, Any], name: str) -> AttentionSpec:
    """The AttentionSpec of `model.<name>` (a config section or plain mapping); ValueError names the key."""
    try:
        return resolve_attention(tower, causal=name == "text")
    except AttentionSpecError as err:
        raise ValueError(f"model.{name}.{err.key}: {err}") from None


def build_model(cfg: Any, load_pretrained_weights: bool = True) -> CLIP:
    """A CLIP from the `model` config section (`cfg.model`), or from a preset name.

    If `cfg.pretrained` is set and `load_pretrained_weights`, the weights are loaded with
    `convert.load_pretrained` (open_clip or ours; a softmax checkpoint loads into linear attention).
    Pass `load_pretrained_weights=False` when the caller loads them itself (e.g. under ZeRO-3 init).
    `model.<tower>.lock` freezes that tower (requires_grad=False) but its unlocked groups (models/groups.py).
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
        mlp_ratio=image.get("mlp_ratio", 4.0), attention=tower_attention(image, "image"), backend=backend,
        patch_dropout=float(image.get("patch_dropout", 0.0) or 0.0),
    )
    text_tower = TextTransformer(
        context_length=text["context_length"], vocab_size=text["vocab_size"], width=text["width"],
        layers=text["layers"], heads=text["heads"], embed_dim=embed_dim,
        mlp_ratio=text.get("mlp_ratio", 4.0), attention=tower_attention(text, "text"), backend=backend,
    )
    model = CLIP(visual, text_tower, init_logit_scale=model_cfg.get("init_logit_scale", math.log(1 / 0.07)),
                 init_logit_bias=model_cfg.get("init_logit_bias"))
    pretrained = model_cfg.get("pretrained")
    if pretrained and load_pretrained_weights:
        from ds_linclip.models.convert import load_pretrained

        load_pretrained(model, pretrained)
    if image.get("lock"):
        model.lock_image_tower(int(image.get("unlocked_groups", 0)))
    if text.get("lock"):
        model.lock_text_tower(int(text.get("unlocked_layers", 0)), bool(text.get("freeze_layer_norm", True)))
    return model
