"""Patch dropout (FLIP): the same kept tokens and outputs as open_clip's `PatchDropout` for softmax,
every linear variant trains with it, the local branch's treatment of dropped patches, FLOPs."""

from __future__ import annotations

import open_clip
import pytest
import torch
from open_clip.transformer import PatchDropout

from ds_linclip.config import ConfigError, load_config
from ds_linclip.models import build_model
from ds_linclip.models.attention import Attention
from ds_linclip.models.clip import model_config
from ds_linclip.models.convert import load_pretrained
from ds_linclip.models.flops import measure_forward_flops, model_cost
from ds_linclip.models.vit import draw_kept_patches, kept_patch_count

LINEAR_VARIANTS = ["linear-affine", "linear-focused", "linear-elu", "linear-relu", "linear-focused-local3",
                   "linear-affine-local5"]


def tiny_open_clip(patch_dropout: float):
    """open_clip's CLIP with the `tiny` preset's shapes and FLIP patch dropout."""
    from open_clip.model import CLIP as OpenClipCLIP

    torch.manual_seed(0)
    return OpenClipCLIP(
        embed_dim=128,
        vision_cfg={"image_size": 32, "patch_size": 4, "width": 128, "layers": 4, "head_width": 32,
                    "patch_dropout": patch_dropout},
        text_cfg={"context_length": 32, "vocab_size": 49408, "width": 128, "heads": 4, "layers": 4},
    )


@pytest.mark.parametrize("dropout", [0.25, 0.5, 0.9])
def test_same_seed_keeps_the_same_tokens_as_open_clip(dropout):
    batch, patches, width = 3, 64, 8
    # every token distinct and tagged with its grid index in channel 0
    tokens = torch.randn(batch, 1 + patches, width)
    tokens[:, :, 0] = torch.arange(-1, patches).float()
    reference = PatchDropout(dropout).train()
    torch.manual_seed(7)
    kept_reference = reference(tokens)
    torch.manual_seed(7)
    kept = draw_kept_patches(batch, patches, dropout)
    assert kept.shape == (batch, kept_patch_count(patches, dropout)) == (batch, max(1, int(patches * (1 - dropout))))
    assert torch.equal(kept_reference[:, 0], tokens[:, 0])  # CLS first, always
    assert torch.equal(kept_reference[:, 1:, 0].long(), kept)  # same patches, same order
    assert len(set(kept[0].tolist())) == kept.shape[1]  # no patch twice
    assert not torch.equal(kept[0], kept[1])  # each image draws its own


def test_softmax_model_matches_open_clip_with_patch_dropout_in_training():
    reference = tiny_open_clip(0.5).train()
    ours = build_model(model_config("tiny", {"image.patch_dropout": 0.5})).train()
    load_pretrained(ours, reference.state_dict())
    images = torch.randn(4, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    tokens = open_clip.tokenize(["a shirt", "a bag", "a sneaker", "a dress"], context_length=32)
    torch.manual_seed(3)
    want = reference.encode_image(images, normalize=True)
    torch.manual_seed(3)
    got = ours.encode_image(images)
    torch.testing.assert_close(got, want, rtol=0, atol=1e-5)
    torch.manual_seed(4)
    other_draw = ours.encode_image(images)
    assert (other_draw - got).abs().max() > 1e-3  # the draw matters: the comparison is not vacuous
    # eval keeps every patch: open_clip's model without dropout, output for output
    ours.eval(), reference.eval()
    full = tiny_open_clip(0.0).eval()
    full.load_state_dict(reference.state_dict())
    with torch.no_grad():
        torch.testing.assert_close(ours.encode_image(images), full.encode_image(images, normalize=True), rtol=0, atol=1e-5)
        torch.testing.assert_close(ours.encode_text(tokens), full.encode_text(tokens, normalize=True), rtol=0, atol=1e-5)


@pytest.mark.parametrize("attention", LINEAR_VARIANTS)
def test_every_linear_variant_trains_with_patch_dropout(attention):
    torch.manual_seed(0)
    model = build_model(model_config("tiny", {"image.attention": attention.split("-local")[0],
                                              "image.local_kernel": int(attention.split("-local")[1])
                                              if "-local" in attention else 0,
                                              "image.patch_dropout": 0.5}))
    images = torch.randn(2, 3, 32, 32)
    seen = []
    for block in model.visual.blocks:
        block.register_forward_hook(lambda module, args, out: seen.append(out.shape[1]))
    features = model.encode_image(images)
    assert seen == [1 + 32] * 4  # 64 patches, half kept, + CLS
    features.sum().backward()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in model.visual.parameters())
    model.eval()
    seen.clear()
    with torch.no_grad():
        model.encode_image(images)
    assert seen == [1 + 64] * 4


