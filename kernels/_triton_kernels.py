"""Triton kernels for linear attention (the device code only; the wrapper is kernels/linear_attention.py).

This file is executed twice by `kernels.linear_attention._kernel_module`: once with Triton's
interpreter on (for CPU tensors) and once compiled (for CUDA tensors). `@triton.jit` reads
TRITON_INTERPRET when it decorates, so each copy gets consistent kernels *and* helpers no
matter which test module imported Triton first. Do not import this file directly.

Notation (all per (batch, head); rows are tokens, padded to BLOCK_N, columns padded to BLOCK_D/BLOCK_E):
  φ = feature map (KIND 0: affine = L2 normalise, 1: focused, 2: elu+1, 3: relu)
      focused: y = relu(x)/s (s per (head, channel), loaded from SCALE), φ = ‖y‖·y^p/max(‖y^p‖, eps)
  A_ij = C + φq_i·φk_j  (C = 1 for affine: the "1 +" of the affine kernel, else 0)
  num_i = Σ_j A_ij v_j ,  rowsum_i = Σ_j A_ij  (j over all tokens, or j ≤ i when causal)
  den_i = count_i (denominator=count, ROWSUM_DEN false) | rowsum_i (+ eps unless affine) (kernel)
  out_i = num_i / den_i
Backward (g_i = do_i/den_i, r_i = do_i·out_i/den_i; ROWSUM_DEN: den depends on rowsum):
  dA_ij = g_i·v_j - ROWSUM_DEN·r_i ;  dφq_i = Σ_j dA_ij φk_j ;  dφk_j = Σ_i dA_ij φq_i ;  dv_j = Σ_i A_ij g_i
All arithmetic is in ACC (fp32, or fp64 for fp64 inputs); loads are cast up, stores cast down.
"""

import triton
import triton.language as tl
from triton import knobs
from triton.language.standard import _sum_combine

# Device helpers are @triton.jit when compiled. Interpreted, they are plain Python functions run
# inside the calling kernel's already patched triton.language scope: the interpreter re-patches
# the language on *every* call of a jit'd helper (~1 ms each), which made the interpreted tests
# spend most of their time patching. The kernels themselves stay @triton.jit in both modes.
_device = (lambda fn: fn) if knobs.runtime.interpret else triton.jit

# Only builtins of triton.language are used (no tl.sum/tl.zeros/tl.cdiv): those are @triton.jit
# functions decorated once, when triton was imported, in whatever mode TRITON_INTERPRET had then,
# and an interpreted kernel cannot call a compiled helper (nor the reverse).


@_device
def _sum(x, axis: tl.constexpr):
    """tl.sum for floats; the interpreter recognises _sum_combine and reduces with numpy."""
    return tl.reduce(x, axis, _sum_combine)


@_device
def _inverse_scale(SCALE, h, offs_d, D, KIND: tl.constexpr, ACC: tl.constexpr):
    """1/s of this head's channels for the focused map, (BLOCK_D,); ones (nothing loaded) otherwise."""
    if KIND == 1:
        s = tl.load(SCALE + h * D + offs_d, mask=offs_d < D, other=1.0).to(ACC)
        inv_s = 1.0 / s
    else:
        inv_s = offs_d.to(ACC) * 0.0 + 1.0
    return inv_s


@_device
def _power(y, POWER: tl.constexpr):
    """y^p for y >= 0 (0 at 0); integer powers by multiplication."""
    if POWER == 1.0:
        yp = y
    elif POWER == 2.0:
        yp = y * y
    elif POWER == 3.0:
        yp = y * y * y
    elif POWER == 4.0:
        y2 = y * y
        yp = y2 * y2
    else:
        positive = y > 0
        yp = tl.where(positive, tl.exp2(POWER * tl.log2(tl.where(positive, y, 1.0))), 0.0)
    return yp


@_device
def _feature(x, valid, inv_s, KIND: tl.constexpr, NORM_EPS: tl.constexpr, POWER: tl.constexpr):
    """φ(x) for a (rows, cols) block; zero where `valid` is false (elu+1 would make padding 1)."""
    if KIND == 0:
        norm = tl.sqrt(_sum(x * x, axis=1))
        phi = x / tl.maximum(norm, NORM_EPS)[:, None]
    elif KIND == 1:
        y = tl.maximum(x, 0.0) * inv_s[None, :]
        yp = _power(y, POWER)
        y_norm = tl.sqrt(_sum(y * y, axis=1))
        yp_norm = tl.sqrt(_sum(yp * yp, axis=1))
        phi = yp * (y_norm / tl.maximum(yp_norm, NORM_EPS))[:, None]
    elif KIND == 2:
        phi = tl.where(x > 0, x + 1.0, tl.exp(x))
    else:
        phi = tl.maximum(x, 0.0)
    return tl.where(valid, phi, 0.0)


