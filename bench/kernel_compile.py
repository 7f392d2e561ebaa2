"""Compile the Triton kernels for GPU targets on a machine without a GPU; report shared memory,
registers and spills per launchable case.

Every case is compiled with exactly the constexprs and launch options the wrapper would pass
(`kernels.linear_attention.kernel_constexprs`, which calls `launch_config`), by
`triton.compile(ASTSource(...), target=GPUTarget("cuda", arch, 32))`: the real frontend, LLVM and
the ptxas shipped in the triton wheel. `metadata.shared` is the dynamic shared memory the launch
asks for; registers and spills come from ptxas -v (captured while compiling, kept beside triton's
cache so reruns are fast; re-derived from the cached PTX if missing).

    python bench/kernel_compile.py                # the CI grid (tests/test_kernels_compile.py)
    python bench/kernel_compile.py --grid full    # every kernel × dtype × head dim × map × switches
    python bench/kernel_compile.py --grid worst   # the largest variant of every kernel × dtype × dim
    python bench/kernel_compile.py --grid pola    # the kernels as the pola map launches them
    python bench/kernel_compile.py --jobs 2 --out bench/results/kernel_compile.md

TRITON_CACHE_DIR defaults to /tmp/ds_linclip_triton_cache (shared by the test, parallel-safe:
triton writes its cache atomically, and so does this file's sidecar).
"""

from __future__ import annotations

import argparse
import contextlib
import io
import itertools
import json
import os
import re
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor
from dataclasses import asdict, dataclass
from pathlib import Path

os.environ.setdefault("TRITON_CACHE_DIR", "/tmp/ds_linclip_triton_cache")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

from kernels.reference import FEATURE_MAPS  # noqa: E402

ARCHS = (80, 90)
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
HEAD_DIMS = (32, 64, 80, 96, 128)
# pointer arguments in the input dtype; every other pointer is in the accumulation dtype
_IO_POINTERS = {"Q", "K", "V", "O", "DO", "DQ", "DK", "DV"}
_INT_SCALARS = {"H", "N", "tokens_per_split"}


@dataclass(frozen=True)
class Case:
    kernel: str
    arch: int
    dtype: str
    head_dim: int
    feature_map: str
    rowsum_den: bool
    chunked: bool
    value_dim: int | None = None  # v's channels when not head_dim (pola's sweeps: features 2d wide, values d/2)

    @property
    def values(self) -> int:
        return self.value_dim or self.head_dim

    @property
    def id(self) -> str:
        switches = ("-rowsum" if self.rowsum_den else "") + ("-chunked" if self.chunked else "")
        values = f"-e{self.value_dim}" if self.value_dim else ""
        return f"{self.kernel.strip('_')}-sm{self.arch}-{self.dtype}-d{self.head_dim}{values}-{self.feature_map}{switches}"


def _switches(kernel: str):
    """(rowsum_den, chunked) values that change the kernel's code."""
    from kernels.linear_attention import _CHUNKED_SWITCH, _NO_ROWSUM_SWITCH

    rowsum = (False,) if kernel in _NO_ROWSUM_SWITCH else (False, True)
    chunked = (False, True) if kernel in _CHUNKED_SWITCH else (False,)
    return itertools.product(rowsum, chunked)


# CI extras: (kernel, arch, dtype, head dim) with the most shared memory per block in the worst
# grid, and fp32 (cheap to compile ones; fp32 at d >= 80 takes 1-1.5 min per kernel), each in its largest variant
CI_EXTREMES = (
    ("_bidir_bwd_query_kernel", 80, "bf16", 128),  # 156 of 163 KiB
    ("_bidir_bwd_key_kernel", 80, "fp16", 128),  # 128 of 163 KiB
    ("_causal_bwd_key_kernel", 80, "fp16", 80),  # 105 of 163 KiB
    ("_bidir_state_kernel", 90, "fp32", 32),  # fp32: exact FMA dots, a different code path
    ("_causal_fwd_kernel", 90, "fp32", 64),
)
# the pola map's launches (kernels.linear_attention.pola_attention_triton): model head dims d, each sweep on
# 2d-wide features with d/2 value channels through the relu kernels; fp32 only at d = 32 (fp32 at width 128
# takes 1-1.5 min per kernel)
POLA_CASES = (("bf16", 32), ("bf16", 64), ("fp32", 32))


