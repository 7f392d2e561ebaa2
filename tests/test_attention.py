"""Linear attention (through kernels.linear_attention and the Attention module) vs a naive O(N²) oracle.

Float64 throughout, so differences are rounding only: outputs agree to ~1e-12, gradients to ~1e-9
(relu causal: the first tokens have tiny normalisers, which amplifies rounding).
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from ds_linclip.models.attention import Attention, AttentionSpec, parse_attention_name, resolve_attention
from kernels import linear_attention
from test_kernels import KIND_CASES, naive_linear_attention, random_scale

EPS = 1e-6


def random_qkv(batch=2, heads=3, tokens=150, head_dim=16, seed=0):
    # 150 tokens > the reference's causal chunk (64) and not a multiple of it: exercises padding + carry
    generator = torch.Generator().manual_seed(seed)
    return [
        torch.randn(batch, heads, tokens, head_dim, generator=generator, dtype=torch.float64, requires_grad=True)
        for _ in range(3)
    ]


@pytest.mark.parametrize("causal", [False, True], ids=["bidirectional", "causal"])
@pytest.mark.parametrize("kind,denominator", KIND_CASES, ids=[f"{k}-{d}" for k, d in KIND_CASES])
def test_linear_attention_matches_naive_oracle_outputs_and_gradients(kind, denominator, causal):
    q, k, v = random_qkv()
    scale = random_scale(3, 16, torch.float64) if kind == "focused" else None
    ours = linear_attention(q, k, v, feature_map=kind, causal=causal, denominator=denominator, scale=scale, backend="torch")
    expected = naive_linear_attention(q, k, v, kind, causal, denominator, scale=scale)
    assert ours.shape == v.shape
    torch.testing.assert_close(ours, expected, rtol=1e-10, atol=1e-10)

    upstream = torch.randn_like(ours)
    inputs = (q, k, v) + ((scale,) if scale is not None else ())
    grads_ours = torch.autograd.grad(ours, inputs, upstream)
    grads_expected = torch.autograd.grad(expected, inputs, upstream)
    for name, got, want in zip(["q", "k", "v", "scale"], grads_ours, grads_expected):
        assert got.abs().max() > 0, f"d/d{name} is all zero"
        torch.testing.assert_close(got, want, rtol=1e-7, atol=1e-8, msg=lambda m: f"d/d{name}: {m}")


def attention_module(name, causal, width=48, heads=3, seed=1):
    torch.manual_seed(seed)
    module = Attention(width, heads, spec=parse_attention_name(name, causal), causal=causal, backend="torch").double()
    with torch.no_grad():  # a scale away from its init, so its gradient path is exercised in general position
        if module.focus_scale is not None:
            module.focus_scale.normal_()
    return module


def naive_local(conv, values, grid):
    """Depthwise conv of the patch tokens' values, by explicit shifts: (batch, patches, width)."""
    batch, patches, width = values.shape
    k = conv.kernel_size[0]
    image = values.reshape(batch, grid[0], grid[1], width)
    padded = F.pad(image, (0, 0, k // 2, k // 2, k // 2, k // 2))
    out = conv.bias.view(1, 1, 1, width).expand(batch, grid[0], grid[1], width).clone()
    for dr in range(k):
        for dc in range(k):
            out = out + padded[:, dr:dr + grid[0], dc:dc + grid[1]] * conv.weight[:, 0, dr, dc]
    return out.reshape(batch, patches, width)


def module_oracle(module: Attention, x: torch.Tensor, grid=None) -> torch.Tensor:
    """The module's computation with the oracle in place of the kernel; q/k/v split written out by hand."""
    batch, tokens, width = x.shape
    heads, head_dim = module.heads, module.head_dim
    weight, bias = module.qkv.weight, module.qkv.bias  # (3·width, width): rows q, then k, then v

    def project(part):  # -> (batch, heads, tokens, head_dim)
        rows = slice(part * width, (part + 1) * width)
        return (x @ weight[rows].T + bias[rows]).view(batch, tokens, heads, head_dim).transpose(1, 2)

    q, k, v = project(0), project(1), project(2)
    linear = module.spec.linear
    if linear is None:
        scores = q @ k.transpose(-1, -2) / head_dim**0.5
        if module.causal:
            scores = scores.masked_fill(~torch.ones(tokens, tokens, dtype=torch.bool).tril(), float("-inf"))
        mixed = scores.softmax(-1) @ v
    else:
        scale = F.softplus(module.focus_scale) if module.focus_scale is not None else None
        mixed = naive_linear_attention(q, k, v, linear.feature_map, module.causal, linear.denominator,
                                       scale=scale, power=linear.power)
    mixed = mixed.transpose(1, 2).reshape(batch, tokens, width)
    if module.local_conv is not None:  # CLS (token 0) untouched, the patches get the local branch
        values = v.transpose(1, 2).reshape(batch, tokens, width)
        local = naive_local(module.local_conv, values[:, 1:], grid)
        mixed = torch.cat([mixed[:, :1], mixed[:, 1:] + local], dim=1)
    return module.out_proj(mixed)


MODULE_NAMES = ["softmax", "linear-affine", "linear-affine-kernel", "linear-focused", "linear-focused-count",
                "linear-focused-p2", "linear-elu", "linear-elu-count", "linear-relu"]


@pytest.mark.parametrize("causal", [False, True], ids=["bidirectional", "causal"])
@pytest.mark.parametrize("name", MODULE_NAMES)
def test_attention_module_matches_oracle(name, causal):
    module = attention_module(name, causal)
    x = torch.randn(2, 70, module.width, dtype=torch.float64, requires_grad=True)
    ours, expected = module(x), module_oracle(module, x)
    torch.testing.assert_close(ours, expected, rtol=1e-10, atol=1e-10)
    upstream = torch.randn_like(ours)
    params = [x] + list(module.parameters())
    for got, want in zip(torch.autograd.grad(ours, params, upstream), torch.autograd.grad(expected, params, upstream)):
        torch.testing.assert_close(got, want, rtol=1e-7, atol=1e-8)


@pytest.mark.parametrize("name", ["linear-focused-local3", "linear-affine-local5", "softmax-local3"])
def test_local_branch_matches_oracle_on_a_non_square_grid(name):
    module = attention_module(name, causal=False)
    grid = (4, 6)
    x = torch.randn(2, 1 + 24, module.width, dtype=torch.float64, requires_grad=True)
    ours, expected = module(x, grid), module_oracle(module, x, grid)
    torch.testing.assert_close(ours, expected, rtol=1e-10, atol=1e-10)
    upstream = torch.randn_like(ours)
    params = [x] + list(module.parameters())
    assert any(n.startswith("local_conv") for n, _ in module.named_parameters())
    for got, want in zip(torch.autograd.grad(ours, params, upstream), torch.autograd.grad(expected, params, upstream)):
        torch.testing.assert_close(got, want, rtol=1e-7, atol=1e-8)


def test_local_branch_is_local_and_leaves_cls_alone():
    """Changing one patch's value moves only patches within the kernel's reach (plus, through the global
    attention, everything a little): with the linear part switched off, exactly the 3x3 neighbourhood."""
    module = attention_module("linear-affine-local3", causal=False)
    with torch.no_grad():
        module.qkv.weight[: 2 * module.width].zero_()  # q, k = 0 ...
        module.qkv.bias.zero_()
    grid = (5, 5)
    x = torch.randn(1, 26, module.width, dtype=torch.float64)
    changed = x.clone()
    changed[0, 1 + 2 * 5 + 2] += 1.0  # the centre patch
    delta = (module(changed, grid) - module(x, grid))[0].abs().amax(-1)  # (tokens,)
    # affine with q = k = 0: similarity 1 everywhere, output = mean of V: every token moves by the same
    # amount; the local branch adds more exactly at the 3x3 neighbourhood of the centre
    base = delta[0]  # CLS: only the mean part
    patch_delta = delta[1:].view(5, 5)
    near = torch.zeros(5, 5, dtype=torch.bool)
    near[1:4, 1:4] = True
    assert (patch_delta[~near] - base).abs().max() < 1e-12
    assert (patch_delta[near] - base).abs().min() > 1e-6


@pytest.mark.parametrize("kind", ["softmax", "linear-affine", "linear-focused", "linear-elu", "linear-relu"])
def test_causal_attention_ignores_later_tokens(kind):
    module = attention_module(kind, causal=True)
    x = torch.randn(2, 100, module.width, dtype=torch.float64)
    changed = x.clone()
    changed[:, 41:] = torch.randn_like(changed[:, 41:]) * 5  # tokens > 40 replaced
    before, after = module(x), module(changed)
    torch.testing.assert_close(after[:, :41], before[:, :41], rtol=0, atol=1e-12)
    assert (after[:, 41:] - before[:, 41:]).abs().max() > 1e-3, "later tokens should change"


@pytest.mark.parametrize("kind", ["linear-affine", "linear-focused", "linear-elu", "linear-relu"])
def test_bidirectional_attention_sees_later_tokens(kind):
    # the converse of the causal test, so that one cannot pass by ignoring all context
    module = attention_module(kind, causal=False)
    x = torch.randn(1, 50, module.width, dtype=torch.float64)
    changed = x.clone()
    changed[:, 30:] += 1.0
    assert (module(changed)[:, :30] - module(x)[:, :30]).abs().max() > 1e-4


@pytest.mark.parametrize("tower,key,message", [
    ({"attention": "linear-foo"}, "attention", "'linear-foo' is not one of"),
    ({"attention": "linear-affine", "feature_map": "elu"}, "feature_map", "contradicts attention=linear-affine"),
    ({"attention": "linear", "feature_map": "cosine"}, "feature_map", "'cosine' is not one of affine, focused"),
    ({"attention": "linear", "denominator": "sum"}, "denominator", "'sum' is not one of count, kernel"),
    ({"attention": "softmax", "feature_map": "elu"}, "feature_map", "attention is softmax"),
    ({"attention": "linear-focused", "focused_power": 0}, "focused_power", "must be > 0"),
    ({"attention": "linear", "local_kernel": 4}, "local_kernel", "4 is not one of 0, 3, 5"),
])
def test_bad_descriptions_name_the_key(tower, key, message):
    from ds_linclip.models.attention import AttentionSpecError

    with pytest.raises(AttentionSpecError, match=message) as info:
        resolve_attention(tower)
    assert info.value.key == key


def test_local_branch_refused_for_the_causal_tower():
    from ds_linclip.models.attention import AttentionSpecError

    with pytest.raises(AttentionSpecError, match="image tower only") as info:
        resolve_attention({"attention": "linear-affine", "local_kernel": 3}, causal=True)
    assert info.value.key == "local_kernel"


def test_names_round_trip_and_shorthand_defaults():
    assert resolve_attention({"attention": "linear-affine"}).linear.denominator == "count"
    assert resolve_attention({"attention": "linear-focused"}).linear.denominator == "kernel"
    assert resolve_attention({"attention": "linear"}).linear.feature_map == "affine"
    for name in MODULE_NAMES + ["linear-focused-local3", "linear-affine-kernel-local5", "linear-focused-kernel-p2-local3"]:
        spec = parse_attention_name(name)
        assert isinstance(spec, AttentionSpec)
        # the canonical name parses back to the same spec, and config overrides describe it exactly
        assert parse_attention_name(spec.name) == spec
        tower = {key.split(".")[-1]: value for key, value in spec.config_overrides("image").items()}
        assert resolve_attention(tower) == spec
    assert parse_attention_name("linear-focused-kernel").name == "linear-focused"  # the default is not spelt out
    with pytest.raises(ValueError, match="not an attention name"):
        parse_attention_name("linear-affine-local")
