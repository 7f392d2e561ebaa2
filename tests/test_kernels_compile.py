"""Every Triton kernel the wrapper can launch compiles for sm_80 and sm_90 and fits the GPU.

No GPU and no interpreter: `triton.compile(ASTSource(...), target=GPUTarget("cuda", arch, 32))`
runs triton's frontend, LLVM and the ptxas in the triton wheel on this CPU (bench/kernel_compile.py).
Each case gets exactly the constexprs and num_warps / num_stages / BLOCK_N the launcher would pass
(`kernels.linear_attention.kernel_constexprs` -> `launch_config`, the one place they are chosen).
Asserted: a cubin exists, the dynamic shared memory fits the target (A100 163 KiB, H100/H200
227 KiB), and on sm_90 the half-precision kernels at the presets' head dim (64) do not spill.
The module fixture prints the per-kernel table (shared memory, registers, spills; `pytest -s`).

Grid: LINCLIP_COMPILE_GRID = ci (default, 31 compiles, ~2.5 min on 2 cores; the list is
`bench.kernel_compile.cases`), worst (240), or full (2280 compiles; hours on 2 cores; also
`python bench/kernel_compile.py --grid full`).
Compiled kernels are cached in TRITON_CACHE_DIR (default /tmp/ds_linclip_triton_cache), so reruns
take seconds; the cache is safe to share between parallel runs.
"""

from __future__ import annotations

import os

import pytest
import torch

kernel_compile = pytest.importorskip("bench.kernel_compile")

GRID = os.environ.get("LINCLIP_COMPILE_GRID", "ci")
CASES = kernel_compile.cases(GRID)
# bf16/fp16 at head dim <= 64 on H100/H200: every preset's case; a spill there costs every training
# step. (sm_80 still spills a little in the causal backward, see kernels/README.md; reported, not failed.)
NO_SPILL = {"archs": (90,), "dtypes": ("bf16", "fp16"), "max_head_dim": 64}


def _ptxas_available() -> bool:
    try:
        from triton.backends.nvidia.compiler import get_ptxas

        return os.path.exists(get_ptxas(90).path)
    except Exception:  # noqa: BLE001 - no nvidia backend in this triton build
        return False


pytestmark = pytest.mark.skipif(not _ptxas_available(), reason="triton without its nvidia backend / ptxas")


@pytest.fixture(scope="module")
def compiled():
    jobs = max(1, min(int(os.environ.get("LINCLIP_COMPILE_JOBS", "2")), os.cpu_count() or 1))
    results = kernel_compile.compile_all(CASES, jobs=jobs)
    print(f"\n{kernel_compile.summary(results)}\n")
    return {r["id"]: r for r in results}


@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_kernel_compiles_and_fits(case, compiled):
    result = compiled[case.id]
    assert result["cubin_bytes"] > 0, f"{case.id}: no cubin"
    assert result["shared"] <= result["shared_limit"], (
        f"{case.id}: asks for {result['shared'] / 1024:.1f} KiB of shared memory, the GPU has "
        f"{result['shared_limit'] / 1024:.0f} KiB (config {result['config']})")
    if case.arch in NO_SPILL["archs"] and case.dtype in NO_SPILL["dtypes"] and case.head_dim <= NO_SPILL["max_head_dim"]:
        assert result["spill_stores"] == 0 and result["spill_loads"] == 0, (
            f"{case.id}: spills {result['spill_stores']}/{result['spill_loads']} bytes "
            f"at {result['registers']} registers (config {result['config']})")


def test_ci_grid_covers_every_kernel_arch_and_dtype():
    from kernels.linear_attention import KERNELS

    ci = kernel_compile.cases("ci")
    assert {c.kernel for c in ci} == set(KERNELS)
    assert {c.arch for c in ci} == {80, 90}
    assert {c.dtype for c in ci} == {"fp32", "bf16", "fp16"}
    for kernel in KERNELS:  # every compile-time switch of every kernel at the presets' case
        want = set(kernel_compile._switches(kernel))
        assert {(c.rowsum_den, c.chunked) for c in ci if c.kernel == kernel and c.dtype == "bf16" and c.head_dim == 64} == want
    assert len(kernel_compile.cases("full")) == 2280


def test_launcher_passes_what_the_compile_test_compiles(monkeypatch):
    """The wrapper's launches take their constexprs from kernel_constexprs (so from launch_config)."""
    import sys

    from kernels.linear_attention import KERNELS, _Launch, kernel_constexprs

    monkeypatch.setattr(sys.modules["kernels.linear_attention"], "INTERPRETED_BLOCK_N", None)

    q = torch.zeros(2, 3, 1100, 64, dtype=torch.bfloat16)
    for causal in (False, True):
        launch = _Launch(q, q, "focused", "kernel", causal, 3.0, 1e-6)
        assert launch.chunked == causal
        for kernel in KERNELS:
            meta, _ = kernel_constexprs(kernel, q.dtype, 64, 64, "focused", True, 3.0, causal, 90)
            assert launch.constexprs[kernel] == meta
