"""open_clip parity (softmax mode) and the state-dict converter / `load_pretrained`.

Parity: open_clip.create_model(name, pretrained=None) gives random weights; we copy them through
`from_open_clip_state_dict` and compare L2-normalised features on the same images and captions.
"""

from __future__ import annotations

import logging

import pytest
import torch

open_clip = pytest.importorskip("open_clip")

from ds_linclip.models import build_model, model_config  # noqa: E402
from ds_linclip.models.convert import (  # noqa: E402
    CheckpointError,
    from_open_clip_state_dict,
    is_open_clip_state_dict,
    load_pretrained,
    to_open_clip_state_dict,
)

PARITY_TOLERANCE = 1e-5  # fp32, max abs difference of unit-norm features
CAPTIONS = ["a photo of a cat", "a diagram of a linear attention kernel running on a GPU, drawn by hand"]


def open_clip_model(name: str):
    logging.getLogger().setLevel(logging.ERROR)  # "No pretrained weights loaded" is expected
    return open_clip.create_model(name, pretrained=None).eval()


def tiny_open_clip(**kwargs):
    """An open_clip CLIP with the `tiny` preset's shapes (built directly from its config classes)."""
    from open_clip.model import CLIP as OpenClipCLIP

    torch.manual_seed(0)
    return OpenClipCLIP(
        **kwargs,
        embed_dim=128,
        vision_cfg={"image_size": 32, "patch_size": 4, "width": 128, "layers": 4, "head_width": 32},
        text_cfg={"context_length": 32, "vocab_size": 49408, "width": 128, "heads": 4, "layers": 4},
    ).eval()


def parity_errors(preset: str, name: str) -> tuple[float, float]:
    torch.manual_seed(0)
    reference = open_clip_model(name)
    ours = build_model(preset).eval()
    load_pretrained(ours, reference.state_dict())
    generator = torch.Generator().manual_seed(1)
    images = torch.randn(2, 3, 224, 224, generator=generator)
    tokens = open_clip.tokenize(CAPTIONS)  # (2, 77), EOT = max id
    with torch.no_grad():
        ours_image, ours_text = ours.encode_image(images), ours.encode_text(tokens)
        ref_image = reference.encode_image(images, normalize=True)
        ref_text = reference.encode_text(tokens, normalize=True)
    # the inputs differ, so must the features (guards against a degenerate comparison)
    assert (ref_image[0] - ref_image[1]).abs().max() > 1e-3 and (ref_text[0] - ref_text[1]).abs().max() > 1e-3
    image_error = (ours_image - ref_image).abs().max().item()
    text_error = (ours_text - ref_text).abs().max().item()
    print(f"\nparity {name}: encode_image max abs error {image_error:.3g}, encode_text {text_error:.3g}")
    assert sum(p.numel() for p in ours.parameters()) == sum(p.numel() for p in reference.parameters())
    return image_error, text_error


@pytest.mark.parametrize(
    "preset,name",
    [("vit_s16", "ViT-S-16"), ("vit_b16", "ViT-B-16"),
     pytest.param("vit_l16", "ViT-L-16", marks=pytest.mark.slow)],
)
def test_softmax_parity_with_open_clip(preset, name):
    image_error, text_error = parity_errors(preset, name)
    assert image_error < PARITY_TOLERANCE
    assert text_error < PARITY_TOLERANCE


@pytest.mark.parametrize("attention", ["softmax", "linear-affine"])
def test_vit_b16_parameter_count(attention):
    with torch.device("meta"):  # shapes only; the parity tests compare against open_clip's count
        model = build_model(model_config("vit_b16", {"image.attention": attention, "text.attention": attention}))
    assert sum(p.numel() for p in model.parameters()) == 149_620_737  # "149.62M", open_clip's ViT-B-16