def cases(grid: str = "ci") -> list[Case]:
    """The launchable cases of one grid.

    full: every kernel × sm_80/sm_90 × fp32/bf16/fp16 × head dim 32/64/80/96/128 × feature map ×
    ROWSUM_DEN × CHUNKED (2280 compiles). pola: every kernel on sm_90 as the pola map launches it
    (`POLA_CASES`: head dim 2d, value dim d/2, relu map) in its largest variant. worst: per kernel × arch × dtype × head dim only the
    variant with the most live tiles (focused map, ROWSUM_DEN, CHUNKED), bf16 d64 first. ci: every
    kernel × sm_80/sm_90 at the presets' case (bf16, head dim 64) in its largest variant, every
    switch of every kernel on sm_90, and `CI_EXTREMES` (the closest to the shared-memory limits).
    """
    from kernels.linear_attention import KERNELS

    out = []
    if grid == "full":
        for kernel, arch in itertools.product(KERNELS, ARCHS):
            for dtype, dim, fmap, (rowsum, chunked) in itertools.product(DTYPES, HEAD_DIMS, FEATURE_MAPS, _switches(kernel)):
                out.append(Case(kernel, arch, dtype, dim, fmap, rowsum, chunked))
    elif grid == "worst":
        order = sorted(itertools.product(DTYPES, HEAD_DIMS), key=lambda p: p != ("bf16", 64))
        for (dtype, dim), kernel, arch in itertools.product(order, KERNELS, ARCHS):
            out.append(Case(kernel, arch, dtype, dim, "focused", *list(_switches(kernel))[-1]))
    elif grid == "pola":
        from kernels.linear_attention import PROXY_MAP

        for (dtype, dim), kernel in itertools.product(POLA_CASES, KERNELS):
            out.append(Case(kernel, 90, dtype, 2 * dim, PROXY_MAP, *list(_switches(kernel))[-1], value_dim=dim // 2))
    elif grid == "ci":
        for kernel, arch in itertools.product(KERNELS, ARCHS):
            switches = list(_switches(kernel))
            out.append(Case(kernel, arch, "bf16", 64, "focused", *switches[-1]))
            if arch == 90:
                out += [Case(kernel, arch, "bf16", 64, "affine", *sw) for sw in switches[:-1]]
        for kernel, arch, dtype, dim in CI_EXTREMES:
            out.append(Case(kernel, arch, dtype, dim, "focused", *list(_switches(kernel))[-1]))
    else:
        raise ValueError(f"unknown grid '{grid}' (known: ci, worst, full, pola)")
    return out


def _signature(fn, constexprs: dict, io_type: str, acc_type: str) -> tuple[dict, dict]:
    """Argument types as the launcher's tensors/ints give them, and the 16-divisibility the JIT
    would specialise on (torch allocations are 16-byte aligned; strides of d in 16s are multiples of 16)."""
    signature, attrs = {}, {}
    for index, name in enumerate(fn.arg_names):
        if name in constexprs:
            signature[name] = "constexpr"
        elif name in _INT_SCALARS:
            signature[name] = "i32"
        elif name == "eps":
            signature[name] = "fp32"
        elif name[0].isupper():
            signature[name] = "*" + (io_type if name in _IO_POINTERS else acc_type)
            attrs[(index,)] = [["tt.divisibility", 16]]
        else:  # strides
            signature[name] = "i32"
            attrs[(index,)] = [["tt.divisibility", 16]]
    return signature, attrs


_PTXAS_REGS = re.compile(r"Used (\d+) registers")
_PTXAS_SPILLS = re.compile(r"(\d+) bytes spill stores, (\d+) bytes spill loads")


def _parse_ptxas(log: str) -> dict:
    regs = [int(m) for m in _PTXAS_REGS.findall(log)]
    spills = [(int(a), int(b)) for a, b in _PTXAS_SPILLS.findall(log)]
    if not regs:
        raise RuntimeError(f"no register count in the ptxas log:\n{log[-2000:]}")
    return {"registers": regs[-1], "spill_stores": spills[-1][0] if spills else 0,
            "spill_loads": spills[-1][1] if spills else 0}


def _ptxas_rerun(ptx: str, arch: int) -> dict:
    from triton.backends.nvidia.compiler import get_ptxas

    with tempfile.TemporaryDirectory() as tmp:
        src = Path(tmp, "kernel.ptx")
        src.write_text(ptx)
        result = subprocess.run([get_ptxas(arch).path, "-v", "--regAllocOptLevel=2", f"--gpu-name=sm_{arch}a" if arch == 90
                                 else f"--gpu-name=sm_{arch}", str(src), "-o", str(Path(tmp, "kernel.o"))],
                                capture_output=True, text=True, check=True)
    return _parse_ptxas(result.stderr + result.stdout)


def _sidecar(hash_: str) -> Path:
    return Path(os.environ["TRITON_CACHE_DIR"], "ds_linclip_ptxas", f"{hash_}.json")


def compile_case(case: Case) -> dict:
    """Compile one case for its target; returns the case, launch config and the resource report."""
    import triton
    from triton import knobs
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    from kernels.linear_attention import SHARED_MEMORY_LIMITS, _kernel_module, kernel_constexprs

    dtype = DTYPES[case.dtype]
    module = _kernel_module(False)
    fn = getattr(module, case.kernel)
    constexprs, options = kernel_constexprs(case.kernel, dtype, case.head_dim, case.values, case.feature_map,
                                            case.rowsum_den, 3.0, case.chunked, case.arch)
    signature, attrs = _signature(fn, constexprs, case.dtype, "fp32")
    started = time.perf_counter()
    log = io.StringIO()
    dump_before = knobs.nvidia.dump_ptxas_log
    knobs.nvidia.dump_ptxas_log = True  # triton prints ptxas -v output on a fresh compile
    try:
        with contextlib.redirect_stdout(log):
            kernel = triton.compile(ASTSource(fn, signature, constexprs, attrs),
                                    target=GPUTarget("cuda", case.arch, 32), options=options)
    finally:
        knobs.nvidia.dump_ptxas_log = dump_before
    seconds = time.perf_counter() - started
    sidecar = _sidecar(kernel.metadata.hash)
    if sidecar.exists():
        resources = json.loads(sidecar.read_text())
    else:
        text = log.getvalue()
        resources = _parse_ptxas(text) if _PTXAS_REGS.search(text) else _ptxas_rerun(kernel.asm["ptx"], case.arch)
        sidecar.parent.mkdir(parents=True, exist_ok=True)
        tmp = sidecar.with_suffix(f".tmp{os.getpid()}")
        tmp.write_text(json.dumps(resources))
        os.replace(tmp, sidecar)  # atomic: parallel runs may race here
    return {
        **asdict(case), "id": case.id, "config": {"BLOCK_N": constexprs["BLOCK_N"], **options},
        "shared": kernel.metadata.shared, "shared_limit": SHARED_MEMORY_LIMITS[case.arch],
        "cubin_bytes": len(kernel.asm.get("cubin", b"")), **resources, "seconds": round(seconds, 2),
    }


def compile_all(selected: list[Case], jobs: int = 2, progress: bool = False) -> list[dict]:
    """Compile cases in `jobs` processes (ptxas and LLVM hold the GIL-free part; stdout capture needs processes)."""
    import multiprocessing

    results = []
    with contextlib.ExitStack() as stack:
        if jobs <= 1:
            stream = map(compile_case, selected)
        else:
            pool = stack.enter_context(ProcessPoolExecutor(jobs, mp_context=multiprocessing.get_context("spawn")))
            stream = pool.map(compile_case, selected, chunksize=1)
        for result in stream:  # one JSON line per case on stderr, as they finish (for long grids)
            results.append(result)
            if progress:
                print(json.dumps(result), file=sys.stderr, flush=True)
    return results


def table(results: list[dict]) -> str:
    lines = ["| kernel | sm | dtype | d | map | rowsum | chunked | BLOCK_N | warps | stages | shared KiB (limit) | regs | spill st/ld B |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in results:
        c = r["config"]
        lines.append(
            f"| {r['kernel']} | {r['arch']} | {r['dtype']} | {r['head_dim']} | {r['feature_map']} | {int(r['rowsum_den'])} | "
            f"{int(r['chunked'])} | {c['BLOCK_N']} | {c['num_warps']} | {c['num_stages']} | "
            f"{r['shared'] / 1024:.1f} ({r['shared_limit'] // 1024}) | {r['registers']} | "
            f"{r['spill_stores']}/{r['spill_loads']} |")
    return "\n".join(lines)


def summary(results: list[dict]) -> str:
    """Largest shared memory and registers/spills per kernel for each (arch, dtype, head dim)."""
    groups: dict = {}
    for r in results:
        groups.setdefault((r["kernel"], r["arch"], r["dtype"], r["head_dim"]), []).append(r)
    lines = ["| kernel | sm | dtype | d | max shared KiB (limit) | max regs | max spill st/ld B | BLOCK_N/warps/stages |",
             "|---|---|---|---|---|---|---|---|"]
    for (kernel, arch, dtype, dim), rs in sorted(groups.items()):
        c = rs[0]["config"]
        lines.append(
            f"| {kernel} | {arch} | {dtype} | {dim} | {max(r['shared'] for r in rs) / 1024:.1f} ({rs[0]['shared_limit'] // 1024}) | "
            f"{max(r['registers'] for r in rs)} | {max(r['spill_stores'] for r in rs)}/{max(r['spill_loads'] for r in rs)} | "
            f"{c['BLOCK_N']}/{c['num_warps']}/{c['num_stages']} |")
    return "\n".join(lines)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--grid", default="ci", choices=("ci", "worst", "full", "pola"))
    parser.add_argument("--jobs", type=int, default=2)
    parser.add_argument("--kernel", default=None, help="only kernels whose name contains this")
    parser.add_argument("--out", type=Path, default=None, help="also write the tables (markdown) and a .json here")
    args = parser.parse_args(argv)
    selected = [c for c in cases(args.grid) if args.kernel is None or args.kernel in c.kernel]
    started = time.perf_counter()
    results = compile_all(selected, args.jobs, progress=True)
    elapsed = time.perf_counter() - started
    over = [r for r in results if r["shared"] > r["shared_limit"] or not r["cubin_bytes"]]
    text = (f"{len(results)} cases ({args.grid} grid) compiled in {elapsed:.0f} s; {len(over)} do not fit\n\n"
            f"## per kernel, arch, dtype, head dim\n\n{summary(results)}\n\n## every case\n\n{table(results)}\n")
    print(text)
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(text)
        args.out.with_suffix(".json").write_text(json.dumps(results, indent=1))
    return 1 if over else 0


if __name__ == "__main__":
    sys.exit(main())