@_device
def _feature_grad(x, dphi, valid, inv_s, KIND: tl.constexpr, NORM_EPS: tl.constexpr, POWER: tl.constexpr):
    """Vector-Jacobian product of φ at x: dφ -> dx (recomputes φ from x; nothing saved)."""
    if KIND == 0:
        norm = tl.sqrt(_sum(x * x, axis=1))
        clamped = tl.maximum(norm, NORM_EPS)
        y = x / clamped[:, None]
        proj = _sum(y * dphi, axis=1)
        # below NORM_EPS F.normalize divides by the constant eps: no projection term
        dx = tl.where((norm > NORM_EPS)[:, None], dphi - y * proj[:, None], dphi) / clamped[:, None]
    elif KIND == 1:
        # φ = n·u/c with n = ‖y‖, u = y^p, m = ‖u‖, c = max(m, eps); relu' = 0 at x <= 0, so only
        # y > 0 matters, where du/dy = p·u/y
        y = tl.maximum(x, 0.0) * inv_s[None, :]
        positive = y > 0
        u = _power(y, POWER)
        n = tl.sqrt(_sum(y * y, axis=1))
        m = tl.sqrt(_sum(u * u, axis=1))
        c = tl.maximum(m, NORM_EPS)
        proj = _sum(dphi * u, axis=1)  # dφ·u
        d_n = proj / c
        d_u = (n / c)[:, None] * dphi - tl.where(m > NORM_EPS, n * proj / (c * c * c), 0.0)[:, None] * u
        d_y = tl.where(n > 0, d_n / tl.where(n > 0, n, 1.0), 0.0)[:, None] * y
        d_y += tl.where(positive, d_u * POWER * u / tl.where(positive, y, 1.0), 0.0)
        dx = tl.where(positive, d_y * inv_s[None, :], 0.0)
    elif KIND == 2:
        dx = tl.where(x > 0, dphi, dphi * tl.exp(x))
    else:
        dx = tl.where(x > 0, dphi, 0.0)
    return tl.where(valid, dx, 0.0)


@_device
def _load_rows(base, rows, stride_n, offs_col, n_cols, N, ACC: tl.constexpr):
    mask = (rows < N)[:, None] & (offs_col < n_cols)[None, :]
    block = tl.load(base + rows[:, None] * stride_n + offs_col[None, :], mask=mask, other=0.0)
    return block.to(ACC), mask


@_device
def _store_rows(base, rows, stride_n, offs_col, n_cols, N, block):
    mask = (rows < N)[:, None] & (offs_col < n_cols)[None, :]
    tl.store(base + rows[:, None] * stride_n + offs_col[None, :], block.to(base.dtype.element_ty), mask=mask)


@_device
def _denominator(rowsum, count, row_valid, eps, KIND: tl.constexpr, ROWSUM_DEN: tl.constexpr):
    if ROWSUM_DEN:
        if KIND == 0:
            den = rowsum
        else:
            den = rowsum + eps
    else:
        den = count
    # padded rows are never stored; keep them finite so 0 * nan cannot leak into sums
    return tl.where(row_valid, den, 1.0)


# ----------------------------------------------------------------------------------------------
# every kernel's prologue, state layout and causal chunk pieces. Grid axis 0 is batch*heads + head,
# axis 1 the token range (splits) or the block of BLOCK_N rows. Helpers are inlined when compiled,
# so a kernel built from them is the same code as one written out.
# ----------------------------------------------------------------------------------------------


@_device
def _program(SCALE, H, D, KIND: tl.constexpr, ACC: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
             BLOCK_E: tl.constexpr, AXIS1: tl.constexpr):
    """This program's (batch, head) and the offsets every kernel indexes with.

    AXIS1 says what grid axis 1 is and how much of it is read here. ptxas' register counts depend on
    where these reads stand (measured: moving them cost 1-4 registers), so each kernel keeps the
    position it was tuned with:
      0: blocks of BLOCK_N rows: offs_n holds this block's rows (axis-1 id · BLOCK_N + 0..BLOCK_N-1);
      1: token ranges: split (the axis-1 id) read first; 2: also the number of ranges n_splits;
      3: also slot = pid_bh · n_splits + split, the index of this (batch, head, range) in the
         per-range state buffers.
    Returns pid_bh, split, n_splits, slot (each only as far as AXIS1 reads it), b, h, offs_n (BLOCK_N,),
    offs_d (BLOCK_D,), offs_e (BLOCK_E,), and 1/s (BLOCK_D,)."""
    pid_bh = tl.program_id(0)
    split = pid_bh  # placeholders where AXIS1 does not read them
    n_splits = 1
    slot = pid_bh
    if AXIS1 >= 1:
        split = tl.program_id(1)
    if AXIS1 >= 2:
        n_splits = tl.num_programs(1)
    if AXIS1 == 3:
        slot = pid_bh * n_splits + split
    b = pid_bh // H
    h = pid_bh % H
    if AXIS1 >= 1:
        offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    offs_e = tl.arange(0, BLOCK_E)
    inv_s = _inverse_scale(SCALE, h, offs_d, D, KIND, ACC)
    if AXIS1 == 0:
        offs_n = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    return pid_bh, split, n_splits, slot, b, h, offs_n, offs_d, offs_e, inv_s


