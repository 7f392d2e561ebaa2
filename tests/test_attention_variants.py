"""The attention variants in the one spec: names, config keys, the module (gate, pola/mala parameters)
against an oracle written out by hand, hybrid towers, checkpoint fills, and exact FLOPs/parameters."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from ds_linclip.models.attention import (GATE_OPEN_BIAS, Attention, AttentionSpecError, parse_attention_name,
                                         resolve_attention)
from ds_linclip.models.clip import build_model, model_config
from kernels.reference import is_variant, pola_power, variant_attention_reference
from test_kernels import naive_linear_attention

NEW_NAMES = ["linear-focused-mala", "linear-elu-mala", "linear-pola", "linear-pola-mala", "linear-pola-count",
             "linear-focused-gate", "softmax-gate", "linear-focused-smlast", "linear-focused-local3-gate-sm0.last2",
             "linear-pola-mala-gate"]


@pytest.mark.parametrize("name", NEW_NAMES)
def test_new_names_round_trip_through_the_grammar_and_the_config(name):
    from ds_linclip.config import load_config

    spec = parse_attention_name(name)
    assert spec.name == name
    overrides = [f"{key}={value}" for key, value in spec.config_overrides("image").items()]
    cfg = load_config(overrides=["model.preset=tiny", "model.image.layers=4"] + overrides)
    assert resolve_attention(cfg.model.image) == spec


@pytest.mark.parametrize("tower,message,key", [
    ({"attention": "linear-affine", "denominator": "mala"}, "affine map", "denominator"),
    ({"attention": "softmax", "softmax_layers": [1]}, "whole tower is softmax", "softmax_layers"),
    ({"attention": "linear-focused", "softmax_layers": [1, -3], "layers": 4}, "names a layer twice", "softmax_layers"),
    ({"attention": "linear-focused", "softmax_layers": [4], "layers": 4}, "outside the tower's 4 layers", "softmax_layers"),
    ({"attention": "linear-focused", "softmax_layers": [0, 1], "layers": 2}, "use attention=softmax", "softmax_layers"),
    ({"attention": "linear-focused", "softmax_layers": "last"}, "not a list of layer indices", "softmax_layers"),
    ({"attention": "linear-pola", "width": 60, "heads": 4}, "head dim 15 is odd", "heads"),
    ({"attention": "linear-focused", "output_gate": "yes"}, "not true or false", "output_gate"),
])
def test_bad_variant_descriptions_name_their_key(tower, message, key):
    with pytest.raises(AttentionSpecError, match=message) as info:
        resolve_attention(tower)
    assert info.value.key == key


def test_config_errors_name_the_key():
    from ds_linclip.config import ConfigError

    with pytest.raises(ConfigError, match="model.text.softmax_layers"):
        model_config("tiny", {"text.attention": "linear-focused", "text.softmax_layers": "[12]"})
    with pytest.raises(ConfigError, match="model.image.denominator"):
        model_config("tiny", {"image.attention": "linear-affine", "image.denominator": "mala"})


def variant_module(name, causal, width=48, heads=3, seed=1):
    torch.manual_seed(seed)
    module = Attention(width, heads, spec=parse_attention_name(name, causal), causal=causal, backend="torch").double()
    with torch.no_grad():  # the variant's parameters away from their init: general position
        for param in (module.focus_scale, module.pola_power):
            if param is not None:
                param.normal_()
    return module


def module_oracle(module: Attention, x: torch.Tensor) -> torch.Tensor:
    """The module's computation written out: q/k/v by hand, the quadratic oracles, the gate."""
    batch, tokens, width = x.shape
    rows = module.qkv.weight.split(width), module.qkv.bias.split(width)
    q, k, v = ((x @ w.T + b).view(batch, tokens, module.heads, module.head_dim).transpose(1, 2) for w, b in zip(*rows))
    linear = module.spec.linear
    if linear is None:
        mixed = F.scaled_dot_product_attention(q, k, v, is_causal=module.causal)
    else:
        scale = F.softplus(module.focus_scale) if module.focus_scale is not None else None
        if is_variant(linear.feature_map, linear.denominator):
            power = pola_power(module.pola_power) if module.pola_power is not None else linear.power
            mixed = variant_attention_reference(q, k, v, linear.feature_map, linear.denominator, module.causal,
                                                scale, power)
        else:
            mixed = naive_linear_attention(q, k, v, linear.feature_map, module.causal, linear.denominator,
                                           scale=scale, power=linear.power)
    mixed = mixed.transpose(1, 2).reshape(batch, tokens, width)
    if module.gate is not None:
        mixed = mixed * (x @ module.gate.weight.T + module.gate.bias) * torch.sigmoid(x @ module.gate.weight.T + module.gate.bias)
    return module.out_proj(mixed)