def test_parity_with_gradients_in_training_mode():
    # the trainer differentiates the model: compare gradients too (tiny shapes, grad-mode paths)
    reference = tiny_open_clip().train()
    ours = build_model("tiny").train()
    load_pretrained(ours, reference.state_dict())
    torch.manual_seed(2)
    images = torch.randn(3, 3, 32, 32)
    tokens = open_clip.tokenize(CAPTIONS + ["fashion: a sneaker"], context_length=32)

    def loss_and_grads(image_features, text_features, scale, model, names):
        loss = (scale * image_features @ text_features.T).log_softmax(-1).diagonal().mean()
        params = dict(model.named_parameters())
        return loss, torch.autograd.grad(loss, [params[n] for n in names])

    ref_image, ref_text, ref_scale = reference(images, tokens)
    ours_image, ours_text, ours_scale = ours(images, tokens)
    torch.testing.assert_close(ours_image, ref_image, rtol=0, atol=1e-5)
    torch.testing.assert_close(ours_text, ref_text, rtol=0, atol=1e-5)
    pairs = [("visual.blocks.1.attn.qkv.weight", "visual.transformer.resblocks.1.attn.in_proj_weight"),
             ("visual.patch_embed.weight", "visual.conv1.weight"),
             ("text.blocks.0.attn.qkv.bias", "transformer.resblocks.0.attn.in_proj_bias"),
             ("text.token_embedding.weight", "token_embedding.weight"), ("logit_scale", "logit_scale")]
    ours_loss, ours_grads = loss_and_grads(ours_image, ours_text, ours_scale, ours, [p[0] for p in pairs])
    ref_loss, ref_grads = loss_and_grads(ref_image, ref_text, ref_scale, reference, [p[1] for p in pairs])
    torch.testing.assert_close(ours_loss, ref_loss, rtol=1e-5, atol=1e-6)
    for (name, _), got, want in zip(pairs, ours_grads, ref_grads):
        assert want.abs().max() > 0
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-6, msg=name)


def test_state_dict_round_trips_both_ways():
    reference_sd = tiny_open_clip().state_dict()
    ours_sd = from_open_clip_state_dict(reference_sd)
    assert is_open_clip_state_dict(reference_sd) and not is_open_clip_state_dict(ours_sd)
    assert ours_sd.keys() == build_model("tiny").state_dict().keys()
    back = to_open_clip_state_dict(ours_sd)
    assert back.keys() == reference_sd.keys()
    for key in reference_sd:
        assert back[key] is reference_sd[key] or torch.equal(back[key], reference_sd[key]), key
    ours_native = build_model("tiny").state_dict()
    again = from_open_clip_state_dict(to_open_clip_state_dict(ours_native))
    assert again.keys() == ours_native.keys()
    assert all(torch.equal(again[k], ours_native[k]) for k in ours_native)
    # and open_clip itself accepts what we export
    tiny_open_clip().load_state_dict(to_open_clip_state_dict(ours_native), strict=True)


@pytest.mark.parametrize("suffix,wrap", [(".pt", "plain"), (".bin", "open_clip_training"), (".safetensors", "plain")])
def test_load_pretrained_reads_open_clip_files(tmp_path, suffix, wrap):
    reference = tiny_open_clip()
    state_dict = reference.state_dict()
    path = tmp_path / f"open_clip{suffix}"
    if suffix == ".safetensors":
        from safetensors.torch import save_file

        save_file({k: v.contiguous() for k, v in state_dict.items()}, str(path))
    elif wrap == "open_clip_training":  # what open_clip's trainer writes: epoch + DDP-prefixed state_dict
        torch.save({"epoch": 3, "state_dict": {f"module.{k}": v for k, v in state_dict.items()}}, path)
    else:
        torch.save(state_dict, path)
    model = build_model("tiny").eval()
    assert load_pretrained(model, path) == []
    images, tokens = torch.randn(2, 3, 32, 32), open_clip.tokenize(CAPTIONS, context_length=32)
    with torch.no_grad():
        torch.testing.assert_close(model.encode_image(images), reference.encode_image(images, normalize=True),
                                   rtol=0, atol=1e-5)
        torch.testing.assert_close(model.encode_text(tokens), reference.encode_text(tokens, normalize=True),
                                   rtol=0, atol=1e-5)


