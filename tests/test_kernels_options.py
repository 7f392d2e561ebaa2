"""kernels/options.py: every backend takes the one keyword signature, positional or keyword, with LinearOptions' defaults."""

from __future__ import annotations

import inspect

import pytest
import torch

import kernels
from kernels.linear_attention import linear_attention_triton, pola_attention_triton
from kernels.options import LinearOptions, linear_backend
from kernels.reference import linear_attention_reference
from kernels.torch_path import linear_attention_torch, variant_attention_torch

BACKEND_FUNCTIONS = (linear_attention_reference, linear_attention_torch, linear_attention_triton)


def test_backends_share_the_signature_of_the_public_entry_point_less_backend():
    public = inspect.signature(kernels.linear_attention).parameters
    expected = [(name, p.default) for name, p in public.items() if name != "backend"]
    assert [name for name, _ in expected] == ["q", "k", "v", *LinearOptions._fields]
    for fn in BACKEND_FUNCTIONS:
        got = [(name, p.default) for name, p in inspect.signature(fn).parameters.items()]
        assert got == expected, fn.__qualname__
        assert fn.__doc__ and fn.__name__.startswith("linear_attention_")
    for fn in (variant_attention_torch, pola_attention_triton):  # the variants' backends
        assert [(name, p.default) for name, p in inspect.signature(fn).parameters.items()] == expected, fn.__qualname__


@pytest.mark.parametrize("backend", [linear_attention_reference, linear_attention_torch], ids=["reference", "torch"])
def test_positional_keyword_and_default_calls_agree(backend):
    generator = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(1, 2, 9, 8, generator=generator, dtype=torch.float64) for _ in range(3))
    scale = torch.rand(2, 8, generator=generator, dtype=torch.float64) + 0.5
    positional = backend(q, k, v, "focused", "kernel", True, scale, 2.0, 1e-4)
    keyword = backend(q, k, v, eps=1e-4, power=2.0, scale=scale, causal=True, denominator="kernel", feature_map="focused")
    assert torch.equal(positional, keyword)
    assert torch.equal(backend(q, k, v), backend(q, k, v, "affine", "count", False, None, 3.0, 1e-6))
    # a different option really reaches the body
    assert not torch.allclose(backend(q, k, v, causal=True), backend(q, k, v))


def test_unknown_option_is_a_type_error():
    q = torch.randn(1, 1, 3, 4)
    with pytest.raises(TypeError, match="featuremap"):
        linear_attention_torch(q, q, q, featuremap="elu")


def test_linear_backend_hands_the_body_one_options_tuple():
    seen = []

    @linear_backend
    def body(q, k, v, options: LinearOptions):
        seen.append(options)
        return v

    q = torch.zeros(1, 1, 2, 4)
    assert body(q, q, q, "elu", causal=True) is q
    assert seen == [LinearOptions(feature_map="elu", causal=True)]
    assert seen[0]._asdict() == dict(feature_map="elu", denominator="count", causal=True, scale=None, power=3.0, eps=1e-6)
