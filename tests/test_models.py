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


def test_half_precision_model_accepts_float32_pixels():
    torch.manual_seed(0)
    model = build_model(model_config("tiny", {"image.attention": "linear-affine"})).to(torch.bfloat16)
    images, tokens = tiny_inputs()
    image_features, text_features, scale = model(images, tokens)
    assert image_features.dtype == text_features.dtype == scale.dtype == torch.bfloat16
    assert torch.isfinite(image_features.float()).all() and torch.isfinite(text_features.float()).all()
    reference = build_model(model_config("tiny", {"image.attention": "linear-affine"}))
    reference.load_state_dict({k: v.float() for k, v in model.state_dict().items()})
    with torch.no_grad():
        assert (reference.encode_image(images) - image_features.float()).abs().max() < 0.05


def test_towers_choose_attention_independently():
    model = build_model(model_config("tiny", {"image.attention": "linear-affine", "text.attention": "softmax",
                                              "image.denominator": "kernel"}))
    assert model.attention_kinds() == {"image": "linear-affine-kernel", "text": "softmax"}
    assert all(b.attn.spec.linear.denominator == "kernel" and not b.attn.causal for b in model.visual.blocks)
    assert all(b.attn.causal for b in model.text.blocks)
    model.set_attention(text="linear-relu")
    assert model.attention_kinds() == {"image": "linear-affine-kernel", "text": "linear-relu"}
    with pytest.raises(ValueError, match="linear-foo"):
        model.set_attention(image="linear-foo")
    with pytest.raises(ValueError, match="image tower only"):
        model.set_attention(text="linear-affine-local3")


def test_variant_parameters_created_and_dropped_in_place():
    model = build_model(model_config("tiny", {"image.attention": "linear-affine"}))
    before = {n for n, _ in model.named_parameters()}
    model.set_attention(image="linear-focused-local3", text="linear-focused")
    added = {n for n, _ in model.named_parameters()} - before
    layers = len(model.visual.blocks)
    assert sum(n.endswith("attn.focus_scale") for n in added) == layers + len(model.text.blocks)
    assert sum(n.endswith("attn.local_conv.weight") for n in added) == layers
    # new parameters start where a converted model stays sensible: local branch 0, scale softplus(0)
    assert all(b.attn.local_conv.weight.abs().max() == 0 for b in model.visual.blocks)
    assert all(b.attn.focus_scale.abs().max() == 0 for b in model.visual.blocks)
    model.set_attention(image="softmax", text="softmax")
    assert {n for n, _ in model.named_parameters()} == before


@pytest.mark.parametrize("image,text", [("linear-focused-local3", "linear-focused"), ("linear-affine-local5", "linear-elu")])
def test_analytic_params_count_variant_parameters(image, text):
    from ds_linclip.models.attention import parse_attention_name

    overrides = {**parse_attention_name(image).config_overrides("image"), **parse_attention_name(text, True).config_overrides("text")}
    cfg = model_config("tiny", {k[len("model."):]: v for k, v in overrides.items()})
    model = build_model(cfg)
    assert model.attention_kinds() == {"image": image, "text": text}
    assert model_cost(cfg).params == sum(p.numel() for p in model.parameters())


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


# ---- parameter / FLOP accounting (ds_linclip.models.flops) and the summary CLI ----

import json  # noqa: E402
import os  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402
from pathlib import Path  # noqa: E402

from ds_linclip.models.flops import (  # noqa: E402
    attention_flops,
    attention_flops_per_image,
    chunked_causal_linear_flops,
    measure_forward_flops,
    model_cost,
)
from kernels.reference import CAUSAL_CHUNK  # noqa: E402

REPO_ROOT = Path(__file__).resolve().parents[1]


def real_parameter_count(cfg) -> dict[str, int]:
    with torch.device("meta"):
        model = build_model(cfg)
    return {"image": sum(p.numel() for p in model.visual.parameters()),
            "text": sum(p.numel() for p in model.text.parameters()),
            "total": sum(p.numel() for p in model.parameters())}


@pytest.mark.parametrize("preset,image_size", [("tiny", 32), ("tiny", 48), ("vit_s16", 224), ("vit_b16", 224),
                                               ("vit_b16", 384), ("vit_l16", 224), ("vit_l16", 320)])
def test_analytic_params_and_softmax_flops_match_the_model(preset, image_size):
    cfg = model_config(preset, {"image.image_size": image_size})
    cost, real = model_cost(cfg), real_parameter_count(cfg)
    assert (cost.image.params, cost.text.params, cost.params) == (real["image"], real["text"], real["total"])
    measured = measure_forward_flops(cfg)
    assert cost.image.flops == measured["image"]
    assert cost.text.flops == measured["text"]


