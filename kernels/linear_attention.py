"""Fused Triton linear attention: autograd wrapper and launchers (device code: kernels/_triton_kernels.py).

Forward, bidirectional: one pass over K, V builds Σ φk vᵀ, Σ φk, Σ v per (batch, head) with φ
(affine / focused / elu+1 / relu) applied in registers, then a second pass writes the outputs.
Causal: chunks of BLOCK_N tokens, masked intra-chunk product plus the running state; one program
per (batch, head) for short inputs, chunk-parallel (range states in parallel, a prefix sum on the
host, then every range in parallel; the backward likewise with suffix sums of reverse states) for
long ones (`CHUNKED_MIN_TOKENS`).
Backward recomputes φ and the outputs; it saves only q, k, v, the d×d state(s) and, inside the
causal backward, two O(N) row statistics (denominator and dO·O/den). The focused map's scale
gradient is computed here from dq, dk (see `_scale_grad`).

CPU tensors run through Triton's interpreter; CUDA tensors through compiled kernels unless
TRITON_INTERPRET=1 is set. See `_kernel_module` for why the env var need not be set by callers.
Launch parameters (BLOCK_N, num_warps, num_stages) come from one function, `launch_config`, which
tests/test_kernels_compile.py also uses to compile every launchable case for sm_80 and sm_90.
"""

from __future__ import annotations

import contextlib
import functools
import importlib.util
import os
import sys
import threading
from pathlib import Path
from types import ModuleType

import torch

from kernels.options import LinearOptions, linear_backend
from kernels.reference import FEATURE_MAPS, NORM_EPS, polarity_attention

# the kernels' KIND constexpr: 0 affine, 1 focused, 2 elu, 3 relu (FEATURE_MAPS' order)
FEATURE_CODES = {feature_map: code for code, feature_map in enumerate(FEATURE_MAPS)}
SUPPORTED_DTYPES = (torch.float32, torch.bfloat16, torch.float16, torch.float64)
# causal inputs at least this long run chunk-parallel (below: one program per (batch, head))
CHUNKED_MIN_TOKENS = 1024
# token ranges are multiples of this (every kernel's BLOCK_N divides it)
RANGE_QUANTUM = 64
# the interpreter runs programs one after another: its chunked ranges are this long, and its
# blocks this tall (its cost is per block; the GPU's smaller BLOCK_N made the CPU tests ~3x slower).
# None: launch_config's (tests/test_kernels_triton.py runs some cases so).
INTERPRETED_RANGE_TOKENS = 256
INTERPRETED_BLOCK_N = 64

_KERNEL_SOURCE = Path(__file__).with_name("_triton_kernels.py")
_modules: dict[bool, ModuleType] = {}
_modules_lock = threading.Lock()


@contextlib.contextmanager
def _interpreter_env(interpret: bool):
    """TRITON_INTERPRET set to `interpret` for the duration (triton reads it through triton.knobs).

    Needed while decorating (see `_kernel_module`) and while launching interpreted kernels:
    triton's launcher asserts the knob agrees with how triton.language.standard was decorated.
    """
    import triton

    previous = os.environ.get("TRITON_INTERPRET")
    forced = triton.knobs.runtime.__dict__.pop("interpret", None)  # a programmatic override, if any
    os.environ["TRITON_INTERPRET"] = "1" if interpret else "0"
    try:
        yield
    finally:
        if previous is None:
            os.environ.pop("TRITON_INTERPRET", None)
        else:
            os.environ["TRITON_INTERPRET"] = previous
        if forced is not None:
            triton.knobs.runtime.__dict__["interpret"] = forced


