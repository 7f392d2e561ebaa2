"""The Triton kernels (kernels/linear_attention.py) against the float64 oracle (kernels/reference.py).

On a CPU-only machine every launch runs through Triton's interpreter: `kernels.linear_attention`
loads its kernel file in interpreter mode for CPU tensors itself, so these tests neither need
TRITON_INTERPRET=1 nor care which module imported triton first (test_import_order_independent
checks that in a fresh process). On a CUDA machine (bench/gpu_check.sh) the same tests run the
compiled kernels on the GPU; the gradchecks stay on CPU (float64, interpreted).

The oracle is `linear_attention_reference` in float64 (tests/test_kernels.py checks it against a
naive N×N form); autograd through it gives every gradient, the focused map's scale included.

Interpreted Triton is slow, so shapes are small: every feature map × denominator × causality at
d = 32 for N ∈ {1, 50, 197}, and N = 1025 (causal: the chunk-parallel form; marked slow).
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from kernels.linear_attention import CHUNKED_MIN_TOKENS, linear_attention_triton
from kernels.reference import DENOMINATORS, FEATURE_MAPS, linear_attention_reference

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
REPO_ROOT = Path(__file__).resolve().parents[1]
VARIANTS = [(f, d) for f in FEATURE_MAPS for d in DENOMINATORS]
VARIANT_IDS = [f"{f}-{d}" for f, d in VARIANTS]
FP32_TOL, FP32_GRAD_TOL = 1e-5, 1e-4
# gradients are compared relative to max(max |reference|, FLOOR): with one token, outputs are ≈ v
# and dq, dk ≈ 0, where fp32 rounding (~1e-7) is all there is
FLOOR = 1e-2


def random_inputs(batch, heads, tokens, head_dim, dtype=torch.float32, seed=0, value_dim=None, focused=False):
    generator = torch.Generator().manual_seed(seed)
    shapes = [(batch, heads, tokens, head_dim)] * 2 + [(batch, heads, tokens, value_dim or head_dim)]
    q, k, v = (torch.randn(s, generator=generator, dtype=torch.float64).to(device=DEVICE, dtype=dtype).requires_grad_()
               for s in shapes)
    scale = None
    if focused:  # softplus of a parameter near 0, kept fp32 like a model parameter
        scale = (0.5 + torch.rand(heads, head_dim, generator=generator, dtype=torch.float64)).to(DEVICE)
        scale = scale.to(torch.float64 if dtype == torch.float64 else torch.float32).requires_grad_()
    return q, k, v, scale


def rel_err(got: torch.Tensor, want: torch.Tensor, floor: float = 1e-4) -> float:
    return ((got.double() - want.double()).abs().max() / want.double().abs().max().clamp_min(floor)).item()


def check_against_oracle(q, k, v, scale, feature_map, denominator, causal, tol, grad_tol, power=3.0, seed=1):
    """Output and dq, dk, dv (and ds) of the Triton path vs the oracle on float64 copies of the inputs."""
    out = linear_attention_triton(q, k, v, feature_map=feature_map, denominator=denominator, causal=causal,
                                  scale=scale, power=power)
    inputs = [q, k, v] + ([scale] if scale is not None else [])
    inputs64 = [t.detach().cpu().double().requires_grad_() for t in inputs]
    expected = linear_attention_reference(*inputs64[:3], feature_map=feature_map, denominator=denominator,
                                          causal=causal, scale=inputs64[3] if scale is not None else None, power=power)
    assert out.shape == v.shape and out.dtype == v.dtype
    assert rel_err(out, expected) < tol, f"output: rel err {rel_err(out, expected):.2e} >= {tol}"
    generator = torch.Generator().manual_seed(seed)
    upstream = torch.randn(out.shape, generator=generator, dtype=torch.float64)
    grads = torch.autograd.grad(out, inputs, upstream.to(device=out.device, dtype=out.dtype))
    want = torch.autograd.grad(expected, inputs64, upstream)
    for name, got, ref in zip(("dq", "dk", "dv", "ds"), grads, want):
        err = rel_err(got, ref, floor=FLOOR)
        assert err < grad_tol, f"{name}: rel err {err:.2e} >= {grad_tol}"


CASES = [(tokens, causal, f, d) for tokens in (1, 50, 197) for causal in (False, True) for f, d in VARIANTS]
# long inputs: causal ones run chunk-parallel (>= CHUNKED_MIN_TOKENS); bidirectional ones split too
LONG_CASES = [(1025, causal, f, d) for causal in (False, True) for f, d in VARIANTS]  # every variant, ~2-4 s each


def _case_id(case):
    tokens, causal, feature_map, denominator = case
    return f"N{tokens}-{'causal' if causal else 'bidir'}-{feature_map}-{denominator}"


@pytest.mark.parametrize("case", CASES, ids=[_case_id(c) for c in CASES])
def test_triton_matches_oracle(case):
    tokens, causal, feature_map, denominator = case
    q, k, v, scale = random_inputs(1, 2, tokens, 32, seed=tokens, focused=feature_map == "focused")
    # one token, kernel normaliser: out = v·a/(a + eps), and dq, dk come from (v - out)/den, a
    # cancellation that fp32 resolves to ~1e-6 absolute when a = φq·φk is small (focused maps)
    grad_tol = 1e-3 if tokens == 1 and denominator == "kernel" else FP32_GRAD_TOL
    check_against_oracle(q, k, v, scale, feature_map, denominator, causal, FP32_TOL, grad_tol)


@pytest.mark.slow
@pytest.mark.parametrize("case", LONG_CASES, ids=[_case_id(c) for c in LONG_CASES])
def test_triton_matches_oracle_long_inputs(case):
    tokens, causal, feature_map, denominator = case
    assert tokens >= CHUNKED_MIN_TOKENS
    q, k, v, scale = random_inputs(1, 1, tokens, 32, seed=3, focused=feature_map == "focused")
    check_against_oracle(q, k, v, scale, feature_map, denominator, causal, FP32_TOL, FP32_GRAD_TOL)


@pytest.mark.parametrize("causal", [False, True], ids=["bidirectional", "causal"])
@pytest.mark.parametrize("feature_map,denominator", [("affine", "count"), ("focused", "kernel")], ids=["affine", "focused"])
def test_triton_chunk_parallel_causal_matches_oracle_in_float64(feature_map, denominator, causal, monkeypatch):
    """The chunk-parallel causal form (and split bidirectional states) at a few hundred tokens, in
    float64, by lowering the thresholds: many short ranges, a ragged last one."""
    wrapper = sys.modules["kernels.linear_attention"]  # the package attribute is the dispatch function
    monkeypatch.setattr(wrapper, "CHUNKED_MIN_TOKENS", 64)
    monkeypatch.setattr(wrapper, "INTERPRETED_RANGE_TOKENS", 64)
    q, k, v, scale = random_inputs(1, 2, 150, 32, dtype=torch.float64, seed=5, focused=feature_map == "focused")
    check_against_oracle(q, k, v, scale, feature_map, denominator, causal, 1e-12, 1e-10)


@pytest.mark.parametrize("dtype,head_dim", [(torch.float32, 32), (torch.bfloat16, 64)], ids=["fp32-d32", "bf16-d64"])
def test_triton_gpu_block_sizes(dtype, head_dim, monkeypatch):
    """The interpreter normally runs 64-token blocks (fast); here it runs launch_config's BLOCK_N
    (16 for the causal kernels at these sizes), so the GPU's tiling is checked on CPU too."""
    wrapper = sys.modules["kernels.linear_attention"]
    monkeypatch.setattr(wrapper, "INTERPRETED_BLOCK_N", None)
    tol, grad_tol = (FP32_TOL, FP32_GRAD_TOL) if dtype == torch.float32 else (2e-2, 3e-2)
    q, k, v, scale = random_inputs(1, 1, 100, head_dim, dtype=dtype, seed=13, focused=True)
    for causal in (False, True):
        check_against_oracle(q, k, v, scale, "focused", "kernel", causal, tol, grad_tol)
        check_against_oracle(q, k, v, None, "affine", "count", causal, tol, grad_tol)


