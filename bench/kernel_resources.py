"""On a GPU: launch every kernel once (bf16, d=64) and print what the driver reports per compiled
kernel (shared memory, registers, spills, warps, stages), to compare with the predictions of
tests/test_kernels_compile.py / bench/kernel_compile.py (made without a GPU). Used by bench/gpu_check.sh.
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

from kernels import linear_attention  # noqa: E402
from kernels.linear_attention import KERNELS, _kernel_module  # noqa: E402


def main() -> int:
    assert torch.cuda.is_available(), "needs a GPU"
    print(torch.cuda.get_device_name(), "capability", torch.cuda.get_device_capability())
    for causal, tokens in ((False, 197), (True, 77), (True, 4097)):
        for feature_map in ("affine", "focused"):
            q, k, v = (torch.randn(8, 12, tokens, 64, device="cuda", dtype=torch.bfloat16, requires_grad=True)
                       for _ in range(3))
            scale = torch.full((12, 64), 0.69, device="cuda") if feature_map == "focused" else None
            out = linear_attention(q, k, v, feature_map=feature_map, denominator="kernel", causal=causal, scale=scale)
            out.float().square().sum().backward()
    torch.cuda.synchronize()
    module = _kernel_module(False)
    for name in KERNELS:
        for kernel_cache, *_ in getattr(module, name).device_caches.values():
            for kernel in kernel_cache.values():
                kernel._init_handles()
                meta = kernel.metadata
                print(f"{name:26s} shared {meta.shared / 1024:6.1f} KiB  regs {kernel.n_regs:3d}  spills {kernel.n_spills:4d}"
                      f"  warps {meta.num_warps} stages {meta.num_stages}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