@pytest.mark.parametrize("causal", [False, True], ids=["bidirectional", "causal"])
@pytest.mark.parametrize("name,backend", [
    *((name, "torch") for name in ("linear-focused-mala", "linear-pola", "linear-pola-mala-gate", "linear-focused-gate",
                                   "softmax-gate")),
    ("linear-pola", "triton"), ("linear-pola-count-gate", "triton"),  # interpreted kernels on CPU
], ids=lambda value: value)
def test_variant_module_matches_oracle_with_every_parameter_gradient(name, backend, causal):
    module = variant_module(name, causal)
    module.backend = backend
    x = torch.randn(2, 37, module.width, dtype=torch.float64, requires_grad=True)
    ours, expected = module(x), module_oracle(module, x)
    torch.testing.assert_close(ours, expected, rtol=1e-10, atol=1e-10)
    params = dict(module.named_parameters())
    assert ("gate.weight" in params) == name.endswith("-gate")
    assert ("pola_power" in params) == ("pola" in name)
    upstream = torch.randn_like(ours)
    grads = torch.autograd.grad(ours, [x, *params.values()], upstream)
    grads_expected = torch.autograd.grad(expected, [x, *params.values()], upstream)
    for param_name, got, want in zip(["x", *params], grads, grads_expected):
        assert want.abs().max() > 0, f"d/d{param_name} is all zero"
        torch.testing.assert_close(got, want, rtol=1e-7, atol=1e-9, msg=lambda m: f"d/d{param_name}: {m}")


def test_triton_backend_refuses_the_torch_only_variants_by_name():
    module = Attention(32, 2, spec="linear-pola-mala", backend="triton")
    with pytest.raises(ValueError, match="pola/mala has no Triton kernel yet"):
        module(torch.randn(1, 5, 32))


def small_model_config(**tower):
    overrides = {"embed_dim": 32, "image.image_size": 16, "image.patch_size": 4, "text.context_length": 8}
    for name in ("image", "text"):
        overrides |= {f"{name}.width": 32, f"{name}.heads": 2, f"{name}.layers": 3}
        overrides |= {f"{name}.{key}": value for key, value in tower.items()}
    return model_config("tiny", overrides)


def test_hybrid_tower_runs_softmax_in_the_named_layers():
    model = build_model(small_model_config(attention="linear-focused", softmax_layers="[0,-1]"))
    for tower in (model.visual, model.text):
        assert [block.attn.spec.linear is None for block in tower.blocks] == [True, False, True]
    assert model.attention_kinds() == {"image": "linear-focused-sm0.last", "text": "linear-focused-sm0.last"}
    # switching a softmax model in place gives the same layout
    softmax = build_model(small_model_config())
    softmax.set_attention(image="linear-focused-gate-smlast", text="linear-pola")
    assert [block.attn.spec.linear is None for block in softmax.visual.blocks] == [False, False, True]
    assert all(block.attn.gate is not None for block in softmax.visual.blocks)
    assert softmax.attention_kinds() == {"image": "linear-focused-gate-smlast", "text": "linear-pola"}


def test_the_open_gate_bias_is_where_silu_is_one():
    """GATE_OPEN_BIAS is the root of x * sigmoid(x) = 1: a zero-weight gate passes the attention output
    through unchanged, so a converted checkpoint's outputs do not move when the gate is added."""
    bias = torch.tensor(GATE_OPEN_BIAS, dtype=torch.float64)
    assert F.silu(bias).item() == pytest.approx(1.0, abs=1e-14)
    # the root is unique on x > 0 (SiLU rises there): a nearby value is off by its slope times the gap
    assert F.silu(bias + 1e-6).item() > 1.0 > F.silu(bias - 1e-6).item()


def test_softmax_checkpoint_loads_into_a_gated_model_with_the_gate_open():
    from ds_linclip.models.convert import load_pretrained

    torch.manual_seed(0)
    plain = build_model(small_model_config(attention="linear-pola")).double()
    gated = build_model(small_model_config(attention="linear-pola", output_gate="true")).double()
    state = {k: v for k, v in plain.state_dict().items() if ".pola_power" not in k}  # as a file without them
    notes = load_pretrained(gated, state)
    assert any("open gate" in note for note in notes)
    for block in gated.visual.blocks:
        assert (block.attn.gate.weight == 0).all() and torch.allclose(block.attn.gate.bias, torch.tensor(GATE_OPEN_BIAS).double())
        assert (block.attn.pola_power == 0).all()
    with torch.no_grad():
        for block in plain.visual.blocks:
            block.attn.pola_power.zero_()
        images, tokens = torch.randn(2, 3, 16, 16, dtype=torch.float64), torch.randint(1, 400, (2, 8))
        for ours, theirs in zip(gated(images, tokens), plain(images, tokens)):
            torch.testing.assert_close(ours, theirs, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("tower", [
    {"attention": "linear-focused", "denominator": "mala"},
    {"attention": "linear-pola"},
    {"attention": "linear-pola", "denominator": "mala"},
    {"attention": "linear-pola", "denominator": "count"},
    {"attention": "linear-focused", "output_gate": "true"},
    {"attention": "linear-elu", "denominator": "mala", "output_gate": "true", "softmax_layers": "[1]"},
], ids=lambda t: "-".join(str(v) for v in t.values()))
def test_variant_flops_and_parameters_are_exact(tower):
    from ds_linclip.models.flops import measure_forward_flops, model_cost

    cfg = small_model_config(**tower)
    cost = model_cost(cfg)
    with torch.device("meta"):
        model = build_model(cfg)
    assert cost.params == sum(p.numel() for p in model.parameters())
    assert cost.image.flops == measure_forward_flops(cfg)["image"]  # bidirectional: the state form, exactly