@_device
def _token_range(split, N, tokens_per_split):
    """[start, end) of the token range this program sweeps (split: its grid axis-1 id)."""
    start = split * tokens_per_split
    return start, tl.minimum(start + tokens_per_split, N)


# The state buffers (`_Launch.state_buffers`): per slot (batch*heads + head, range) a state
# (BLOCK_D, BLOCK_E), a key sum (BLOCK_D,) and a value sum (BLOCK_E,), in the accumulation dtype.
# Pointers are formed base + slot, then + rows, then + columns, load after load: another association
# or order is other IR, and measured other register counts.


@_device
def _load_state(S, Z, SV, slot, offs_d, offs_e, BLOCK_D: tl.constexpr, BLOCK_E: tl.constexpr):
    state = tl.load(S + slot * BLOCK_D * BLOCK_E + offs_d[:, None] * BLOCK_E + offs_e[None, :])
    return state, tl.load(Z + slot * BLOCK_D + offs_d), tl.load(SV + slot * BLOCK_E + offs_e)


@_device
def _store_state(S, Z, SV, slot, state, key_sum, value_sum, offs_d, offs_e, BLOCK_D: tl.constexpr,
                 BLOCK_E: tl.constexpr):
    tl.store(S + slot * BLOCK_D * BLOCK_E + offs_d[:, None] * BLOCK_E + offs_e[None, :], state)
    tl.store(Z + slot * BLOCK_D + offs_d, key_sum)
    tl.store(SV + slot * BLOCK_E + offs_e, value_sum)


@_device
def _zero_state(ACC: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_E: tl.constexpr):
    state = tl.full((BLOCK_D, BLOCK_E), 0.0, dtype=ACC)
    return state, tl.full((BLOCK_D,), 0.0, dtype=ACC), tl.full((BLOCK_E,), 0.0, dtype=ACC)


@_device
def _initial_state(S0, Z0, SV0, pid_bh, split, slot, offs_d, offs_e, CHUNKED: tl.constexpr, AXIS1: tl.constexpr,
                   ACC: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_E: tl.constexpr):
    """The state a causal sweep starts from: its range's slot of S0, Z0, SV0 when CHUNKED (the slot from
    `_program` when AXIS1 == 3 computed it, else here), zeros otherwise."""
    if CHUNKED:
        if AXIS1 != 3:
            slot = pid_bh * tl.num_programs(1) + split
        state, key_sum, value_sum = _load_state(S0, Z0, SV0, slot, offs_d, offs_e, BLOCK_D, BLOCK_E)
    else:
        state, key_sum, value_sum = _zero_state(ACC, BLOCK_D, BLOCK_E)
    return state, key_sum, value_sum


@_device
def _accumulate_state(state, key_sum, value_sum, phi, r, values, WEIGHTED: tl.constexpr, PRECISION: tl.constexpr):
    """state + φᵀ values (BLOCK_D, BLOCK_E), key_sum + Σ φ (WEIGHTED: Σ r φ), value_sum + Σ values, over the
    block's rows."""
    state = tl.dot(tl.trans(phi), values, state, input_precision=PRECISION)
    if WEIGHTED:
        key_sum += _sum(r[:, None] * phi, axis=0)
    else:
        key_sum += _sum(phi, axis=0)
    return state, key_sum, value_sum + _sum(values, axis=0)


@_device
def _range_sweep(
    X, Y, SCALE, H, N, tokens_per_split, sxb, sxh, syb, syh, D, KIND: tl.constexpr, ACC: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_E: tl.constexpr, AXIS1: tl.constexpr,
):
    """Prologue of a kernel sweeping one token range of two inputs: `_program`'s values, the rows of X
    and Y of this (batch, head), and the range [start, end)."""
    pid_bh, split, n_splits, slot, b, h, offs_n, offs_d, offs_e, inv_s = _program(
        SCALE, H, D, KIND, ACC, BLOCK_N, BLOCK_D, BLOCK_E, AXIS1)
    x_base = X + b * sxb + h * sxh
    y_base = Y + b * syb + h * syh
    start, end = _token_range(split, N, tokens_per_split)
    return pid_bh, split, n_splits, slot, b, h, offs_n, offs_d, offs_e, inv_s, x_base, y_base, start, end


@_device
def _load_row_stats(DEN, R, pid_bh, N, rows, row_valid):
    """The causal dq sweep's per-token den and r = dO·O/den of these rows ((BLOCK_N,) each; (B*H, N) buffers)."""
    den = tl.load(DEN + pid_bh * N + rows, mask=row_valid, other=1.0)
    return den, tl.load(R + pid_bh * N + rows, mask=row_valid, other=0.0)


@_device
def _store_row_stats(DEN, R, pid_bh, N, rows, row_valid, den, r):
    tl.store(DEN + pid_bh * N + rows, den, mask=row_valid)
    tl.store(R + pid_bh * N + rows, r, mask=row_valid)


@_device
def _causal_mask(offs_n, row_valid):
    """(BLOCK_N, BLOCK_N): row i of the chunk attends to row j <= i where j is a token."""
    return (offs_n[:, None] >= offs_n[None, :]) & row_valid[None, :]


