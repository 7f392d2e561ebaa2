"""Linear attention kernels: one entry point, `linear_attention`, that checks its arguments and picks a backend.

`backend="auto"`: CUDA tensors -> Triton, anything else -> the fast PyTorch path
(kernels/torch_path.py). `backend="torch"` / `backend="triton"` force one; Triton on CPU
tensors runs through Triton's interpreter (slow; for tests), whatever TRITON_INTERPRET says.
`kernels.reference.linear_attention_reference` stays the plain, readable oracle. The backends
share one keyword signature (`kernels.options`: `LinearOptions` + `@linear_backend`) and trust this
function's check (`check_linear_args`).

The variants (`kernels.reference.is_variant`: the `pola` feature map, the `mala` normaliser; oracle
`variant_attention_reference`): pola with the `kernel` or `count` normaliser (`TRITON_VARIANTS`) runs like
the other maps, on Triton for `backend="triton"` and for CUDA tensors under `"auto"`
(`pola_attention_triton`: features materialised in torch, the sweeps in the kernels), else on the PyTorch
path (`variant_attention_torch`). The `mala` normaliser (any map) has no Triton kernel yet:
`backend="triton"` refuses it, `backend="auto"` runs it on the PyTorch path for CUDA tensors too.
"""

from __future__ import annotations

import torch

# Import the Triton wrapper module (cheap: triton itself loads on first launch) *before* defining the
# function below: importing a submodule sets it as an attribute of its package, which would
# otherwise shadow `kernels.linear_attention` (the function) the first time the module is imported.
import kernels.linear_attention as _triton_wrapper  # noqa: E402,F401
from kernels.options import LinearOptions
from kernels.reference import DENOMINATORS, FEATURE_MAPS, LinearSpec, check_linear_args, linear_attention_reference
from kernels.reference import check_variant_args, is_variant, variant_attention_reference
from kernels.torch_path import linear_attention_torch, variant_attention_torch

BACKENDS = ("auto", "torch", "triton")
# the variants the Triton kernels run (pola on materialised features, `pola_attention_triton`); mala stays on torch
TRITON_VARIANTS = (("pola", "kernel"), ("pola", "count"))


def linear_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    feature_map: str = "affine",
    denominator: str = "count",
    causal: bool = False,
    scale: torch.Tensor | None = None,
    power: float | torch.Tensor = 3.0,
    backend: str = "auto",
    eps: float = 1e-6,
) -> torch.Tensor:
    """Linear attention over `(batch, heads, tokens, head_dim)` tensors; returns v's shape.

    feature_map: affine | focused | elu | relu; denominator: count | kernel (see kernels/reference.py).
    scale: (heads, head_dim) positive tensor, the focused (and pola) map's s (required for it, else None).
    Variants: feature_map pola (power: a (heads, head_dim) tensor p; Triton with count and kernel),
    denominator mala (PyTorch path only).
    """
    options = LinearOptions(feature_map, denominator, causal, scale, power, eps)._asdict()
    if is_variant(feature_map, denominator):
        check_variant_args(q, k, v, feature_map, denominator, scale, power)
        if backend not in BACKENDS:
            raise ValueError(f"unknown backend '{backend}' (known: {', '.join(BACKENDS)})")
        on_triton = backend == "triton" or (backend == "auto" and q.is_cuda)
        if on_triton and (feature_map, denominator) in TRITON_VARIANTS:
            return _triton_wrapper.pola_attention_triton(q, k, v, **options)
        if backend == "triton":
            raise ValueError(f"linear attention {feature_map}/{denominator} has no Triton kernel yet; "
                             "use backend='torch' (or 'auto', which runs it on the PyTorch path for any device)")
        return variant_attention_torch(q, k, v, **options)
    check_linear_args(q, k, v, feature_map, denominator, scale, power)
    if backend not in BACKENDS:
        raise ValueError(f"unknown backend '{backend}' (known: {', '.join(BACKENDS)})")
    if backend == "triton" or (backend == "auto" and q.is_cuda):
        return _triton_wrapper.linear_attention_triton(q, k, v, **options)
    return linear_attention_torch(q, k, v, **options)


__all__ = ["linear_attention", "linear_attention_reference", "linear_attention_torch", "LinearSpec", "LinearOptions",
           "variant_attention_reference", "variant_attention_torch",
           "FEATURE_MAPS", "DENOMINATORS", "BACKENDS", "TRITON_VARIANTS"]