@pytest.mark.parametrize("preset,image_size", [("tiny", 32), ("vit_b16", 224), ("vit_b16", 448)])
@pytest.mark.parametrize("kind", ["linear-affine", "linear-elu", "linear-relu"])
def test_linear_attention_flops_match_the_model(preset, image_size, kind):
    cfg = model_config(preset, {"image.image_size": image_size, "image.attention": kind, "text.attention": kind})
    cost, measured = model_cost(cfg), measure_forward_flops(cfg)
    assert cost.image.flops == measured["image"]  # bidirectional: Kᵀ·V then Q·state, exactly as analysed
    # causal: the CPU path runs a dense masked product for short texts and the chunked form for long
    # ones, its normaliser as row/cumulative sums (no matmul); the table counts the recurrent form
    from kernels.torch_path import CAUSAL_DENSE_MAX_TOKENS

    text = cfg.text
    tokens = text.context_length
    if tokens <= CAUSAL_DENSE_MAX_TOKENS:
        run_flops = 4 * tokens * tokens * text.width  # Q·Kᵀ and A·V, 2·N²·d each, over all heads
    else:
        run_flops = chunked_causal_linear_flops(tokens, text.width, text.heads, CAUSAL_CHUNK)
    overhead = text.layers * (run_flops - attention_flops(kind, tokens, text.width, text.heads))
    assert measured["text"] == cost.text.flops + overhead
    # linear attention is O(N) in tokens: doubling the side quadruples tokens-1, and the cost with it
    softmax_cfg = model_config(preset, {"image.image_size": image_size})
    assert attention_flops_per_image(cfg) < attention_flops_per_image(softmax_cfg) or preset == "tiny"


def test_flops_measured_on_cpu_outside_attention():
    # a real CPU forward (the meta-device path above could hide a decomposition difference); on CPU the
    # counter does not see the fused SDPA kernel, so it measures exactly the non-attention FLOPs
    from torch.utils.flop_counter import FlopCounterMode

    cfg = model_config("tiny")
    torch.manual_seed(0)
    model = build_model(cfg).eval()
    images, tokens = tiny_inputs(batch=1)
    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        model.visual(images)
    cost = model_cost(cfg)
    assert counter.get_total_flops() == cost.image.other_flops
    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        model.text(tokens)
    assert counter.get_total_flops() == cost.text.other_flops


def test_attention_flops_scale_quadratically_vs_linearly():
    softmax, linear = model_config("vit_b16"), model_config("vit_b16", {"image.attention": "linear-affine"})
    tokens_224, tokens_448 = 1 + 14 * 14, 1 + 28 * 28
    ratio_softmax = attention_flops_per_image(softmax, 448) / attention_flops_per_image(softmax, 224)
    ratio_linear = attention_flops_per_image(linear, 448) / attention_flops_per_image(linear, 224)
    assert ratio_softmax == pytest.approx((tokens_448 / tokens_224) ** 2)
    assert ratio_linear == pytest.approx(tokens_448 / tokens_224)
    # ViT-B/16 at 224: 12 layers · 4·197²·768 = 1.431 GFLOPs softmax; 12 · 4·197·64·768 linear
    assert attention_flops_per_image(softmax) == 12 * 4 * 197 * 197 * 768
    assert attention_flops_per_image(linear) == 12 * 4 * 197 * 64 * 768


def run_cli(*args):
    env = dict(os.environ, PYTHONPATH=str(REPO_ROOT))
    return subprocess.run([sys.executable, "-m", "ds_linclip.models", *args], cwd=REPO_ROOT, env=env,
                          capture_output=True, text=True, timeout=300)


def test_summary_cli_table_and_json(capsys):
    table = run_cli("--preset", "vit_b16", "--attention", "linear-affine", "--image-size", "224")
    assert table.returncode == 0, table.stderr
    cfg = model_config("vit_b16", {"image.attention": "linear-affine", "text.attention": "linear-affine"})
    cost = model_cost(cfg)
    image_row = next(line for line in table.stdout.splitlines() if line.startswith("image (per image)"))
    assert image_row.split()[3:9] == ["linear-affine", "197", "86.19M", f"{cost.image.flops / 1e9:.3f}",
                                      f"{cost.image.attention_flops / 1e9:.3f}", "1.4"]
    assert "149.62M" in table.stdout and "text (per caption)" in table.stdout

    from ds_linclip.models.__main__ import main  # the rest in-process: same code, no interpreter start-up

    assert main(["--preset", "vit_b16", "--image-attention", "linear-elu", "--image-size", "384", "--json",
                 "--measure"]) == 0
    report = json.loads(capsys.readouterr().out)
    cfg = model_config("vit_b16", {"image.attention": "linear-elu", "image.image_size": 384})
    assert report["params"] == real_parameter_count(cfg)["total"]
    assert report["image"]["attention"] == "linear-elu" and report["text"]["attention"] == "softmax"
    assert report["image"]["tokens"] == 577
    assert report["measured_flops"] == {"image": report["image"]["flops"], "text": report["text"]["flops"]}

    assert main(["--preset", "vit_b16", "--image-size", "200"]) == 2
    assert "model.image.image_size" in capsys.readouterr().err