@_device
def _masked_scores(phi_q, phi_k, attend, KIND: tl.constexpr, PRECISION: tl.constexpr):
    """A = C + φq φkᵀ inside the chunk, zero where not attended: (BLOCK_N, BLOCK_N)."""
    scores = tl.dot(phi_q, tl.trans(phi_k), input_precision=PRECISION)
    if KIND == 0:
        scores += 1.0
    return tl.where(attend, scores, 0.0)


# ----------------------------------------------------------------------------------------------
# bidirectional (the state kernel also builds the chunk states of the chunk-parallel causal form)
# ----------------------------------------------------------------------------------------------


@_device
def _range_state(
    X, Y, SCALE, DEN, R, S_part, Z_part, SV_part, H, N, tokens_per_split, sxb, sxh, sxn, syb, syh, syn,
    D: tl.constexpr, E: tl.constexpr, KIND: tl.constexpr, POWER: tl.constexpr, NORM_EPS: tl.constexpr,
    ACC: tl.constexpr, PRECISION: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
    BLOCK_E: tl.constexpr, ROW_STATS: tl.constexpr, AXIS1: tl.constexpr,
):
    """One token range's Σ φx yᵀ (BLOCK_D, BLOCK_E), Σ r φx, Σ y over the rows of X (D wide) and Y (E wide).
    ROW_STATS false: y = Y, r = 1 (the state Σ φk vᵀ, Σ φk, Σ v). ROW_STATS: y = Y / den with the causal
    dq sweep's row statistics den and r (the reverse sums Σ φq gᵀ, Σ r φq, Σ g)."""
    pid_bh, split, n_splits, slot, b, h, offs_n, offs_d, offs_e, inv_s, x_base, y_base, start, end = _range_sweep(
        X, Y, SCALE, H, N, tokens_per_split, sxb, sxh, syb, syh, D, KIND, ACC, BLOCK_N, BLOCK_D, BLOCK_E, AXIS1)
    state, key_sum, value_sum = _zero_state(ACC, BLOCK_D, BLOCK_E)
    for n0 in range(start, end, BLOCK_N):
        rows = n0 + offs_n
        x, x_mask = _load_rows(x_base, rows, sxn, offs_d, D, end, ACC)
        y, _ = _load_rows(y_base, rows, syn, offs_e, E, end, ACC)
        r = y  # unused unless ROW_STATS
        if ROW_STATS:
            den, r = _load_row_stats(DEN, R, pid_bh, N, rows, rows < end)
        phi = _feature(x, x_mask, inv_s, KIND, NORM_EPS, POWER)
        if ROW_STATS:
            y = y / den[:, None]
        state, key_sum, value_sum = _accumulate_state(state, key_sum, value_sum, phi, r, y, ROW_STATS, PRECISION)
    if AXIS1 == 2:
        slot = pid_bh * n_splits + split
    _store_state(S_part, Z_part, SV_part, slot, state, key_sum, value_sum, offs_d, offs_e, BLOCK_D, BLOCK_E)


@triton.jit
def _bidir_state_kernel(
    K, V, SCALE, S_part, Z_part, SV_part,
    H, N, tokens_per_split, skb, skh, skn, svb, svh, svn,
    D: tl.constexpr, E: tl.constexpr, KIND: tl.constexpr, POWER: tl.constexpr, NORM_EPS: tl.constexpr,
    ACC: tl.constexpr, PRECISION: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_E: tl.constexpr,
):
    """Partial states of one token range: Σ φk vᵀ (BLOCK_D, BLOCK_E), Σ φk, Σ v. Grid (B*H, splits)."""
    _range_state(K, V, SCALE, SCALE, SCALE, S_part, Z_part, SV_part, H, N, tokens_per_split, skb, skh, skn, svb, svh,
                 svn, D, E, KIND, POWER, NORM_EPS, ACC, PRECISION, BLOCK_N, BLOCK_D, BLOCK_E, False, 2)


@triton.jit
def _bidir_out_kernel(
    Q, SCALE, S, Z, SV, O,
    H, N, eps,
    sqb, sqh, sqn, sob, soh, son,
    D: tl.constexpr, E: tl.constexpr, KIND: tl.constexpr, POWER: tl.constexpr, ROWSUM_DEN: tl.constexpr,
    NORM_EPS: tl.constexpr, ACC: tl.constexpr, PRECISION: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_E: tl.constexpr,
):
    """out = (φq S + C Σv) / den for one block of queries. Grid (B*H, cdiv(N, BLOCK_N))."""
    pid_bh, _, _, _, b, h, rows, offs_d, offs_e, inv_s = _program(SCALE, H, D, KIND, ACC, BLOCK_N, BLOCK_D, BLOCK_E, 0)
    state, key_sum, value_sum = _load_state(S, Z, SV, pid_bh, offs_d, offs_e, BLOCK_D, BLOCK_E)
    q, q_mask = _load_rows(Q + b * sqb + h * sqh, rows, sqn, offs_d, D, N, ACC)
    phi_q = _feature(q, q_mask, inv_s, KIND, NORM_EPS, POWER)
    num = tl.dot(phi_q, state, input_precision=PRECISION)
    rowsum = _sum(phi_q * key_sum[None, :], axis=1)
    if KIND == 0:
        num += value_sum[None, :]
        rowsum += N
    den = _denominator(rowsum, N * 1.0, rows < N, eps, KIND, ROWSUM_DEN)
    _store_rows(O + b * sob + h * soh, rows, son, offs_e, E, N, num / den[:, None])


