"""CLIP model: build from config, shapes, normalisation, checkpointing, pooling, position interpolation."""

from __future__ import annotations

import math

import pytest
import torch

from ds_linclip.config import load_config
from ds_linclip.models import CLIP, build_model, interpolate_pos_embed, model_config
from ds_linclip.models.vit import VisionTransformer

EOT = 49407


def tiny_inputs(batch=2, image_size=32, context=32, seed=0):
    generator = torch.Generator().manual_seed(seed)
    images = torch.randn(batch, 3, image_size, image_size, generator=generator)
    tokens = torch.randint(1, EOT, (batch, context), generator=generator)
    lengths = torch.tensor([7, 19])[:batch]
    for row, length in enumerate(lengths):  # caption: SOT ... EOT then zero padding, like the tokenizer
        tokens[row, 0], tokens[row, length], tokens[row, length + 1 :] = 49406, EOT, 0
    return images, tokens


@pytest.mark.parametrize("attention", ["softmax", "linear-affine", "linear-elu", "linear-relu"])
def test_tiny_forward_shapes_norms_and_scale(attention):
    cfg = load_config(overrides=["model.preset=tiny", f"model.image.attention={attention}", f"model.text.attention={attention}"])
    torch.manual_seed(0)
    model = build_model(cfg.model)
    assert isinstance(model, CLIP)
    assert model.attention_kinds() == {"image": attention, "text": attention}
    images, tokens = tiny_inputs()
    image_features, text_features, scale = model(images, tokens)
    assert image_features.shape == (2, 128) and text_features.shape == (2, 128)
    torch.testing.assert_close(image_features.norm(dim=-1), torch.ones(2))
    torch.testing.assert_close(text_features.norm(dim=-1), torch.ones(2))
    assert scale.ndim == 0 and math.isclose(scale.item(), 1 / 0.07, rel_tol=1e-6)
    assert model.logit_scale.item() == pytest.approx(math.log(1 / 0.07))
    # each tower maps different inputs to different features (not a constant)
    assert (image_features[0] - image_features[1]).abs().max() > 1e-3
    assert (text_features[0] - text_features[1]).abs().max() > 1e-3
    torch.testing.assert_close(model.encode_image(images), image_features)
    torch.testing.assert_close(model.encode_text(tokens), text_features)


def test_towers_choose_attention_independently():
    model = build_model(model_config("tiny", {"image.attention": "linear-affine", "text.attention": "softmax",
                                              "image.denominator": "kernel"}))
    assert model.attention_kinds() == {"image": "linear-affine", "text": "softmax"}
    assert all(b.attn.denominator == "kernel" and not b.attn.causal for b in model.visual.blocks)
    assert all(b.attn.causal for b in model.text.blocks)


@pytest.mark.parametrize("attention", ["softmax", "linear-affine"])
def test_text_pooled_at_eot_and_blind_to_padding(attention):
    torch.manual_seed(0)
    model = build_model(model_config("tiny", {"text.attention": attention})).eval()
    _, tokens = tiny_inputs()
    changed = tokens.clone()
    changed[0, 8:] = torch.randint(1, 1000, (changed.shape[1] - 8,))  # after row 0's EOT at 7
    changed[1, 25:] = 5
    with torch.no_grad():
        torch.testing.assert_close(model.encode_text(changed), model.encode_text(tokens), rtol=0, atol=1e-6)
        before_eot = tokens.clone()
        before_eot[0, 3] = 1234  # a token before EOT does matter
        assert (model.encode_text(before_eot)[0] - model.encode_text(tokens)[0]).abs().max() > 1e-4


@pytest.mark.parametrize("every", [1, 2])
def test_grad_checkpointing_gives_same_gradients(every):
    torch.manual_seed(0)
    model = build_model(model_config("tiny", {"image.attention": "linear-affine", "text.attention": "linear-affine"}))
    images, tokens = tiny_inputs()

    def grads():
        model.zero_grad()
        image_features, text_features, scale = model(images, tokens)
        (scale * image_features @ text_features.T).logsumexp(-1).sum().backward()
        return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}

    plain = grads()
    model.set_grad_checkpointing(every)
    checkpointed = grads()
    model.set_grad_checkpointing(0)
    assert plain.keys() == checkpointed.keys() and len(plain) == len(list(model.parameters()))
    for name in plain:
        torch.testing.assert_close(checkpointed[name], plain[name], rtol=1e-5, atol=1e-7, msg=name)