def _kernel_module(interpret: bool) -> ModuleType:
    """The Triton kernels, decorated either for the interpreter or for compilation.

    `triton.jit` decides between JITFunction and InterpretedFunction from TRITON_INTERPRET at
    decoration time, and kernels resolve their helper functions through module globals. Loading
    the kernel file once per mode (with the variable set accordingly while it executes) gives each
    mode a self-consistent set of kernels and helpers, independent of import order: a test suite
    in one process can run interpreted kernels on CPU tensors whatever imported triton first.
    """
    with _modules_lock:
        if interpret in _modules:
            return _modules[interpret]
        name = f"kernels._triton_kernels_{'interpreted' if interpret else 'compiled'}"
        spec = importlib.util.spec_from_file_location(name, _KERNEL_SOURCE)
        module = importlib.util.module_from_spec(spec)
        with _interpreter_env(interpret):
            sys.modules[name] = module
            spec.loader.exec_module(module)
        from triton.runtime.interpreter import InterpretedFunction

        if isinstance(module._bidir_out_kernel, InterpretedFunction) != interpret:
            raise RuntimeError(f"triton did not honour TRITON_INTERPRET={int(interpret)} while loading {_KERNEL_SOURCE}")
        _modules[interpret] = module
        return module


def _wants_interpreter(tensor: torch.Tensor) -> bool:
    if not tensor.is_cuda:
        return True
    return os.environ.get("TRITON_INTERPRET", "0").lower() in ("1", "true", "on", "yes")


def _block(size: int) -> int:
    return max(16, 1 << (size - 1).bit_length())


KERNELS = (
    "_bidir_state_kernel", "_bidir_out_kernel", "_bidir_bwd_query_kernel", "_bidir_bwd_key_kernel",
    "_causal_fwd_kernel", "_causal_bwd_query_kernel", "_causal_reverse_state_kernel", "_causal_bwd_key_kernel",
)
# the streaming kernels hold ~3 (BLOCK_N, BLOCK_D) tiles; the others ~10
_LIGHT_KERNELS = ("_bidir_state_kernel", "_bidir_out_kernel", "_causal_reverse_state_kernel")
# kernels without the ROWSUM_DEN / CHUNKED switches
_NO_ROWSUM_SWITCH = ("_bidir_state_kernel", "_bidir_bwd_key_kernel", "_causal_reverse_state_kernel")
# kernels with a CHUNKED constexpr (the chunk-parallel causal form)
_CHUNKED_SWITCH = ("_causal_fwd_kernel", "_causal_bwd_query_kernel", "_causal_bwd_key_kernel")
# dynamic shared memory one block may use (opt-in maximum), bytes: A100, H100/H200
SHARED_MEMORY_LIMITS = {80: 163 * 1024, 90: 227 * 1024}


def launch_config(kernel: str, dtype: torch.dtype, head_dim: int, value_dim: int, arch: int = 90) -> dict:
    """BLOCK_N, num_warps, num_stages of one kernel launch: the one place they are chosen.

    arch: compute capability as 10*major + minor (80 = A100, 90 = H100/H200). The choice does not
    depend on it yet: these fit both targets' shared memory; arch is here so a target can get its own.
    Chosen from compile sweeps for sm_80 and sm_90 without a GPU (tests/test_kernels_compile.py,
    bench/kernel_compile.py: shared memory, registers, spills), not yet timed on a GPU.
    Half-precision inputs use tensor-core dots whose accumulators and operands live in registers:
    the causal kernels (~12 live (BLOCK_N, width) tiles plus the d×d state in two operand layouts)
    stop spilling on sm_90 at width 64 only with 16 rows and 8 warps. fp32/fp64 inputs use exact
    FMA dots (no tensor cores): 16 rows and one stage keep them inside shared memory; past width 64
    (padded to 128) ptxas still spills kilobytes.
    """
    width = max(_block(head_dim), _block(value_dim))
    half = dtype in (torch.bfloat16, torch.float16)
    light = kernel in _LIGHT_KERNELS
    if half:
        if light:
            return {"BLOCK_N": 64 if width <= 64 else 32, "num_warps": 4 if width <= 32 else 8, "num_stages": 2}
        if kernel.startswith("_causal"):  # ~12 live tiles plus the d×d state in two operand layouts
            block_n = 32 if width <= 32 and kernel != "_causal_bwd_key_kernel" else 16
            return {"BLOCK_N": block_n, "num_warps": 8, "num_stages": 2}
        block_n = {16: 64, 32: 64, 64: 32}.get(width, 16)
        return {"BLOCK_N": block_n, "num_warps": 4 if width <= 32 else 8, "num_stages": 2}
    if light:
        return {"BLOCK_N": 32 if width <= 64 else 16, "num_warps": 4 if width <= 32 else 8, "num_stages": 2}
    if kernel.startswith("_causal"):
        return {"BLOCK_N": 16, "num_warps": 8, "num_stages": 1}
    return {"BLOCK_N": 32 if width <= 32 else 16, "num_warps": 4 if width <= 32 else 8, "num_stages": 1}


