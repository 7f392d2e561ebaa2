"""Locked towers (LiT), per-tower learning rates and layer-wise lr decay (no processes).

Lock groups are checked against open_clip's own `lock_image_tower` / `lock_text_tower` on the same
weights (converted with ds_linclip.models.convert); the lr groups against hand-computed values and
DeepSpeed's scheduler; one real AdamW step shows a group at lr 0 does not move.
"""

from __future__ import annotations

import math

import pytest
import torch
from test_convert import tiny_open_clip

from ds_linclip.config import ConfigError, load_config
from ds_linclip.models import build_model
from ds_linclip.models.convert import from_open_clip_state_dict
from ds_linclip.models.groups import layer_ids, lock_groups
from ds_linclip.train.engine import build_ds_config, param_groups, promote_scalar_parameters
from ds_linclip.train.lr_groups import LR_SCALE, describe_groups, lr_scales, scheduled_lr

TINY_LAYERS = 4  # both towers of the tiny preset


def _tiny(*overrides):
    return load_config([], ["model.preset=tiny", *overrides])


def _frozen_open_clip_names(model) -> set[str]:
    """open_clip's frozen parameters under our names (through the converter's name mapping)."""
    frozen = {name: param for name, param in model.named_parameters() if not param.requires_grad}
    return set(from_open_clip_state_dict(frozen))


@pytest.mark.parametrize("unlocked", range(TINY_LAYERS + 3))
def test_image_lock_groups_equal_open_clips(unlocked):
    reference = tiny_open_clip()
    if unlocked <= TINY_LAYERS + 2:
        reference.lock_image_tower(unlocked_groups=unlocked)
    ours = build_model(_tiny().model)
    ours.load_state_dict(from_open_clip_state_dict(reference.state_dict()))
    if unlocked > TINY_LAYERS + 2:  # open_clip unlocks everything silently; ours refuses
        with pytest.raises(ValueError, match="0..6"):
            ours.lock_image_tower(unlocked)
        return
    frozen = set(ours.lock_image_tower(unlocked))
    assert frozen == _frozen_open_clip_names(reference)
    assert frozen == {n for n, p in ours.named_parameters() if not p.requires_grad}
    assert all(n.startswith("visual.") for n in frozen)
    assert len(frozen) == {0: 5 + 12 * TINY_LAYERS + 3, TINY_LAYERS + 2: 0}.get(unlocked, len(frozen))


@pytest.mark.parametrize("unlocked", range(TINY_LAYERS + 3))
def test_text_lock_groups_equal_open_clips(unlocked):
    reference = tiny_open_clip()
    reference.lock_text_tower(unlocked_layers=unlocked)
    ours = build_model(_tiny().model)
    frozen = set(ours.lock_text_tower(unlocked))
    assert frozen == _frozen_open_clip_names(reference)
    assert all(n.startswith("text.") for n in frozen) and "logit_scale" not in frozen


def test_group_order_and_layer_ids_on_the_tiny_model():
    model = build_model(_tiny("model.image.attention=linear-focused", "model.image.local_kernel=3").model)
    groups = lock_groups(model.visual)
    assert sorted(groups[0]) == ["class_embedding", "ln_pre.bias", "ln_pre.weight", "patch_embed.weight",
                                 "positional_embedding"]
    # a linear variant's own parameters go with their block
    assert {"blocks.1.attn.focus_scale", "blocks.1.attn.local_conv.weight", "blocks.1.attn.local_conv.bias"} <= set(groups[2])
    assert groups[TINY_LAYERS][-2:] == ["ln_post.weight", "ln_post.bias"]  # with the last block
    assert groups[-1] == ["proj"]
    ids = layer_ids(model.text)
    assert ids["token_embedding.weight"] == ids["positional_embedding"] == 0
    assert ids["blocks.0.attn.qkv.weight"] == 1 and ids["blocks.3.mlp.c_fc.bias"] == TINY_LAYERS
    assert ids["ln_final.weight"] == ids["text_projection"] == TINY_LAYERS + 1


def test_locked_variant_parameters_follow_the_lock_unless_unlocked():
    cfg = _tiny("model.image.attention=linear-focused", "model.image.local_kernel=3", "model.image.lock=true",
                "model.image.unlocked_groups=3")  # proj, [block 3 + ln_post], block 2
    model = build_model(cfg.model)
    trainable = {n for n, p in model.visual.named_parameters() if p.requires_grad}
    assert {"blocks.2.attn.focus_scale", "blocks.3.attn.local_conv.weight"} <= trainable
    assert not {"blocks.1.attn.focus_scale", "blocks.1.attn.local_conv.bias", "ln_pre.weight"} & trainable


def test_freeze_layer_norm_false_keeps_frozen_layer_norms_trainable():
    model = build_model(_tiny("model.text.lock=true", "model.text.freeze_layer_norm=false").model)
    trainable = {n for n, p in model.text.named_parameters() if p.requires_grad}
    assert trainable == {f"blocks.{i}.{ln}.{w}" for i in range(TINY_LAYERS) for ln in ("ln_1", "ln_2")
                         for w in ("weight", "bias")} | {"ln_final.weight", "ln_final.bias"}