def test_grad_checkpointing_actually_recomputes():
    torch.manual_seed(0)
    model = build_model("tiny")
    calls = {"n": 0}
    # a pre-hook: recomputation may stop early (after the last saved tensor), skipping post-hooks
    model.visual.blocks[0].register_forward_pre_hook(lambda *_: calls.__setitem__("n", calls["n"] + 1))
    images, tokens = tiny_inputs()
    model.set_grad_checkpointing(1)
    model.encode_image(images).sum().backward()
    assert calls["n"] == 2  # forward + recomputation in backward
    model.set_grad_checkpointing(0)
    model.encode_image(images).sum().backward()
    assert calls["n"] == 3  # forward only
    with pytest.raises(ValueError):
        model.set_grad_checkpointing(-1)


def test_no_weight_decay_names():
    model = build_model("tiny")
    names = model.no_weight_decay_names()
    params = dict(model.named_parameters())
    assert names <= params.keys()
    for expected in ["logit_scale", "visual.class_embedding", "visual.positional_embedding", "visual.ln_pre.weight",
                     "visual.blocks.0.attn.qkv.bias", "text.positional_embedding", "text.token_embedding.weight",
                     "text.ln_final.bias", "text.blocks.3.mlp.c_fc.bias"]:
        assert expected in names, expected
    for decayed in ["visual.blocks.0.attn.qkv.weight", "visual.patch_embed.weight", "visual.proj",
                    "text.text_projection", "text.blocks.0.mlp.c_proj.weight", "text.blocks.0.attn.out_proj.weight"]:
        assert decayed not in names, decayed
    assert all(params[n].ndim >= 2 for n in params.keys() - names)


def test_pos_embed_interpolation_224_to_384_keeps_cls_and_runs():
    torch.manual_seed(0)
    tower = VisionTransformer(image_size=224, patch_size=16, width=32, layers=1, heads=2, embed_dim=16).eval()
    pos = tower.positional_embedding.detach()
    assert pos.shape == (1 + 14 * 14, 32)
    resized = interpolate_pos_embed(pos, (24, 24))
    assert resized.shape == (1 + 24 * 24, 32)
    torch.testing.assert_close(resized[0], pos[0], rtol=0, atol=0)  # CLS row untouched
    assert interpolate_pos_embed(pos, (14, 14)) is pos
    with torch.no_grad():
        features_384 = tower(torch.randn(2, 3, 384, 384))
        features_224 = tower(torch.randn(2, 3, 224, 224))
    assert features_384.shape == features_224.shape == (2, 16) and torch.isfinite(features_384).all()
    with pytest.raises(ValueError, match="multiple of patch size"):
        tower(torch.randn(1, 3, 200, 200))


def test_pos_embed_interpolation_is_bicubic_on_the_grid():
    # A position embedding linear in the patch-centre coordinates is reproduced exactly by bicubic
    # resizing away from the border (where the cubic kernel's taps are clamped).
    old, new = 14, 24
    centres_old = (torch.arange(old, dtype=torch.float64) + 0.5) / old  # in [0, 1]
    rows, cols = torch.meshgrid(centres_old, centres_old, indexing="ij")
    pos = torch.cat([torch.tensor([[7.0, -7.0]], dtype=torch.float64),
                     torch.stack([rows, 3 * cols - rows], dim=-1).reshape(old * old, 2)])
    resized = interpolate_pos_embed(pos, (new, new))
    centres_new = (torch.arange(new, dtype=torch.float64) + 0.5) / new
    rows_new, cols_new = torch.meshgrid(centres_new, centres_new, indexing="ij")
    expected = torch.stack([rows_new, 3 * cols_new - rows_new], dim=-1)
    got = resized[1:].reshape(new, new, 2)
    inner = slice(4, new - 4)
    torch.testing.assert_close(got[inner, inner], expected[inner, inner], rtol=0, atol=1e-5)
    assert resized[0].tolist() == [7.0, -7.0]


def test_unknown_attention_kind_fails_at_config_time():
    from ds_linclip.config import ConfigError

    with pytest.raises(ConfigError, match="model.image.attention"):
        model_config("tiny", {"image.attention": "linear-afine"})