@triton.jit
def _bidir_bwd_query_kernel(
    Q, DO, SCALE, S, Z, SV, DQ, DS_part, DZ_part, DSV_part,
    H, N, tokens_per_split, eps,
    sqb, sqh, sqn, sdob, sdoh, sdon, sdqb, sdqh, sdqn,
    D: tl.constexpr, E: tl.constexpr, KIND: tl.constexpr, POWER: tl.constexpr, ROWSUM_DEN: tl.constexpr,
    NORM_EPS: tl.constexpr, ACC: tl.constexpr, PRECISION: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_E: tl.constexpr,
):
    """dq for a token range, and partial dS = Σ φq gᵀ, dZ = -Σ r φq, dSV = C Σ g. Grid (B*H, splits)."""
    pid_bh, split, n_splits, slot, b, h, offs_n, offs_d, offs_e, inv_s = _program(
        SCALE, H, D, KIND, ACC, BLOCK_N, BLOCK_D, BLOCK_E, 2)
    state, key_sum, value_sum = _load_state(S, Z, SV, pid_bh, offs_d, offs_e, BLOCK_D, BLOCK_E)
    q_base = Q + b * sqb + h * sqh
    do_base = DO + b * sdob + h * sdoh
    dq_base = DQ + b * sdqb + h * sdqh
    d_state, d_key_sum, d_value_sum = _zero_state(ACC, BLOCK_D, BLOCK_E)
    start, end = _token_range(split, N, tokens_per_split)
    for n0 in range(start, end, BLOCK_N):
        rows = n0 + offs_n
        q, q_mask = _load_rows(q_base, rows, sqn, offs_d, D, end, ACC)
        do, _ = _load_rows(do_base, rows, sdon, offs_e, E, end, ACC)
        phi_q = _feature(q, q_mask, inv_s, KIND, NORM_EPS, POWER)
        rowsum = _sum(phi_q * key_sum[None, :], axis=1)
        if KIND == 0:
            rowsum += N
        den = _denominator(rowsum, N * 1.0, rows < end, eps, KIND, ROWSUM_DEN)
        g = do / den[:, None]
        d_phi_q = tl.dot(g, tl.trans(state), input_precision=PRECISION)
        if ROWSUM_DEN:
            num = tl.dot(phi_q, state, input_precision=PRECISION)
            if KIND == 0:
                num += value_sum[None, :]
            r = _sum(g * num, axis=1) / den
            d_phi_q -= r[:, None] * key_sum[None, :]
            d_key_sum -= _sum(r[:, None] * phi_q, axis=0)
        dq = _feature_grad(q, d_phi_q, q_mask, inv_s, KIND, NORM_EPS, POWER)
        _store_rows(dq_base, rows, sdqn, offs_d, D, end, dq)
        d_state = tl.dot(tl.trans(phi_q), g, d_state, input_precision=PRECISION)
        if KIND == 0:
            d_value_sum += _sum(g, axis=0)
    _store_state(DS_part, DZ_part, DSV_part, pid_bh * n_splits + split, d_state, d_key_sum, d_value_sum, offs_d,
                 offs_e, BLOCK_D, BLOCK_E)


@triton.jit
def _bidir_bwd_key_kernel(
    K, V, SCALE, DS, DZ, DSV, DK, DV,
    H, N,
    skb, skh, skn, svb, svh, svn, sdkb, sdkh, sdkn, sdvb, sdvh, sdvn,
    D: tl.constexpr, E: tl.constexpr, KIND: tl.constexpr, POWER: tl.constexpr, NORM_EPS: tl.constexpr,
    ACC: tl.constexpr, PRECISION: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_E: tl.constexpr,
):
    """dφk = v dSᵀ + dZ, dv = φk dS + dSV for one block of keys. Grid (B*H, cdiv(N, BLOCK_N))."""
    pid_bh, _, _, _, b, h, rows, offs_d, offs_e, inv_s = _program(SCALE, H, D, KIND, ACC, BLOCK_N, BLOCK_D, BLOCK_E, 0)
    d_state, d_key_sum, d_value_sum = _load_state(DS, DZ, DSV, pid_bh, offs_d, offs_e, BLOCK_D, BLOCK_E)
    k, k_mask = _load_rows(K + b * skb + h * skh, rows, skn, offs_d, D, N, ACC)
    v, _ = _load_rows(V + b * svb + h * svh, rows, svn, offs_e, E, N, ACC)
    phi_k = _feature(k, k_mask, inv_s, KIND, NORM_EPS, POWER)
    d_phi_k = tl.dot(v, tl.trans(d_state), input_precision=PRECISION) + d_key_sum[None, :]
    dk = _feature_grad(k, d_phi_k, k_mask, inv_s, KIND, NORM_EPS, POWER)
    dv = tl.dot(phi_k, d_state, input_precision=PRECISION) + d_value_sum[None, :]
    _store_rows(DK + b * sdkb + h * sdkh, rows, sdkn, offs_d, D, N, dk)
    _store_rows(DV + b * sdvb + h * sdvh, rows, sdvn, offs_e, E, N, dv)