@pytest.mark.parametrize("power", [2.0, 2.5])
def test_triton_focused_other_powers(power):
    q, k, v, scale = random_inputs(1, 2, 50, 32, seed=11, focused=True)
    for causal in (False, True):
        check_against_oracle(q, k, v, scale, "focused", "kernel", causal, FP32_TOL, FP32_GRAD_TOL, power=power)


@pytest.mark.parametrize("causal", [False, True], ids=["bidirectional", "causal"])
def test_triton_batch_heads_strides_and_padding(causal):
    """Batch and head indexing through strided views (the model's qkv split), head_dim 80 -> 128 lanes,
    value dim != head dim; one variant per causality to keep the interpreter time down."""
    generator = torch.Generator().manual_seed(7)
    qkv = torch.randn(2, 70, 3, 2, 80, generator=generator).to(DEVICE)  # (B, N, 3, H, d)
    q, k, v = (t.detach().requires_grad_() for t in qkv.permute(2, 0, 3, 1, 4))
    assert not q.is_contiguous() and q.stride(-1) == 1
    scale = (0.5 + torch.rand(2, 80, generator=generator)).to(DEVICE).requires_grad_()
    if causal:
        check_against_oracle(q, k, v, None, "affine", "count", causal, FP32_TOL, FP32_GRAD_TOL)
    else:
        check_against_oracle(q, k, v, scale, "focused", "count", causal, FP32_TOL, FP32_GRAD_TOL)
    q, k, v, _ = random_inputs(2, 1, 20, 32, value_dim=48)
    check_against_oracle(q, k, v, None, "relu", "kernel", causal, FP32_TOL, FP32_GRAD_TOL)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
def test_triton_half_precision_inputs_accumulate_in_fp32(dtype):
    q, k, v, scale = random_inputs(1, 2, 77, 64, dtype=dtype, focused=True)
    for causal in (False, True):
        check_against_oracle(q, k, v, None, "affine", "count", causal, 2e-2, 3e-2)
    check_against_oracle(q, k, v, scale, "focused", "kernel", True, 2e-2, 3e-2)