@pytest.mark.parametrize("overrides, key", [
    (["model.image.lock=true", "model.image.unlocked_groups=7"], "model.image.unlocked_groups"),
    (["model.image.unlocked_groups=1"], "model.image.unlocked_groups"),
    (["model.text.lock=true", "model.text.unlocked_layers=-1"], "model.text.unlocked_layers"),
    (["model.text.freeze_layer_norm=false"], "model.text.freeze_layer_norm"),
    (["train.image_lr=-1e-4"], "train.image_lr"),
    (["train.text_layer_decay=0"], "train.text_layer_decay"),
    (["train.image_layer_decay=1.5"], "train.image_layer_decay"),
    (["train.compile=true", "train.linearize.enabled=true"], "train.compile"),
])
def test_bad_settings_name_the_key(overrides, key):
    with pytest.raises(ConfigError, match=f"config key '{key}'"):
        _tiny(*overrides)
    # the group count follows the configured depth: 7 groups is fine with 5 layers
    _tiny("model.image.layers=5", "model.image.lock=true", "model.image.unlocked_groups=7")


def _groups(*overrides):
    cfg = _tiny(*overrides)
    model = build_model(cfg.model)
    promote_scalar_parameters(model)
    return model, param_groups(model, cfg.train.weight_decay, lr_scales=lr_scales(model, cfg.train)), cfg


def test_default_groups_are_decay_and_no_decay_at_train_lr():
    model, groups, _ = _groups()
    assert [g["name"] for g in groups] == ["decay", "no_decay"]
    assert [g[LR_SCALE] for g in groups] == [1.0, 1.0]
    assert sum(len(g["params"]) for g in groups) == len(list(model.parameters()))


def test_tower_lrs_and_layer_decay_hand_computed():
    model, groups, cfg = _groups("train.lr=1e-3", "train.image_lr=2e-4", "train.image_layer_decay=0.5",
                                 "train.text_lr=0", "model.text.lock=true", "model.text.unlocked_layers=2")
    by_name = {g["name"]: g for g in groups if g["params"]}
    lr = {name: 1e-3 * g[LR_SCALE] for name, g in by_name.items()}
    # image: L = 4 blocks; embeddings 0.5^5, block i 0.5^(4 - i), ln_post + proj 0.5^0, all x 2e-4
    assert lr["image.embed.decay"] == pytest.approx(2e-4 * 0.5**5)  # patch_embed
    assert lr["image.embed.no_decay"] == pytest.approx(2e-4 * 0.5**5)  # class/pos embedding, ln_pre
    for i in range(TINY_LAYERS):
        assert lr[f"image.block{i:02d}.decay"] == pytest.approx(2e-4 * 0.5 ** (TINY_LAYERS - i))
    assert lr["image.head.decay"] == pytest.approx(2e-4) and lr["image.head.no_decay"] == pytest.approx(2e-4)
    assert lr["text.decay"] == 0.0 and lr["other.no_decay"] == pytest.approx(1e-3)  # logit_scale: train.lr
    assert [p is model.visual.proj for p in by_name["image.head.decay"]["params"]] == [True]
    assert by_name["image.block02.no_decay"]["weight_decay"] == 0.0 and by_name["image.block02.decay"]["weight_decay"] == 0.2
    # locked parameters are in no group; the unlocked text groups are (last block + ln_final, projection)
    in_groups = {id(p) for g in groups for p in g["params"]}
    assert {n for n, p in model.named_parameters() if id(p) in in_groups} == \
        {n for n, p in model.named_parameters() if p.requires_grad}
    text_in = {n for n, p in model.text.named_parameters() if id(p) in in_groups}
    assert text_in == {n for n in text_in if n.startswith(("blocks.3.", "ln_final.", "text_projection"))} and text_in
    table = describe_groups(groups, cfg.train.lr, sum(p.numel() for p in model.parameters() if not p.requires_grad))
    assert "image.block00.decay" in table and "frozen" in table and "6.25e-06" in table


def test_schedule_scales_every_group_and_a_zero_lr_group_does_not_move():
    from deepspeed.runtime.lr_schedules import WarmupCosineLR

    model, groups, cfg = _groups("train.lr=1e-2", "train.text_lr=0", "train.image_layer_decay=0.5",
                                 "train.warmup_steps=2", "train.steps=6", "train.weight_decay=0.1")
    groups = [dict(g, lr=cfg.train.lr * g[LR_SCALE]) for g in groups if g["params"]]
    optimizer = torch.optim.AdamW(groups, lr=cfg.train.lr, betas=(0.9, 0.98), eps=1e-6)
    scheduler = WarmupCosineLR(optimizer, **build_ds_config(cfg, 1, device="cpu")["scheduler"]["params"])
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    images, tokens = torch.randn(4, 3, 32, 32), torch.randint(1, 49000, (4, 32))
    tokens[:, -1] = 49407
    from ds_linclip.train.loss import ClipLoss

    bases = []
    for _ in range(3):  # DeepSpeed's order: optimizer step, then scheduler step
        optimizer.zero_grad()
        ClipLoss()(*model(images, tokens)).backward()
        optimizer.step()
        scheduler.step()
        bases.append(scheduled_lr(optimizer.param_groups))
        for group in optimizer.param_groups:
            assert group["lr"] == pytest.approx(bases[-1] * group[LR_SCALE])
    # DeepSpeed's linear warmup over 2 steps, then the cosine over the 4 left (lr of the next step)
    assert bases == pytest.approx([0.0, 5e-3, 1e-2 * 0.5 * (1 + math.cos(math.pi / 4))])
    for name, param in model.named_parameters():
        if name.startswith("text."):
            assert torch.equal(param, before[name]), name  # lr 0: AdamW leaves it bitwise unchanged
        else:
            assert not torch.equal(param, before[name]), name
