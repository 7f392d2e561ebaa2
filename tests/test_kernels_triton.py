"""The Triton kernels (kernels/linear_attention.py) against the float64 O(N²) oracle.

On a CPU-only machine every launch runs through Triton's interpreter: `kernels.linear_attention`
loads its kernel file in interpreter mode for CPU tensors itself, so these tests neither need
TRITON_INTERPRET=1 nor care which module imported triton first (test_import_order_independent
checks that in a fresh process). On a CUDA machine (bench/gpu_check.sh) the same tests run the
compiled kernels on the GPU; the gradchecks stay on CPU (float64, interpreted).

Interpreted Triton is slow, so shapes are small: every kind × causality × d ∈ {32, 64} for
N ∈ {1, 7, 77}, and fewer combinations for N ∈ {197, 1025}.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from kernels import linear_attention
from kernels.linear_attention import linear_attention_triton
from test_kernels import KIND_CASES, KIND_IDS, check_against_oracle, random_qkv, rel_err

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
REPO_ROOT = Path(__file__).resolve().parents[1]
FP32_TOL, FP32_GRAD_TOL = 1e-5, 1e-4
# gradients are compared relative to max(max |reference|, FLOOR): with one token, affine/kernel and
# elu/relu outputs are ≈ v and dq, dk ≈ 0, where fp32 rounding (~1e-7) is all there is
FLOOR = 1e-2

SMALL_CASES = [
    (tokens, head_dim, causal, kind, denominator)
    for tokens in (1, 7, 77)
    for head_dim in (32, 64)
    for causal in (False, True)
    for kind, denominator in KIND_CASES
]
# larger N: each kind and causality at least once, both head dims, multi-chunk + ragged tail
LARGE_CASES = [
    (197, 64, False, "linear-affine", "count"),
    (197, 64, True, "linear-affine", "count"),
    (197, 32, True, "linear-affine", "kernel"),
    (197, 64, False, "linear-elu", "count"),
    (197, 32, True, "linear-relu", "count"),
    (1025, 32, False, "linear-affine", "count"),
    (1025, 32, True, "linear-affine", "count"),
    (1025, 64, True, "linear-elu", "count"),
    (1025, 64, False, "linear-relu", "count"),
]


def _case_id(case):
    tokens, head_dim, causal, kind, denominator = case
    return f"N{tokens}-d{head_dim}-{'causal' if causal else 'bidir'}-{kind}-{denominator}"


@pytest.mark.parametrize("case", SMALL_CASES + LARGE_CASES, ids=[_case_id(c) for c in SMALL_CASES + LARGE_CASES])
def test_triton_matches_oracle(case):
    tokens, head_dim, causal, kind, denominator = case
    heads = 1 if tokens > 500 else 2  # the interpreter runs programs one after another
    q, k, v = random_qkv(1, heads, tokens, head_dim, device=DEVICE, seed=tokens + head_dim)
    check_against_oracle(linear_attention_triton, q, k, v, kind, causal, denominator, FP32_TOL, FP32_GRAD_TOL, floor=FLOOR)


@pytest.mark.parametrize("causal", [False, True], ids=["bidirectional", "causal"])
def test_triton_batch_heads_strides_and_padding(causal):
    """Batch and head indexing through strided views (the model's qkv split), head_dim 80 -> 128 lanes,
    value dim != head dim; one kind per causality to keep the interpreter time down."""
    generator = torch.Generator().manual_seed(7)
    qkv = torch.randn(2, 70, 3, 2, 80, generator=generator).to(DEVICE)  # (B, N, 3, H, d)
    q, k, v = (t.detach().requires_grad_() for t in qkv.permute(2, 0, 3, 1, 4))
    assert not q.is_contiguous() and q.stride(-1) == 1
    kind = "linear-affine" if causal else "linear-elu"
    check_against_oracle(linear_attention_triton, q, k, v, kind, causal, "count", FP32_TOL, FP32_GRAD_TOL, floor=FLOOR)
    q, k, v = random_qkv(2, 1, 20, 32, device=DEVICE, value_dim=48)
    check_against_oracle(linear_attention_triton, q, k, v, "linear-affine", causal, "kernel", FP32_TOL, FP32_GRAD_TOL, floor=FLOOR)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
def test_triton_half_precision_inputs_accumulate_in_fp32(dtype):
    q, k, v = random_qkv(1, 2, 77, 64, dtype=dtype, device=DEVICE)
    for causal in (False, True):
        check_against_oracle(linear_attention_triton, q, k, v, "linear-affine", causal, "count", 2e-2, 3e-2, floor=FLOOR)


@pytest.mark.parametrize("causal", [False, True], ids=["bidirectional", "causal"])
@pytest.mark.parametrize("kind,denominator", KIND_CASES, ids=KIND_IDS)
def test_triton_gradcheck(kind, denominator, causal):
    # float64 end to end (the kernels accumulate in fp64 for fp64 inputs), tiny, on CPU; fast_mode
    # checks a random projection of the Jacobian (full Jacobians took ~15 s each interpreted)
    q, k, v = random_qkv(1, 1, 5, 4, dtype=torch.float64)
    assert torch.autograd.gradcheck(
        lambda q, k, v: linear_attention_triton(q, k, v, kind=kind, causal=causal, denominator=denominator),
        (q, k, v), eps=1e-6, atol=1e-6, fast_mode=True)


def test_triton_agrees_with_torch_path_through_dispatch():
    q, k, v = random_qkv(2, 2, 40, 32, device=DEVICE)
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


def test_bad_inputs_are_named():
    q, k, v = random_qkv(1, 1, 4, 16)
    with pytest.raises(ValueError, match="expected q, k"):
        linear_attention_triton(q, k[:, :, :3], v)
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