def kernel_constexprs(
    kernel: str, dtype: torch.dtype, head_dim: int, value_dim: int, feature_map: str, rowsum_den: bool,
    power: float, chunked: bool, arch: int = 90,
) -> tuple[dict, dict]:
    """(constexpr arguments, launch options) of one kernel launch, exactly as the launcher passes them."""
    import triton.language as tl

    config = launch_config(kernel, dtype, head_dim, value_dim, arch)
    wide = dtype == torch.float64
    meta = dict(
        D=head_dim,
        E=value_dim,
        KIND=FEATURE_CODES[feature_map],
        # other maps ignore the power: one compiled kernel for them, whatever the caller passes
        POWER=float(power) if feature_map == "focused" else 1.0,
        NORM_EPS=NORM_EPS,
        ACC=tl.float64 if wide else tl.float32,
        # fp32/fp64 inputs get exact dots; half-precision inputs already carry < tf32 mantissa
        PRECISION="ieee" if dtype in (torch.float32, torch.float64) else "tf32",
        BLOCK_N=config["BLOCK_N"],
        BLOCK_D=_block(head_dim),
        BLOCK_E=_block(value_dim),
    )
    if kernel not in _NO_ROWSUM_SWITCH:
        meta["ROWSUM_DEN"] = rowsum_den
    if kernel in _CHUNKED_SWITCH:
        meta["CHUNKED"] = chunked
    options = {"num_warps": config["num_warps"], "num_stages": config["num_stages"]}
    return meta, options


