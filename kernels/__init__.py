"""Linear attention kernels: one entry point, `linear_attention`, that picks a backend.

`backend="auto"`: CUDA tensors -> Triton, anything else -> the fast PyTorch path
(kernels/torch_path.py). `backend="torch"` / `backend="triton"` force one; Triton on CPU
tensors runs through Triton's interpreter (slow; for tests), whatever TRITON_INTERPRET says.
`kernels.reference.linear_attention_reference` stays the plain, readable oracle.
"""

from __future__ import annotations

import torch

# Import the Triton wrapper module (cheap: triton itself loads on first launch) *before* defining the
# function below: importing a submodule sets it as an attribute of its package, which would
# otherwise shadow `kernels.linear_attention` (the function) the first time the module is imported.
import kernels.linear_attention as _triton_wrapper  # noqa: E402,F401
from kernels.reference import DENOMINATORS, LINEAR_KINDS, linear_attention_reference
from kernels.torch_path import linear_attention_torch

BACKENDS = ("auto", "torch", "triton")


def linear_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    kind: str = "linear-affine",
    causal: bool = False,
    denominator: str = "count",
    backend: str = "auto",
    eps: float = 1e-6,
) -> torch.Tensor:
    """Linear attention over `(batch, heads, tokens, head_dim)` tensors; returns v's shape."""
    if kind not in LINEAR_KINDS:
        raise ValueError(f"unknown linear attention kind '{kind}' (known: {', '.join(LINEAR_KINDS)})")
    if backend not in BACKENDS:
        raise ValueError(f"unknown backend '{backend}' (known: {', '.join(BACKENDS)})")
    if backend == "triton" or (backend == "auto" and q.is_cuda):
        return _triton_wrapper.linear_attention_triton(q, k, v, kind=kind, causal=causal, denominator=denominator, eps=eps)
    return linear_attention_torch(q, k, v, kind=kind, causal=causal, denominator=denominator, eps=eps)


__all__ = ["linear_attention", "linear_attention_reference", "linear_attention_torch", "LINEAR_KINDS", "DENOMINATORS", "BACKENDS"]