def test_load_pretrained_reads_our_files(tmp_path):
    from safetensors.torch import save_file

    torch.manual_seed(5)
    source = build_model("tiny")
    save_file(source.state_dict(), str(tmp_path / "model.safetensors"))
    torch.save({"module": source.state_dict()}, tmp_path / "model.pt")
    for name in ("model.safetensors", "model.pt", "."):  # "." : the directory, model.safetensors in it
        target = build_model("tiny")
        load_pretrained(target, tmp_path / name)
        for key, value in source.state_dict().items():
            assert torch.equal(target.state_dict()[key], value), (name, key)


def test_softmax_checkpoint_loads_into_linear_model():
    reference = tiny_open_clip()
    linear = build_model(model_config("tiny", {"image.attention": "linear-affine", "text.attention": "linear-affine"}))
    load_pretrained(linear, reference.state_dict())
    expected = from_open_clip_state_dict(reference.state_dict())
    assert all(torch.equal(linear.state_dict()[k], v) for k, v in expected.items())
    images, tokens = torch.randn(2, 3, 32, 32), open_clip.tokenize(CAPTIONS, context_length=32)
    with torch.no_grad():
        linear_features = linear.encode_image(images)
        softmax_features = reference.encode_image(images, normalize=True)
    assert torch.isfinite(linear_features).all()
    assert (linear_features - softmax_features).abs().max() > 1e-4  # same weights, different attention
    linear.set_attention(image="softmax", text="softmax")  # switching back restores open_clip's outputs
    with torch.no_grad():
        torch.testing.assert_close(linear.encode_image(images), softmax_features, rtol=0, atol=1e-5)


def test_load_pretrained_interpolates_image_positions_for_another_image_size():
    reference = tiny_open_clip()  # 32 px -> 8x8 grid
    model = build_model(model_config("tiny", {"image.image_size": 48}))  # 12x12 grid
    notes = load_pretrained(model, reference.state_dict())
    assert notes and "65 -> 145" in notes[0]
    pos = model.visual.positional_embedding.detach()
    torch.testing.assert_close(pos[0], reference.visual.positional_embedding[0].detach(), rtol=0, atol=0)
    assert pos.shape == (145, 128)


def test_load_pretrained_errors_name_the_key_and_file(tmp_path):
    state_dict = tiny_open_clip().state_dict()
    bad_shape = dict(state_dict, text_projection=torch.zeros(128, 64))
    with pytest.raises(CheckpointError, match=r"text\.text_projection.*\(128, 64\)"):
        load_pretrained(build_model("tiny"), bad_shape)
    with pytest.raises(CheckpointError, match=r"visual\.transformer\.resblocks\.0\.ls_1\.gamma"):
        load_pretrained(build_model("tiny"), dict(state_dict, **{"visual.transformer.resblocks.0.ls_1.gamma": torch.ones(128)}))
    fewer_layers = {k: v for k, v in state_dict.items() if ".resblocks.3." not in k}
    path = tmp_path / "three_layers.pt"
    torch.save(fewer_layers, path)
    with pytest.raises(CheckpointError, match=rf"{path}.*missing keys.*blocks\.3\."):
        load_pretrained(build_model("tiny"), path)
    with pytest.raises(CheckpointError, match="not found"):
        load_pretrained(build_model("tiny"), tmp_path / "nope.pt")
    (tmp_path / "empty_dir").mkdir()
    with pytest.raises(CheckpointError, match="empty_dir.*model.safetensors"):
        load_pretrained(build_model("tiny"), tmp_path / "empty_dir")
    (tmp_path / "garbage.bin").write_bytes(b"not a checkpoint")
    with pytest.raises(CheckpointError, match="garbage.bin"):
        load_pretrained(build_model("tiny"), tmp_path / "garbage.bin")


def test_build_model_loads_config_pretrained(tmp_path):
    reference = tiny_open_clip()
    path = tmp_path / "open_clip.pt"
    torch.save(reference.state_dict(), path)
    model = build_model(model_config("tiny", {"pretrained": str(path), "image.attention": "linear-elu"}))
    torch.testing.assert_close(model.text.text_projection.detach(), reference.text_projection.detach(), rtol=0, atol=0)
    untouched = build_model(model_config("tiny", {"pretrained": str(path)}), load_pretrained_weights=False)
    assert not torch.equal(untouched.text.text_projection, reference.text_projection)