# ----------------------------------------------------------------------------------------------
# causal: chunks of BLOCK_N tokens, masked product inside a chunk + running state of earlier chunks.
# Grid (B*H, splits): each program sweeps one token range of tokens_per_split (a multiple of
# BLOCK_N). splits == 1: one program per (batch, head) over all tokens (short inputs, e.g. 77 text
# tokens). CHUNKED (long inputs): the range starts from a state passed in (forward / dq: the
# prefix of the chunk states before it, from _bidir_state_kernel + a cumulative sum on the host;
# dk/dv: the suffix of the later ranges' reverse states, from _causal_reverse_state_kernel).
# ----------------------------------------------------------------------------------------------


@_device
def _causal_chunk(
    q_base, k_base, v_base, n0, offs_n, offs_d, offs_e, end, sqn, skn, svn, state, key_sum, value_sum, eps,
    inv_s, D: tl.constexpr, E: tl.constexpr, KIND: tl.constexpr, POWER: tl.constexpr, ROWSUM_DEN: tl.constexpr,
    NORM_EPS: tl.constexpr, ACC: tl.constexpr, PRECISION: tl.constexpr,
):
    """Recompute the forward of the chunk starting at token n0: returns its rows, q, q's mask, φq, φk, v, num, den."""
    rows = n0 + offs_n
    q, q_mask = _load_rows(q_base, rows, sqn, offs_d, D, end, ACC)
    k, k_mask = _load_rows(k_base, rows, skn, offs_d, D, end, ACC)
    v, _ = _load_rows(v_base, rows, svn, offs_e, E, end, ACC)
    phi_q = _feature(q, q_mask, inv_s, KIND, NORM_EPS, POWER)
    phi_k = _feature(k, k_mask, inv_s, KIND, NORM_EPS, POWER)
    scores = _masked_scores(phi_q, phi_k, _causal_mask(offs_n, rows < end), KIND, PRECISION)
    num = tl.dot(scores, v, input_precision=PRECISION) + tl.dot(phi_q, state, input_precision=PRECISION)
    rowsum = _sum(scores, axis=1) + _sum(phi_q * key_sum[None, :], axis=1)
    if KIND == 0:
        num += value_sum[None, :]
        rowsum += n0
    den = _denominator(rowsum, (rows + 1).to(ACC), rows < end, eps, KIND, ROWSUM_DEN)
    return rows, q, q_mask, phi_q, phi_k, v, num, den


@_device
def _causal_sweep(
    Q, K, V, O, DQ, SCALE, S0, Z0, SV0, H, N, tokens_per_split, sqb, sqh, skb, skh, svb, svh, sob, soh, sdqb, sdqh,
    D, KIND: tl.constexpr, CHUNKED: tl.constexpr, ACC: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
    BLOCK_E: tl.constexpr, AXIS1: tl.constexpr,
):
    """Prologue of the causal sweeps (forward, dq, dk/dv): `_program`'s values, this (batch, head)'s rows of
    q, k, v, O (out or dO) and DQ, the state the sweep starts from (`_initial_state`), and the range [start, end)."""
    pid_bh, split, _, slot, b, h, offs_n, offs_d, offs_e, inv_s = _program(
        SCALE, H, D, KIND, ACC, BLOCK_N, BLOCK_D, BLOCK_E, AXIS1)
    q_base = Q + b * sqb + h * sqh
    k_base = K + b * skb + h * skh
    v_base = V + b * svb + h * svh
    o_base = O + b * sob + h * soh
    dq_base = DQ + b * sdqb + h * sdqh
    state, key_sum, value_sum = _initial_state(S0, Z0, SV0, pid_bh, split, slot, offs_d, offs_e, CHUNKED, AXIS1, ACC,
                                               BLOCK_D, BLOCK_E)
    start, end = _token_range(split, N, tokens_per_split)
    return (pid_bh, b, h, offs_n, offs_d, offs_e, inv_s, q_base, k_base, v_base, o_base, dq_base, state, key_sum,
            value_sum, start, end)