class _Launch:
    """Shapes, token ranges and compile-time switches shared by the forward and backward launches."""

    def __init__(self, q, v, feature_map: str, denominator: str, causal: bool, power: float, eps: float):
        self.batch, self.heads, self.tokens, self.dim = q.shape
        self.value_dim = v.shape[-1]
        self.bh = self.batch * self.heads
        self.eps = float(eps)
        self.causal = causal
        self.interpret = _wants_interpreter(q)
        self.module = _kernel_module(self.interpret)
        self.acc_dtype = torch.float64 if q.dtype == torch.float64 else torch.float32
        self.rowsum_den = denominator == "kernel"
        if self.interpret:
            self.arch = 90  # the interpreter ignores warps/stages; run the H100 block sizes
        else:
            major, minor = torch.cuda.get_device_capability(q.device)
            self.arch = 10 * major + minor
        blocks = -(-self.tokens // RANGE_QUANTUM)
        self.chunked = causal and self.tokens >= CHUNKED_MIN_TOKENS
        if self.interpret:
            # fewer programs is faster; long causal inputs still take the chunk-parallel path
            splits = -(-self.tokens // INTERPRETED_RANGE_TOKENS) if self.chunked else 1
        elif causal and not self.chunked:
            splits = 1
        else:
            sms = _multiprocessors(q.device.index if q.device.index is not None else torch.cuda.current_device())
            splits = max(1, min(blocks, -(-4 * sms // self.bh)))
        self.tokens_per_split = -(-blocks // splits) * RANGE_QUANTUM
        self.splits = -(-self.tokens // self.tokens_per_split)
        self.chunked = self.chunked and self.splits > 1
        self.constexprs, self.options = {}, {}
        for kernel in KERNELS:
            meta, options = kernel_constexprs(kernel, q.dtype, self.dim, self.value_dim, feature_map,
                                              self.rowsum_den, power, self.chunked, self.arch)
            if self.interpret and INTERPRETED_BLOCK_N is not None:
                meta["BLOCK_N"] = INTERPRETED_BLOCK_N
            self.constexprs[kernel] = meta
            self.options[kernel] = {} if self.interpret else options

    def launch(self, kernel: str, grid, *args):
        getattr(self.module, kernel)[grid](*args, **self.constexprs[kernel], **self.options[kernel])

    def blocks(self, kernel: str) -> int:
        return -(-self.tokens // self.constexprs[kernel]["BLOCK_N"])

    def state_buffers(self, device: torch.device, splits: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        bd, be = _block(self.dim), _block(self.value_dim)
        return (
            torch.empty(self.bh, splits, bd, be, device=device, dtype=self.acc_dtype),
            torch.empty(self.bh, splits, bd, device=device, dtype=self.acc_dtype),
            torch.empty(self.bh, splits, be, device=device, dtype=self.acc_dtype),
        )


@functools.lru_cache(maxsize=None)
def _multiprocessors(device_index: int) -> int:
    return torch.cuda.get_device_properties(device_index).multi_processor_count


def _launch_env(launch: _Launch):
    return _interpreter_env(True) if launch.interpret else contextlib.nullcontext()


def _strides(t: torch.Tensor) -> tuple[int, int, int]:
    return t.stride(0), t.stride(1), t.stride(2)


def _rows_contiguous(t: torch.Tensor) -> torch.Tensor:
    """Kernels index (batch, heads, tokens) by stride and need unit stride along head_dim only."""
    return t if t.stride(-1) == 1 else t.contiguous()


def _reduce_splits(parts):
    return tuple(t.sum(1) if t.shape[1] > 1 else t[:, 0].contiguous() for t in parts)


def _forward(q, k, v, scale, launch: _Launch):
    out = torch.empty(q.shape[:-1] + (launch.value_dim,), device=q.device, dtype=v.dtype)
    bh, heads, tokens, tps = launch.bh, launch.heads, launch.tokens, launch.tokens_per_split
    if launch.causal:
        if launch.chunked:
            parts = launch.state_buffers(q.device, launch.splits)
            launch.launch("_bidir_state_kernel", (bh, launch.splits), k, v, scale, *parts, heads, tokens, tps,
                          *_strides(k), *_strides(v))
            # exclusive prefix over the ranges: the state of every token before each range
            prefix = tuple(t.cumsum(1) - t for t in parts)
        else:
            prefix = (scale,) * 3  # unused (CHUNKED is false)
        launch.launch("_causal_fwd_kernel", (bh, launch.splits), q, k, v, scale, *prefix, out, heads, tokens, tps,
                      launch.eps, *_strides(q), *_strides(k), *_strides(v), *_strides(out))
        return out, prefix if launch.chunked else ()
    parts = launch.state_buffers(q.device, launch.splits)
    launch.launch("_bidir_state_kernel", (bh, launch.splits), k, v, scale, *parts, heads, tokens, tps,
                  *_strides(k), *_strides(v))
    state = _reduce_splits(parts)
    launch.launch("_bidir_out_kernel", (bh, launch.blocks("_bidir_out_kernel")), q, scale, *state, out,
                  heads, tokens, launch.eps, *_strides(q), *_strides(out))
    return out, state


def _backward(q, k, v, scale, grad_out, saved_state, launch: _Launch):
    dq, dk, dv = torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)
    bh, heads, tokens, tps = launch.bh, launch.heads, launch.tokens, launch.tokens_per_split
    if launch.causal:
        den = torch.empty(bh, tokens, device=q.device, dtype=launch.acc_dtype)
        r = torch.empty_like(den)
        prefix = saved_state if launch.chunked else (scale,) * 3  # unused unless CHUNKED
        launch.launch("_causal_bwd_query_kernel", (bh, launch.splits), q, k, v, grad_out, scale, *prefix, dq, den, r,
                      heads, tokens, tps, launch.eps,
                      *_strides(q), *_strides(k), *_strides(v), *_strides(grad_out), *_strides(dq))
        if launch.chunked:
            rev_parts = launch.state_buffers(q.device, launch.splits)
            launch.launch("_causal_reverse_state_kernel", (bh, launch.splits), q, grad_out, scale, den, r, *rev_parts,
                          heads, tokens, tps, *_strides(q), *_strides(grad_out))
            # exclusive suffix over the ranges: the reverse sums of every token after each range
            suffix = tuple(t.flip(1).cumsum(1).flip(1) - t for t in rev_parts)
        else:
            suffix = (scale,) * 3  # unused (CHUNKED is false)
        launch.launch("_causal_bwd_key_kernel", (bh, launch.splits), q, k, v, grad_out, scale, den, r, *suffix, dk, dv,
                      heads, tokens, tps, *_strides(q), *_strides(k), *_strides(v), *_strides(grad_out),
                      *_strides(dk), *_strides(dv))
        return dq, dk, dv
    d_parts = launch.state_buffers(q.device, launch.splits)
    launch.launch("_bidir_bwd_query_kernel", (bh, launch.splits), q, grad_out, scale, *saved_state, dq, *d_parts,
                  heads, tokens, tps, launch.eps, *_strides(q), *_strides(grad_out), *_strides(dq))
    d_state = _reduce_splits(d_parts)
    launch.launch("_bidir_bwd_key_kernel", (bh, launch.blocks("_bidir_bwd_key_kernel")), k, v, scale, *d_state, dk, dv,
                  heads, tokens, *_strides(k), *_strides(v), *_strides(dk), *_strides(dv))
    return dq, dk, dv


def _scale_grad(q, k, dq, dk, scale) -> torch.Tensor:
    """dL/ds of the focused map from the gradients w.r.t. the raw q, k: φ depends on x only through
    y = relu(x)/s, so s·dL/ds = -Σ_{batch, tokens} x·dL/dx (q and k share s). (heads, head_dim)."""
    acc = torch.float64 if q.dtype == torch.float64 else torch.float32
    total = (dq.to(acc) * q.to(acc)).sum((0, 2)) + (dk.to(acc) * k.to(acc)).sum((0, 2))
    return (-total / scale.to(acc)).to(scale.dtype)


class LinearAttentionTriton(torch.autograd.Function):
    """Autograd wrapper around the Triton kernels; non-tensor arguments get no gradient."""

    @staticmethod
    def forward(ctx, q, k, v, scale, feature_map: str, denominator: str, causal: bool, power: float, eps: float):
        q, k, v = (_rows_contiguous(t) for t in (q, k, v))
        launch = _Launch(q, v, feature_map, denominator, causal, power, eps)
        if scale is None:
            kernel_scale = torch.ones(1, device=q.device, dtype=launch.acc_dtype)  # never read
        else:
            kernel_scale = scale.detach().to(launch.acc_dtype).contiguous()
        with _launch_env(launch):
            out, state = _forward(q, k, v, kernel_scale, launch)
        ctx.save_for_backward(q, k, v, kernel_scale, *state)
        ctx.launch, ctx.scale_spec = launch, None if scale is None else (scale.dtype,)
        return out

    @staticmethod
    def backward(ctx, grad_out):
        q, k, v, kernel_scale, *state = ctx.saved_tensors
        grad_out = _rows_contiguous(grad_out)
        with _launch_env(ctx.launch):
            dq, dk, dv = _backward(q, k, v, kernel_scale, grad_out, state, ctx.launch)
        d_scale = None
        if ctx.scale_spec is not None and ctx.needs_input_grad[3]:
            d_scale = _scale_grad(q, k, dq, dk, kernel_scale).to(ctx.scale_spec[0])
        return dq, dk, dv, d_scale, None, None, None, None, None


# TorchDynamo must not trace into the launchers (host-side Python around triton.jit kernels, the
# interpreter on CPU): under torch.compile this call stays opaque, a graph break around the kernels.
# torch.compiler.disable imports TorchDynamo where it decorates (~1.3 s), in every process that imports
# the kernels: each CLI start (--help, --check), each eval job. torch's own lazy form of it (what torch
# uses inside torch; Dynamo treats it as a graph break) imports Dynamo at the first call instead.
_disable_dynamo = getattr(torch, "_disable_dynamo", torch.compiler.disable)


@_disable_dynamo
@linear_backend
def linear_attention_triton(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, options: LinearOptions
) -> torch.Tensor:
    """Linear attention through the fused Triton kernels (arguments checked by `kernels.linear_attention`).

    q, k: (batch, heads, tokens, head_dim); v: (batch, heads, tokens, value_dim); same dtype
    (fp32, bf16, fp16 or fp64) and device. scale: (heads, head_dim), the focused map's s (may
    require grad). Returns (batch, heads, tokens, value_dim) in v's dtype. Any token count >= 1;
    head dims are padded to a power of two (>= 16) inside the kernels.
    """
    if not (q.dtype == k.dtype == v.dtype) or q.dtype not in SUPPORTED_DTYPES:
        raise TypeError(f"q, k, v must share one of {SUPPORTED_DTYPES}; got {q.dtype}, {k.dtype}, {v.dtype}")
    if q.shape[2] == 0 or q.shape[0] * q.shape[1] == 0:
        return v.new_zeros(v.shape)
    return LinearAttentionTriton.apply(q, k, v, options.scale, options.feature_map, options.denominator, options.causal,
                                       float(options.power), float(options.eps))


# The pola map's features are non-negative, so the kernels above run it exactly on features materialised
# in torch: the `relu` map (φ = max(x, 0), no scale, no power) is the identity on them, and the normaliser
# (`kernel` or `count`, no affine "1 +") is the tower's. Autograd carries the gradients of q, k, the scale
# and the raw power through `polarity_features`; the kernels' own backward gives those of the features and v.
# relu's gradient (dx = dφ where x > 0, else 0; 0 at exactly 0) drops dφ only where a feature is exactly 0.
# Where ±x/s <= 0 the feature's own derivative is 0 too (relu' = 0 there; torch's pow backward gives 0 at
# base 0 for the base and for the exponent), so the result is unchanged. The only other zeros are y^p
# underflowed for 0 < y = ±x/s < tiny^(1/p) (fp32: y < 1e-9 at p = 5, ~1e-45 as p -> 1), where torch would
# pass p·y^(p-1)·dφ on: inputs that small are rounding noise around 0, not values attention depends on.
PROXY_MAP = "relu"


@linear_backend
def pola_attention_triton(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, options: LinearOptions) -> torch.Tensor:
    """The pola map (`kernels.reference.polarity_features`) with the `kernel` or `count` normaliser: two
    sweeps of the Triton kernels on 2·head_dim-wide features, value dim E/2 each. q, k (B, H, N, D), v (B, H, N, E),
    options.scale and options.power (H, D) tensors (both may require grad) -> (B, H, N, E)."""
    _, denominator, causal, scale, power, eps = options

    def sweep(phi_q: torch.Tensor, phi_k: torch.Tensor, half: torch.Tensor) -> torch.Tensor:
        # features follow the scale's dtype when it differs from q's (type promotion); the kernels need one dtype
        return linear_attention_triton(phi_q.to(half.dtype), phi_k.to(half.dtype), half, PROXY_MAP, denominator,
                                       causal, eps=eps)

    return polarity_attention(q, k, v, scale, power, sweep)


__all__ = ["linear_attention_triton", "LinearAttentionTriton", "pola_attention_triton", "launch_config",
           "kernel_constexprs", "KERNELS", "PROXY_MAP"]
