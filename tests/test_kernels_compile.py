"""Every Triton kernel the wrapper can launch compiles for sm_80 and sm_90 and fits the GPU.

No GPU and no interpreter: `triton.compile(ASTSource(...), target=GPUTarget("cuda", arch, 32))`
runs triton's frontend, LLVM and the ptxas in the triton wheel on this CPU (bench/kernel_compile.py).
Each case gets exactly the constexprs and num_warps / num_stages / BLOCK_N the launcher would pass
(`kernels.linear_attention.kernel_constexprs` -> `launch_config`, the one place they are chosen).
Asserted: a cubin exists, the dynamic shared memory fits the target (A100 163 KiB, H100/H200
227 KiB), and on sm_90 the half-precision kernels at the presets' head dim (64) do not spill.
The module fixture prints the per-kernel table (shared memory, registers, spills; `pytest -s`).

Grid: LINCLIP_COMPILE_GRID = ci (default, 31 compiles, ~35 s on 2 idle cores with a cold cache; the list
is `bench.kernel_compile.cases`), worst (240), or full (2280 compiles; hours on 2 cores; also
`python bench/kernel_compile.py --grid full`). Separately, every kernel as the pola map launches it at the
presets' head dim (bf16, d = 64: head dim 128, value dim 32, relu map) on sm_90; the whole `pola` grid
(d = 32 too, and fp32) is `python bench/kernel_compile.py --grid pola`. All of it is slow: a compile is
a test of a kernel edit, not of the inner loop.
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
# the pola grid's cases at the presets' head dim (d = 64 -> 2d = 128), the one a ViT-B/L trains with
POLA_CASES = [c for c in kernel_compile.cases("pola") if c.dtype == "bf16" and c.head_dim == 128]
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


@pytest.fixture(scope="module")
def compiled_pola():
    results = kernel_compile.compile_all(POLA_CASES, jobs=max(1, min(2, os.cpu_count() or 1)))
    print(f"\n{kernel_compile.summary(results)}\n")
    return {r["id"]: r for r in results}


@pytest.mark.slow  # ~35 s for the 31 compiles on a cold cache
@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_kernel_compiles_and_fits(case, compiled):
    check_fits(case, compiled[case.id])


@pytest.mark.slow  # ~10 s for the 8 compiles on a cold cache
@pytest.mark.parametrize("case", POLA_CASES, ids=[c.id for c in POLA_CASES])
def test_pola_kernels_compile_and_fit(case, compiled_pola):
    """The launches of the pola map (2d-wide features, d/2 value channels, relu kernels) at model head dim
    64: cubins for sm_90 that fit and do not spill (measured over the whole pola grid, fp32 too: none does)."""
    result = compiled_pola[case.id]
    check_fits(case, result)
    assert result["spill_stores"] == 0 and result["spill_loads"] == 0, f"{case.id}: spills ({result['config']})"


def test_pola_grid_is_what_the_pola_map_launches(monkeypatch):
    """pola_attention_triton launches the relu kernels at head dim 2d, value dim d/2: the pola grid's cases."""
    import sys

    from kernels import linear_attention
    from kernels.reference import pola_power

    triton_wrapper = sys.modules["kernels.linear_attention"]  # the module (the package attribute is the function)

    launched = []
    original = triton_wrapper._Launch.__init__

    def record(self, q, v, feature_map, *args):
        launched.append((q.shape[-1], v.shape[-1], feature_map))
        original(self, q, v, feature_map, *args)

    monkeypatch.setattr(triton_wrapper._Launch, "__init__", record)
    q = torch.randn(1, 2, 3, 32)
    linear_attention(q, q, q, "pola", "kernel", scale=torch.ones(2, 32), power=pola_power(torch.zeros(2, 32)),
                     backend="triton")
    assert launched == [(64, 16, triton_wrapper.PROXY_MAP)] * 2
    pola_grid = kernel_compile.cases("pola")
    assert {(c.head_dim, c.values, c.feature_map) for c in pola_grid} == {
        (2 * d, d // 2, triton_wrapper.PROXY_MAP) for _, d in kernel_compile.POLA_CASES}
    assert {c.kernel for c in POLA_CASES} == set(triton_wrapper.KERNELS) and len(POLA_CASES) == len(triton_wrapper.KERNELS)


def check_fits(case, result):
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