@pytest.mark.parametrize("causal", [False, True], ids=["bidirectional", "causal"])
@pytest.mark.parametrize("feature_map,denominator", VARIANTS, ids=VARIANT_IDS)
def test_triton_gradcheck(feature_map, denominator, causal):
    # float64 end to end (the kernels accumulate in fp64 for fp64 inputs), tiny, on CPU; fast_mode
    # checks a random projection of the Jacobian (full Jacobians took ~15 s each interpreted)
    q, k, v, scale = random_inputs(1, 1, 5, 4, dtype=torch.float64, focused=feature_map == "focused")
    inputs = (q, k, v) + ((scale,) if scale is not None else ())
    q, k, v = (t.cpu().detach().requires_grad_() for t in (q, k, v))

    def fn(q, k, v, scale=None):
        return linear_attention_triton(q, k, v, feature_map=feature_map, denominator=denominator, causal=causal,
                                       scale=scale)

    inputs = tuple(t.cpu().detach().requires_grad_() for t in inputs)
    assert torch.autograd.gradcheck(fn, inputs, eps=1e-6, atol=1e-6, fast_mode=True)


def test_triton_agrees_with_torch_path_through_dispatch():
    from kernels import linear_attention

    q, k, v, _ = random_inputs(2, 2, 40, 32)
    for causal in (False, True):
        triton_out = linear_attention(q, k, v, causal=causal, backend="triton")
        torch_out = linear_attention(q, k, v, causal=causal, backend="torch")
        assert rel_err(triton_out, torch_out) < FP32_TOL


def test_import_order_independent():
    """triton imported (compiled mode) before kernels, TRITON_INTERPRET unset: CPU launches still interpret."""
    script = (
        "import triton, triton.language, torch\n"
        "from kernels import linear_attention\n"
        "q, k, v = (torch.randn(1, 2, 70, 32, requires_grad=True) for _ in range(3))\n"
        "for causal in (False, True):\n"
        "    a = linear_attention(q, k, v, causal=causal, backend='triton')\n"
        "    b = linear_attention(q, k, v, causal=causal, backend='torch')\n"
        "    assert (a - b).abs().max() < 1e-5, (causal, (a - b).abs().max())\n"
        "    a.sum().backward()\n"
        "from kernels.linear_attention import _kernel_module\n"
        "from triton.runtime.interpreter import InterpretedFunction\n"
        "assert isinstance(_kernel_module(True)._causal_fwd_kernel, InterpretedFunction)\n"
        "assert not isinstance(triton.language.sum, InterpretedFunction)  # triton's own mode untouched\n"
        "print('ok')\n"
    )
    env = {key: val for key, val in os.environ.items() if key != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO_ROOT), env.get("PYTHONPATH")]))
    env["CUDA_VISIBLE_DEVICES"] = ""
    result = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0 and result.stdout.strip().endswith("ok"), result.stderr[-3000:]


def test_bad_dtypes_are_named_and_empty_inputs_pass():
    q, k, v, _ = random_inputs(1, 1, 4, 16)
    with pytest.raises(TypeError, match="must share one of"):
        linear_attention_triton(q, k.double(), v)
    empty = torch.zeros(1, 1, 0, 16)
    assert linear_attention_triton(empty, empty, empty).shape == (1, 1, 0, 16)


@pytest.mark.slow
def test_tiny_clip_same_loss_and_gradients_with_triton_and_torch_backends():
    """The whole model: linear-affine image tower (bidirectional), linear-elu text tower (causal)."""
    from ds_linclip.models import build_model
    from ds_linclip.models.clip import model_config

    overrides = {"image.attention": "linear-affine", "text.attention": "linear-elu", "image.layers": 2,
                 "text.layers": 2}
    torch.manual_seed(0)
    models = {}
    for backend in ("torch", "triton"):
        models[backend] = build_model(model_config("tiny", {**overrides, "attention_backend": backend})).to(DEVICE)
    models["triton"].load_state_dict(models["torch"].state_dict())
    generator = torch.Generator().manual_seed(1)
    images = torch.randn(3, 3, 32, 32, generator=generator).to(DEVICE)
    tokens = torch.randint(1, 1000, (3, 32), generator=generator)
    tokens[:, 20] = 49407  # EOT (the max id) pools the text features
    tokens = tokens.to(DEVICE)
    losses, grads = {}, {}
    for backend, model in models.items():
        image_features, text_features, scale = model(images, tokens)
        logits = scale * image_features @ text_features.T
        labels = torch.arange(3, device=DEVICE)
        loss = (torch.nn.functional.cross_entropy(logits, labels) + torch.nn.functional.cross_entropy(logits.T, labels)) / 2
        loss.backward()
        losses[backend] = loss.item()
        grads[backend] = {name: p.grad for name, p in model.named_parameters() if p.grad is not None}
    assert abs(losses["torch"] - losses["triton"]) < 1e-5 * abs(losses["torch"])
    assert grads["torch"].keys() == grads["triton"].keys() and len(grads["torch"]) > 20
    for name, want in grads["torch"].items():
        assert rel_err(grads["triton"][name], want, floor=1e-6) < 1e-3, name