@pytest.mark.parametrize("image,text", [("linear-focused-local3", "linear-focused"), ("linear-affine-local5", "linear-affine"),
                                        ("linear-pola-local3", "linear-pola")])
def test_softmax_checkpoint_loads_into_every_variant_with_sensible_new_parameters(image, text):
    """Parameters the variant adds start at 0: the local branch adds nothing, so the converted model
    equals the same variant without its local branch; the focused (and pola) scale starts at softplus(0),
    pola's power at 1 + 4·sigmoid(0) = 3."""
    from ds_linclip.models.attention import parse_attention_name

    reference = tiny_open_clip()
    overrides = {**parse_attention_name(image).config_overrides("image"),
                 **parse_attention_name(text, causal=True).config_overrides("text")}
    variant = build_model(model_config("tiny", {k[len("model."):]: v for k, v in overrides.items()}))
    notes = load_pretrained(variant, reference.state_dict())
    assert any("linear-variant parameters not in the file start at 0" in note for note in notes)
    assert all(b.attn.local_conv.weight.abs().max() == 0 and b.attn.local_conv.bias.abs().max() == 0
               for b in variant.visual.blocks)
    added = [p for b in [*variant.visual.blocks, *variant.text.blocks] for p in (b.attn.focus_scale, b.attn.pola_power)
             if p is not None]
    per_block = {"affine": 0, "focused": 1, "pola": 2}[image.split("-")[1]]  # focus_scale, pola_power
    assert len(added) == per_block * (len(variant.visual.blocks) + len(variant.text.blocks))
    assert all(p.abs().max() == 0 for p in added)
    without_local = build_model(model_config("tiny", {k[len("model."):]: v for k, v in overrides.items()}
                                             | {"image.local_kernel": 0}))
    load_pretrained(without_local, reference.state_dict())
    images, tokens = torch.randn(2, 3, 32, 32), open_clip.tokenize(CAPTIONS, context_length=32)
    with torch.no_grad():
        torch.testing.assert_close(variant.encode_image(images), without_local.encode_image(images), rtol=0, atol=1e-6)
        torch.testing.assert_close(variant.encode_text(tokens), without_local.encode_text(tokens), rtol=0, atol=1e-6)
        assert torch.isfinite(variant.encode_image(images)).all()
    # the variant's own parameters have no open_clip counterpart: converting back says so
    with pytest.raises(CheckpointError, match="linear-variant parameter"):
        to_open_clip_state_dict(variant.state_dict())


def test_siglip_logit_bias_round_trips_and_matches_open_clip_init():
    """train.loss=siglip builds open_clip's SigLIP initialisation (init_logit_scale ln 10, init_logit_bias
    -10); the bias converts both ways and open_clip's SigLIP model loads what we export."""
    import math

    cfg = model_config("tiny")
    cfg.init_logit_scale, cfg.init_logit_bias = math.log(10), -10.0
    ours = build_model(cfg)
    theirs = tiny_open_clip(init_logit_scale=math.log(10), init_logit_bias=-10.0)
    assert float(ours.logit_bias) == float(theirs.logit_bias) == -10.0
    assert float(ours.logit_scale) == pytest.approx(float(theirs.logit_scale))
    assert "logit_bias" in ours.no_weight_decay_names()
    converted = from_open_clip_state_dict(theirs.state_dict())
    assert converted["logit_bias"].shape == () and converted.keys() == ours.state_dict().keys()
    theirs.load_state_dict(to_open_clip_state_dict(ours.state_dict()), strict=True)
    load_pretrained(ours, theirs.state_dict())
    # a CLIP checkpoint fine-tuned with the sigmoid loss: the bias starts at the model's init
    notes = load_pretrained(ours, tiny_open_clip().state_dict())
    assert float(ours.logit_bias) == -10.0 and any("logit_bias" in note for note in notes)
    with pytest.raises(CheckpointError, match="train.loss=siglip"):
        load_pretrained(build_model("tiny"), theirs.state_dict())
