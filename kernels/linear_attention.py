"""Fused Triton linear attention: autograd wrapper and launchers (device code: kernels/_triton_kernels.py).

Forward, bidirectional: one pass over K, V builds Σ φk vᵀ, Σ φk, Σ v per (batch, head) with φ
(L2 normalisation / elu+1 / relu) applied in registers, then a second pass writes the outputs.
Causal: chunks of BLOCK_N tokens, masked intra-chunk product plus the running state.
Backward recomputes φ and the outputs; it saves only q, k, v, the d×d state (bidirectional)
and, inside the causal backward, two O(N) row statistics (denominator and dO·O/den).

CPU tensors run through Triton's interpreter; CUDA tensors through compiled kernels unless
TRITON_INTERPRET=1 is set. See `_kernel_module` for why the env var need not be set by callers.
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


KIND_CODES = {"linear-affine": 0, "linear-elu": 1, "linear-relu": 2}
NORM_EPS = 1e-6  # F.normalize's eps in the reference
SUPPORTED_DTYPES = (torch.float32, torch.bfloat16, torch.float16, torch.float64)

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


class _Launch:
    """Shapes, block sizes and compile-time switches shared by the forward and backward launches."""

    def __init__(self, q: torch.Tensor, v: torch.Tensor, kind: str, denominator: str, eps: float):
        self.batch, self.heads, self.tokens, self.dim = q.shape
        self.value_dim = v.shape[-1]
        self.bh = self.batch * self.heads
        self.eps = float(eps)
        self.interpret = _wants_interpreter(q)
        self.module = _kernel_module(self.interpret)
        import triton.language as tl

        self.acc_dtype = torch.float64 if q.dtype == torch.float64 else torch.float32
        self.meta = dict(
            D=self.dim,
            E=self.value_dim,
            KIND=KIND_CODES[kind],
            NORM_EPS=NORM_EPS,
            ACC=tl.float64 if q.dtype == torch.float64 else tl.float32,
            # fp32/fp64 inputs get exact dots; half-precision inputs already carry < tf32 mantissa
            PRECISION="ieee" if q.dtype in (torch.float32, torch.float64) else "tf32",
            BLOCK_N=64,
            BLOCK_D=_block(self.dim),
            BLOCK_E=_block(self.value_dim),
        )
        # the denominator depends on the keys unless it is the plain token count (affine, count)
        self.rowsum_den = not (kind == "linear-affine" and denominator == "count")
        # every kernel but the state passes needs an even split of work; splits fill the GPU
        blocks = -(-self.tokens // self.meta["BLOCK_N"])
        if self.interpret:
            splits = 1  # interpreter: fewer programs is faster
        else:
            sms = _multiprocessors(q.device.index if q.device.index is not None else torch.cuda.current_device())
            splits = max(1, min(blocks, -(-4 * sms // self.bh)))
        blocks_per_split = -(-blocks // splits)
        self.tokens_per_split = blocks_per_split * self.meta["BLOCK_N"]
        self.splits = -(-self.tokens // self.tokens_per_split)
        self.blocks = blocks
        # GPU only (the interpreter ignores them): the streaming kernels hold ~3 tiles, the causal
        # and backward ones ~10 (BLOCK_N x BLOCK_D fp32 each); more warps keep those in registers.
        # Untuned guesses for H100/H200 (no GPU was available while writing this).
        wide = self.meta["BLOCK_D"] > 64 or self.meta["BLOCK_E"] > 64
        self.light = {} if self.interpret else {"num_warps": 8 if wide else 4}
        self.heavy = {} if self.interpret else {"num_warps": 8}

    def state_buffers(self, device: torch.device, splits: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        bd, be = self.meta["BLOCK_D"], self.meta["BLOCK_E"]
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


def _forward(q, k, v, launch: _Launch, causal: bool):
    m = launch.module
    out = torch.empty(q.shape[:-1] + (launch.value_dim,), device=q.device, dtype=v.dtype)
    if causal:
        m._causal_fwd_kernel[(launch.bh,)](
            q, k, v, out, launch.heads, launch.tokens, launch.eps,
            *_strides(q), *_strides(k), *_strides(v), *_strides(out),
            ROWSUM_DEN=launch.rowsum_den, **launch.meta, **launch.heavy)
        return out, ()
    s_part, z_part, sv_part = launch.state_buffers(q.device, launch.splits)
    m._bidir_state_kernel[(launch.bh, launch.splits)](
        k, v, s_part, z_part, sv_part, launch.heads, launch.tokens, launch.tokens_per_split,
        *_strides(k), *_strides(v), **launch.meta, **launch.light)
    state, key_sum, value_sum = (t.sum(1) if launch.splits > 1 else t[:, 0].contiguous() for t in (s_part, z_part, sv_part))
    m._bidir_out_kernel[(launch.bh, launch.blocks)](
        q, state, key_sum, value_sum, out, launch.heads, launch.tokens, launch.eps,
        *_strides(q), *_strides(out), ROWSUM_DEN=launch.rowsum_den, **launch.meta, **launch.light)
    return out, (state, key_sum, value_sum)


def _backward(q, k, v, grad_out, saved_state, launch: _Launch, causal: bool):
    m = launch.module
    dq, dk, dv = torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)
    if causal:
        den = torch.empty(launch.bh, launch.tokens, device=q.device, dtype=launch.acc_dtype)
        r = torch.empty_like(den)
        m._causal_bwd_query_kernel[(launch.bh,)](
            q, k, v, grad_out, dq, den, r, launch.heads, launch.tokens, launch.eps,
            *_strides(q), *_strides(k), *_strides(v), *_strides(grad_out), *_strides(dq),
            ROWSUM_DEN=launch.rowsum_den, **launch.meta, **launch.heavy)
        m._causal_bwd_key_kernel[(launch.bh,)](
            q, k, v, grad_out, den, r, dk, dv, launch.heads, launch.tokens,
            *_strides(q), *_strides(k), *_strides(v), *_strides(grad_out), *_strides(dk), *_strides(dv),
            ROWSUM_DEN=launch.rowsum_den, **launch.meta, **launch.heavy)
        return dq, dk, dv
    state, key_sum, value_sum = saved_state
    ds_part, dz_part, dsv_part = launch.state_buffers(q.device, launch.splits)
    m._bidir_bwd_query_kernel[(launch.bh, launch.splits)](
        q, grad_out, state, key_sum, value_sum, dq, ds_part, dz_part, dsv_part,
        launch.heads, launch.tokens, launch.tokens_per_split, launch.eps,
        *_strides(q), *_strides(grad_out), *_strides(dq),
        ROWSUM_DEN=launch.rowsum_den, **launch.meta, **launch.heavy)
    d_state, d_key_sum, d_value_sum = (
        t.sum(1) if launch.splits > 1 else t[:, 0].contiguous() for t in (ds_part, dz_part, dsv_part))
    m._bidir_bwd_key_kernel[(launch.bh, launch.blocks)](
        k, v, d_state, d_key_sum, d_value_sum, dk, dv, launch.heads, launch.tokens,
        *_strides(k), *_strides(v), *_strides(dk), *_strides(dv), **launch.meta, **launch.heavy)
    return dq, dk, dv


class LinearAttentionTriton(torch.autograd.Function):
    """Autograd wrapper around the Triton kernels; non-tensor arguments get no gradient."""

    @staticmethod
    def forward(ctx, q, k, v, kind: str, causal: bool, denominator: str, eps: float):
        q, k, v = (_rows_contiguous(t) for t in (q, k, v))
        launch = _Launch(q, v, kind, denominator, eps)
        with _launch_env(launch):
            out, state = _forward(q, k, v, launch, causal)
        ctx.save_for_backward(q, k, v, *state)
        ctx.launch, ctx.causal = launch, causal
        return out

    @staticmethod
    def backward(ctx, grad_out):
        q, k, v, *state = ctx.saved_tensors
        grad_out = _rows_contiguous(grad_out)
        with _launch_env(ctx.launch):
            dq, dk, dv = _backward(q, k, v, grad_out, state, ctx.launch, ctx.causal)
        return dq, dk, dv, None, None, None, None


def linear_attention_triton(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    feature_map: str = "affine",
    denominator: str = "count",
    causal: bool = False,
    scale: torch.Tensor | None = None,
    power: float = 3.0,
    eps: float = 1e-6,
) -> torch.Tensor:
    """Linear attention through the fused Triton kernels (arguments checked by `kernels.linear_attention`).

    q, k: (batch, heads, tokens, head_dim); v: (batch, heads, tokens, value_dim); same dtype
    (fp32, bf16, fp16 or fp64) and device. Returns (batch, heads, tokens, value_dim) in v's dtype.
    Any token count >= 1; head dims are padded to a power of two (>= 16) inside the kernels.
    """
    kind = {"affine": "linear-affine", "elu": "linear-elu", "relu": "linear-relu"}.get(feature_map)
    if kind is None or (kind != "linear-affine" and denominator == "count"):
        raise NotImplementedError(f"the Triton kernels do not run feature map '{feature_map}' with denominator '{denominator}' yet")
    if not (q.dtype == k.dtype == v.dtype) or q.dtype not in SUPPORTED_DTYPES:
        raise TypeError(f"q, k, v must share one of {SUPPORTED_DTYPES}; got {q.dtype}, {k.dtype}, {v.dtype}")
    if q.shape[2] == 0 or q.shape[0] * q.shape[1] == 0:
        return v.new_zeros(v.shape)
    return LinearAttentionTriton.apply(q, k, v, kind, causal, denominator, eps)


__all__ = ["linear_attention_triton", "LinearAttentionTriton"]