@_device
def _causal_forward_sweep(
    Q, K, V, O, SCALE, S0, Z0, SV0, DQ, DEN, R, H, N, tokens_per_split, eps,
    sqb, sqh, sqn, skb, skh, skn, svb, svh, svn, sob, soh, son, sdqb, sdqh, sdqn,
    D: tl.constexpr, E: tl.constexpr, KIND: tl.constexpr, POWER: tl.constexpr, ROWSUM_DEN: tl.constexpr,
    CHUNKED: tl.constexpr, NORM_EPS: tl.constexpr, ACC: tl.constexpr, PRECISION: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_E: tl.constexpr, DQ_PASS: tl.constexpr,
):
    """The causal forward over one token range, chunk by chunk in order, carrying the running state.
    DQ_PASS false: writes out to O. DQ_PASS: O holds dO; writes dq to DQ and the row statistics
    den, r = dO·out/den to DEN, R (for the dk/dv sweep)."""
    (pid_bh, b, h, offs_n, offs_d, offs_e, inv_s, q_base, k_base, v_base, o_base, dq_base, state, key_sum, value_sum,
     start, end) = _causal_sweep(Q, K, V, O, DQ, SCALE, S0, Z0, SV0, H, N, tokens_per_split, sqb, sqh, skb, skh, svb,
                                 svh, sob, soh, sdqb, sdqh, D, KIND, CHUNKED, ACC, BLOCK_N, BLOCK_D, BLOCK_E,
                                 3 if DQ_PASS else 1)
    for n0 in range(start, end, BLOCK_N):
        rows, q, q_mask, phi_q, phi_k, v, num, den = _causal_chunk(
            q_base, k_base, v_base, n0, offs_n, offs_d, offs_e, end, sqn, skn, svn, state, key_sum, value_sum, eps,
            inv_s, D, E, KIND, POWER, ROWSUM_DEN, NORM_EPS, ACC, PRECISION)
        if DQ_PASS:
            do, _ = _load_rows(o_base, rows, son, offs_e, E, end, ACC)
            g = do / den[:, None]
            d_scores = tl.dot(g, tl.trans(v), input_precision=PRECISION)
            r = tl.full((BLOCK_N,), 0.0, dtype=ACC)
            if ROWSUM_DEN:
                r = _sum(g * num, axis=1) / den
                d_scores -= r[:, None]
            d_scores = tl.where(_causal_mask(offs_n, rows < end), d_scores, 0.0)
            d_phi_q = tl.dot(d_scores, phi_k, input_precision=PRECISION)
            d_phi_q += tl.dot(g, tl.trans(state), input_precision=PRECISION)
            if ROWSUM_DEN:
                d_phi_q -= r[:, None] * key_sum[None, :]
            dq = _feature_grad(q, d_phi_q, q_mask, inv_s, KIND, NORM_EPS, POWER)
            _store_rows(dq_base, rows, sdqn, offs_d, D, end, dq)
            _store_row_stats(DEN, R, pid_bh, N, rows, rows < end, den, r)
        else:
            _store_rows(o_base, rows, son, offs_e, E, end, num / den[:, None])
        state, key_sum, value_sum = _accumulate_state(state, key_sum, value_sum, phi_k, phi_k, v, False, PRECISION)


@triton.jit
def _causal_fwd_kernel(
    Q, K, V, SCALE, S0, Z0, SV0, O,
    H, N, tokens_per_split, eps,
    sqb, sqh, sqn, skb, skh, skn, svb, svh, svn, sob, soh, son,
    D: tl.constexpr, E: tl.constexpr, KIND: tl.constexpr, POWER: tl.constexpr, ROWSUM_DEN: tl.constexpr,
    CHUNKED: tl.constexpr, NORM_EPS: tl.constexpr, ACC: tl.constexpr, PRECISION: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_E: tl.constexpr,
):
    """Causal forward over one token range, chunk by chunk in order. Grid (B*H, splits)."""
    _causal_forward_sweep(Q, K, V, O, SCALE, S0, Z0, SV0, O, O, O, H, N, tokens_per_split, eps,
                          sqb, sqh, sqn, skb, skh, skn, svb, svh, svn, sob, soh, son, 0, 0, 0,
                          D, E, KIND, POWER, ROWSUM_DEN, CHUNKED, NORM_EPS, ACC, PRECISION, BLOCK_N, BLOCK_D, BLOCK_E,
                          False)


@triton.jit
def _causal_bwd_query_kernel(
    Q, K, V, DO, SCALE, S0, Z0, SV0, DQ, DEN, R,
    H, N, tokens_per_split, eps,
    sqb, sqh, sqn, skb, skh, skn, svb, svh, svn, sdob, sdoh, sdon, sdqb, sdqh, sdqn,
    D: tl.constexpr, E: tl.constexpr, KIND: tl.constexpr, POWER: tl.constexpr, ROWSUM_DEN: tl.constexpr,
    CHUNKED: tl.constexpr, NORM_EPS: tl.constexpr, ACC: tl.constexpr, PRECISION: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_E: tl.constexpr,
):
    """dq by a forward sweep (recomputing the forward); writes the O(N) row statistics den and r for
    the dk/dv sweep. Grid (B*H, splits)."""
    _causal_forward_sweep(Q, K, V, DO, SCALE, S0, Z0, SV0, DQ, DEN, R, H, N, tokens_per_split, eps,
                          sqb, sqh, sqn, skb, skh, skn, svb, svh, svn, sdob, sdoh, sdon, sdqb, sdqh, sdqn,
                          D, E, KIND, POWER, ROWSUM_DEN, CHUNKED, NORM_EPS, ACC, PRECISION, BLOCK_N, BLOCK_D, BLOCK_E,
                          True)