def _attention_with_local(kernel: int = 3, width: int = 16) -> Attention:
    torch.manual_seed(0)
    attention = Attention(width, 2, "linear-focused-local3" if kernel == 3 else "linear-focused-local5")
    torch.nn.init.normal_(attention.local_conv.weight)
    return attention


def test_local_branch_with_every_patch_kept_equals_the_full_grid():
    attention = _attention_with_local()
    x = torch.randn(2, 1 + 25, 16)
    everything = torch.arange(25).expand(2, 25)
    torch.testing.assert_close(attention(x, (5, 5), everything), attention(x, (5, 5)), rtol=0, atol=1e-6)
    # kept in another order (as the random draw gives them): each token still gets its own place's conv
    order = torch.stack([torch.randperm(25, generator=torch.Generator().manual_seed(s)) for s in (1, 2)])
    shuffled = torch.cat([x[:, :1], x[:, 1:].gather(1, order[..., None].expand(-1, -1, 16))], dim=1)
    full = attention._add_local(torch.zeros(2, 26, 16), attention.qkv(x)[..., 32:], (5, 5))
    dropped = attention._add_local(torch.zeros(2, 26, 16), attention.qkv(shuffled)[..., 32:], (5, 5), order)
    torch.testing.assert_close(dropped[:, 1:], full[:, 1:].gather(1, order[..., None].expand(-1, -1, 16)),
                               rtol=0, atol=1e-6)


def test_a_dropped_patch_contributes_nothing_to_the_local_branch():
    attention = _attention_with_local()
    width, grid = 16, (5, 5)
    kept = torch.tensor([[12, 0, 7, 13, 24, 6]])  # 12 = the centre; 6, 7, 13 its neighbours; 11, 17, ... dropped
    values = torch.randn(1, 1 + 6, width)
    local = attention._add_local(torch.zeros(1, 7, width), values, grid, kept)[0, 1:]  # (kept, width)
    # reference: the full-grid conv of a grid holding the kept values and zeros at the dropped places
    grid_values = torch.zeros(1, 25, width)
    grid_values[0, kept[0]] = values[0, 1:]
    full = attention._add_local(torch.zeros(1, 26, width), torch.cat([values[:, :1], grid_values], 1), grid)[0, 1:]
    torch.testing.assert_close(local, full[kept[0]], rtol=0, atol=1e-6)
    # changing the value of a dropped patch (given the full grid) changes nothing for the kept ones
    grid_values[0, 11] = 100.0  # left of the centre, dropped
    moved = attention._add_local(torch.zeros(1, 26, width), torch.cat([values[:, :1], grid_values], 1), grid)[0, 1:]
    assert (moved[12] - full[12]).abs().max() > 1  # in the full grid it would reach the centre
    torch.testing.assert_close(attention._add_local(torch.zeros(1, 7, width), values, grid, kept)[0, 1:], local)


@pytest.mark.parametrize("attention,local", [("softmax", 0), ("linear-focused", 3), ("linear-affine", 0)])
@pytest.mark.parametrize("dropout", [0.0, 0.5, 0.75])
def test_flops_count_the_kept_tokens(attention, local, dropout):
    cfg = model_config("tiny", {"image.attention": attention, "image.local_kernel": local})
    cost = model_cost(cfg, patch_dropout=dropout)
    assert cost.image.tokens == 1 + kept_patch_count(64, dropout)
    # the counter sees the training forward with the dropout drawn (meta device: shapes only)
    assert cost.image.flops == measure_forward_flops(cfg, patch_dropout=dropout)["image"]
    if dropout:
        assert cost.image.flops < model_cost(cfg).image.flops
        assert cost.params == model_cost(cfg).params


def test_b16_at_448_with_half_the_patches_dropped():
    cfg = model_config("vit_b16")
    assert model_cost(cfg, 448).image.tokens == 785
    assert model_cost(cfg, 448, patch_dropout=0.5).image.tokens == 1 + 392


@pytest.mark.parametrize("value", [-0.1, 1.0, 1.5])
def test_patch_dropout_outside_0_1_fails_naming_the_key(value):
    with pytest.raises(ConfigError, match=r"model\.image\.patch_dropout"):
        load_config(overrides=["model.preset=tiny", f"model.image.patch_dropout={value}"])