@triton.jit
def _causal_reverse_state_kernel(
    Q, DO, SCALE, DEN, R, RS_part, RZ_part, RSV_part,
    H, N, tokens_per_split,
    sqb, sqh, sqn, sdob, sdoh, sdon,
    D: tl.constexpr, E: tl.constexpr, KIND: tl.constexpr, POWER: tl.constexpr, NORM_EPS: tl.constexpr,
    ACC: tl.constexpr, PRECISION: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_E: tl.constexpr,
):
    """Chunk-parallel causal backward: one token range's reverse sums Σ φq gᵀ, Σ r φq, Σ g (g = do/den),
    from the row statistics of the dq sweep; suffix-summed on the host for the dk/dv sweep. A pass of
    its own (not accumulated in the dq sweep) to keep that kernel's registers. Grid (B*H, splits)."""
    _range_state(Q, DO, SCALE, DEN, R, RS_part, RZ_part, RSV_part, H, N, tokens_per_split, sqb, sqh, sqn, sdob, sdoh,
                 sdon, D, E, KIND, POWER, NORM_EPS, ACC, PRECISION, BLOCK_N, BLOCK_D, BLOCK_E, True, 3)


@triton.jit
def _causal_bwd_key_kernel(
    Q, K, V, DO, SCALE, DEN, R, RS0, RZ0, RSV0, DK, DV,
    H, N, tokens_per_split,
    sqb, sqh, sqn, skb, skh, skn, svb, svh, svn, sdob, sdoh, sdon, sdkb, sdkh, sdkn, sdvb, sdvh, sdvn,
    D: tl.constexpr, E: tl.constexpr, KIND: tl.constexpr, POWER: tl.constexpr, ROWSUM_DEN: tl.constexpr,
    CHUNKED: tl.constexpr, NORM_EPS: tl.constexpr, ACC: tl.constexpr, PRECISION: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_E: tl.constexpr,
):
    """dk, dv by a reverse sweep over one token range carrying Σ_{later} φq gᵀ, Σ_{later} r φq,
    Σ_{later} g (CHUNKED: starting from the later ranges' sums RS0, RZ0, RSV0). Grid (B*H, splits)."""
    (pid_bh, b, h, offs_n, offs_d, offs_e, inv_s, q_base, k_base, v_base, do_base, no_dq, rev_state, rev_r_phi_q, rev_g,
     start, end) = _causal_sweep(Q, K, V, DO, DO, SCALE, RS0, RZ0, RSV0, H, N, tokens_per_split, sqb, sqh, skb, skh,
                                 svb, svh, sdob, sdoh, 0, 0, D, KIND, CHUNKED, ACC, BLOCK_N, BLOCK_D, BLOCK_E, 1)
    n_chunks = (end - start + BLOCK_N - 1) // BLOCK_N
    for i in range(0, n_chunks):
        n0 = start + (n_chunks - 1 - i) * BLOCK_N
        rows = n0 + offs_n
        row_valid = rows < end
        q, q_mask = _load_rows(q_base, rows, sqn, offs_d, D, end, ACC)
        k, k_mask = _load_rows(k_base, rows, skn, offs_d, D, end, ACC)
        v, _ = _load_rows(v_base, rows, svn, offs_e, E, end, ACC)
        do, _ = _load_rows(do_base, rows, sdon, offs_e, E, end, ACC)
        den, r = _load_row_stats(DEN, R, pid_bh, N, rows, row_valid)
        phi_q = _feature(q, q_mask, inv_s, KIND, NORM_EPS, POWER)
        phi_k = _feature(k, k_mask, inv_s, KIND, NORM_EPS, POWER)
        g = do / den[:, None]
        attend = _causal_mask(offs_n, row_valid)
        scores = _masked_scores(phi_q, phi_k, attend, KIND, PRECISION)
        d_scores = tl.dot(g, tl.trans(v), input_precision=PRECISION)
        if ROWSUM_DEN:
            d_scores -= r[:, None]
        d_scores = tl.where(attend, d_scores, 0.0)
        d_phi_k = tl.dot(tl.trans(d_scores), phi_q, input_precision=PRECISION)
        d_phi_k += tl.dot(v, tl.trans(rev_state), input_precision=PRECISION)
        if ROWSUM_DEN:
            d_phi_k -= rev_r_phi_q[None, :]
        dv = tl.dot(tl.trans(scores), g, input_precision=PRECISION)
        dv += tl.dot(phi_k, rev_state, input_precision=PRECISION)
        if KIND == 0:
            dv += rev_g[None, :]
        dk = _feature_grad(k, d_phi_k, k_mask, inv_s, KIND, NORM_EPS, POWER)
        _store_rows(DK + b * sdkb + h * sdkh, rows, sdkn, offs_d, D, end, dk)
        _store_rows(DV + b * sdvb + h * sdvh, rows, sdvn, offs_e, E, end, dv)
        rev_state, rev_r_phi_q, rev_g = _accumulate_state(rev_state, rev_r_phi_q, rev_g, phi_q, r, g, True, PRECISION)
