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
# bidirectional (the state kernel also builds the chunk states of the chunk-parallel causal form)
# ----------------------------------------------------------------------------------------------


@triton.jit
def _bidir_state_kernel(
    K, V, SCALE, S_part, Z_part, SV_part,
    H, N, tokens_per_split,
    skb, skh, skn, svb, svh, svn,
    D: tl.constexpr, E: tl.constexpr, KIND: tl.constexpr, POWER: tl.constexpr, NORM_EPS: tl.constexpr,
    ACC: tl.constexpr, PRECISION: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_E: tl.constexpr,
):
    """Partial states of one token range: Σ φk vᵀ (BLOCK_D, BLOCK_E), Σ φk, Σ v. Grid (B*H, splits)."""
    pid_bh = tl.program_id(0)
    split = tl.program_id(1)
    n_splits = tl.num_programs(1)
    b = pid_bh // H
    h = pid_bh % H
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    offs_e = tl.arange(0, BLOCK_E)
    inv_s = _inverse_scale(SCALE, h, offs_d, D, KIND, ACC)
    k_base = K + b * skb + h * skh
    v_base = V + b * svb + h * svh
    state = tl.full((BLOCK_D, BLOCK_E), 0.0, dtype=ACC)
    key_sum = tl.full((BLOCK_D,), 0.0, dtype=ACC)
    value_sum = tl.full((BLOCK_E,), 0.0, dtype=ACC)
    start = split * tokens_per_split
    end = tl.minimum(start + tokens_per_split, N)
    for n0 in range(start, end, BLOCK_N):
        rows = n0 + offs_n
        k, k_mask = _load_rows(k_base, rows, skn, offs_d, D, end, ACC)
        v, _ = _load_rows(v_base, rows, svn, offs_e, E, end, ACC)
        phi_k = _feature(k, k_mask, inv_s, KIND, NORM_EPS, POWER)
        state = tl.dot(tl.trans(phi_k), v, state, input_precision=PRECISION)
        key_sum += _sum(phi_k, axis=0)
        value_sum += _sum(v, axis=0)
    slot = pid_bh * n_splits + split
    tl.store(S_part + slot * BLOCK_D * BLOCK_E + offs_d[:, None] * BLOCK_E + offs_e[None, :], state)
    tl.store(Z_part + slot * BLOCK_D + offs_d, key_sum)
    tl.store(SV_part + slot * BLOCK_E + offs_e, value_sum)


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
    pid_bh = tl.program_id(0)
    b = pid_bh // H
    h = pid_bh % H
    offs_d = tl.arange(0, BLOCK_D)
    offs_e = tl.arange(0, BLOCK_E)
    inv_s = _inverse_scale(SCALE, h, offs_d, D, KIND, ACC)
    rows = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    state = tl.load(S + pid_bh * BLOCK_D * BLOCK_E + offs_d[:, None] * BLOCK_E + offs_e[None, :])
    key_sum = tl.load(Z + pid_bh * BLOCK_D + offs_d)
    value_sum = tl.load(SV + pid_bh * BLOCK_E + offs_e)
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
    pid_bh = tl.program_id(0)
    split = tl.program_id(1)
    n_splits = tl.num_programs(1)
    b = pid_bh // H
    h = pid_bh % H
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    offs_e = tl.arange(0, BLOCK_E)
    inv_s = _inverse_scale(SCALE, h, offs_d, D, KIND, ACC)
    state = tl.load(S + pid_bh * BLOCK_D * BLOCK_E + offs_d[:, None] * BLOCK_E + offs_e[None, :])
    key_sum = tl.load(Z + pid_bh * BLOCK_D + offs_d)
    value_sum = tl.load(SV + pid_bh * BLOCK_E + offs_e)
    q_base = Q + b * sqb + h * sqh
    do_base = DO + b * sdob + h * sdoh
    dq_base = DQ + b * sdqb + h * sdqh
    d_state = tl.full((BLOCK_D, BLOCK_E), 0.0, dtype=ACC)
    d_key_sum = tl.full((BLOCK_D,), 0.0, dtype=ACC)
    d_value_sum = tl.full((BLOCK_E,), 0.0, dtype=ACC)
    start = split * tokens_per_split
    end = tl.minimum(start + tokens_per_split, N)
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
    slot = pid_bh * n_splits + split
    tl.store(DS_part + slot * BLOCK_D * BLOCK_E + offs_d[:, None] * BLOCK_E + offs_e[None, :], d_state)
    tl.store(DZ_part + slot * BLOCK_D + offs_d, d_key_sum)
    tl.store(DSV_part + slot * BLOCK_E + offs_e, d_value_sum)


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
    pid_bh = tl.program_id(0)
    b = pid_bh // H
    h = pid_bh % H
    offs_d = tl.arange(0, BLOCK_D)
    offs_e = tl.arange(0, BLOCK_E)
    inv_s = _inverse_scale(SCALE, h, offs_d, D, KIND, ACC)
    rows = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    d_state = tl.load(DS + pid_bh * BLOCK_D * BLOCK_E + offs_d[:, None] * BLOCK_E + offs_e[None, :])
    d_key_sum = tl.load(DZ + pid_bh * BLOCK_D + offs_d)
    d_value_sum = tl.load(DSV + pid_bh * BLOCK_E + offs_e)
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
def _load_state(S, Z, SV, slot, offs_d, offs_e, BLOCK_D: tl.constexpr, BLOCK_E: tl.constexpr):
    state = tl.load(S + slot * BLOCK_D * BLOCK_E + offs_d[:, None] * BLOCK_E + offs_e[None, :])
    return state, tl.load(Z + slot * BLOCK_D + offs_d), tl.load(SV + slot * BLOCK_E + offs_e)


@_device
def _causal_chunk(
    q_base, k_base, v_base, rows, offs_n, offs_d, offs_e, n0, end, sqn, skn, svn, state, key_sum, value_sum, eps,
    inv_s, D: tl.constexpr, E: tl.constexpr, KIND: tl.constexpr, POWER: tl.constexpr, ROWSUM_DEN: tl.constexpr,
    NORM_EPS: tl.constexpr, ACC: tl.constexpr, PRECISION: tl.constexpr,
):
    """Recompute one chunk of the forward: returns q, its mask, φq, φk, v, num, den."""
    q, q_mask = _load_rows(q_base, rows, sqn, offs_d, D, end, ACC)
    k, k_mask = _load_rows(k_base, rows, skn, offs_d, D, end, ACC)
    v, _ = _load_rows(v_base, rows, svn, offs_e, E, end, ACC)
    phi_q = _feature(q, q_mask, inv_s, KIND, NORM_EPS, POWER)
    phi_k = _feature(k, k_mask, inv_s, KIND, NORM_EPS, POWER)
    attend = (offs_n[:, None] >= offs_n[None, :]) & (rows < end)[None, :]
    scores = tl.dot(phi_q, tl.trans(phi_k), input_precision=PRECISION)
    if KIND == 0:
        scores += 1.0
    scores = tl.where(attend, scores, 0.0)
    num = tl.dot(scores, v, input_precision=PRECISION) + tl.dot(phi_q, state, input_precision=PRECISION)
    rowsum = _sum(scores, axis=1) + _sum(phi_q * key_sum[None, :], axis=1)
    if KIND == 0:
        num += value_sum[None, :]
        rowsum += n0
    den = _denominator(rowsum, (rows + 1).to(ACC), rows < end, eps, KIND, ROWSUM_DEN)
    return q, q_mask, phi_q, phi_k, v, num, den


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
    pid_bh = tl.program_id(0)
    split = tl.program_id(1)
    b = pid_bh // H
    h = pid_bh % H
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    offs_e = tl.arange(0, BLOCK_E)
    inv_s = _inverse_scale(SCALE, h, offs_d, D, KIND, ACC)
    q_base = Q + b * sqb + h * sqh
    k_base = K + b * skb + h * skh
    v_base = V + b * svb + h * svh
    o_base = O + b * sob + h * soh
    if CHUNKED:
        state, key_sum, value_sum = _load_state(S0, Z0, SV0, pid_bh * tl.num_programs(1) + split, offs_d, offs_e,
                                                BLOCK_D, BLOCK_E)
    else:
        state = tl.full((BLOCK_D, BLOCK_E), 0.0, dtype=ACC)
        key_sum = tl.full((BLOCK_D,), 0.0, dtype=ACC)
        value_sum = tl.full((BLOCK_E,), 0.0, dtype=ACC)
    start = split * tokens_per_split
    end = tl.minimum(start + tokens_per_split, N)
    for n0 in range(start, end, BLOCK_N):
        rows = n0 + offs_n
        q, q_mask, phi_q, phi_k, v, num, den = _causal_chunk(
            q_base, k_base, v_base, rows, offs_n, offs_d, offs_e, n0, end, sqn, skn, svn,
            state, key_sum, value_sum, eps, inv_s, D, E, KIND, POWER, ROWSUM_DEN, NORM_EPS, ACC, PRECISION)
        _store_rows(o_base, rows, son, offs_e, E, end, num / den[:, None])
        state = tl.dot(tl.trans(phi_k), v, state, input_precision=PRECISION)
        key_sum += _sum(phi_k, axis=0)
        value_sum += _sum(v, axis=0)


@triton.jit
def _causal_bwd_query_kernel(
    Q, K, V, DO, SCALE, S0, Z0, SV0, DQ, DEN, R,
    H, N, tokens_per_split, eps,
    sqb, sqh, sqn, skb, skh, skn, svb, svh, svn, sdob, sdoh, sdon, sdqb, sdqh, sdqn,
    D: tl.constexpr, E: tl.constexpr, KIND: tl.constexpr, POWER: tl.constexpr, ROWSUM_DEN: tl.constexpr,
    CHUNKED: tl.constexpr, NORM_EPS: tl.constexpr, ACC: tl.constexpr, PRECISION: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_E: tl.constexpr,
):
    """dq by a forward sweep (recomputing the forward); writes the O(N) stats den and r. Grid (B*H, splits)."""
    pid_bh = tl.program_id(0)
    split = tl.program_id(1)
    slot = pid_bh * tl.num_programs(1) + split
    b = pid_bh // H
    h = pid_bh % H
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    offs_e = tl.arange(0, BLOCK_E)
    inv_s = _inverse_scale(SCALE, h, offs_d, D, KIND, ACC)
    q_base = Q + b * sqb + h * sqh
    k_base = K + b * skb + h * skh
    v_base = V + b * svb + h * svh
    do_base = DO + b * sdob + h * sdoh
    dq_base = DQ + b * sdqb + h * sdqh
    if CHUNKED:
        state, key_sum, value_sum = _load_state(S0, Z0, SV0, slot, offs_d, offs_e, BLOCK_D, BLOCK_E)
    else:
        state = tl.full((BLOCK_D, BLOCK_E), 0.0, dtype=ACC)
        key_sum = tl.full((BLOCK_D,), 0.0, dtype=ACC)
        value_sum = tl.full((BLOCK_E,), 0.0, dtype=ACC)
    start = split * tokens_per_split
    end = tl.minimum(start + tokens_per_split, N)
    for n0 in range(start, end, BLOCK_N):
        rows = n0 + offs_n
        q, q_mask, phi_q, phi_k, v, num, den = _causal_chunk(
            q_base, k_base, v_base, rows, offs_n, offs_d, offs_e, n0, end, sqn, skn, svn,
            state, key_sum, value_sum, eps, inv_s, D, E, KIND, POWER, ROWSUM_DEN, NORM_EPS, ACC, PRECISION)
        do, _ = _load_rows(do_base, rows, sdon, offs_e, E, end, ACC)
        g = do / den[:, None]
        d_scores = tl.dot(g, tl.trans(v), input_precision=PRECISION)
        r = tl.full((BLOCK_N,), 0.0, dtype=ACC)
        if ROWSUM_DEN:
            r = _sum(g * num, axis=1) / den
            d_scores -= r[:, None]
        attend = (offs_n[:, None] >= offs_n[None, :]) & (rows < end)[None, :]
        d_scores = tl.where(attend, d_scores, 0.0)
        d_phi_q = tl.dot(d_scores, phi_k, input_precision=PRECISION)
        d_phi_q += tl.dot(g, tl.trans(state), input_precision=PRECISION)
        if ROWSUM_DEN:
            d_phi_q -= r[:, None] * key_sum[None, :]
        dq = _feature_grad(q, d_phi_q, q_mask, inv_s, KIND, NORM_EPS, POWER)
        _store_rows(dq_base, rows, sdqn, offs_d, D, end, dq)
        tl.store(DEN + pid_bh * N + rows, den, mask=rows < end)
        tl.store(R + pid_bh * N + rows, r, mask=rows < end)
        state = tl.dot(tl.trans(phi_k), v, state, input_precision=PRECISION)
        key_sum += _sum(phi_k, axis=0)
        value_sum += _sum(v, axis=0)


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
    pid_bh = tl.program_id(0)
    split = tl.program_id(1)
    slot = pid_bh * tl.num_programs(1) + split
    b = pid_bh // H
    h = pid_bh % H
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    offs_e = tl.arange(0, BLOCK_E)
    inv_s = _inverse_scale(SCALE, h, offs_d, D, KIND, ACC)
    q_base = Q + b * sqb + h * sqh
    do_base = DO + b * sdob + h * sdoh
    rev_state = tl.full((BLOCK_D, BLOCK_E), 0.0, dtype=ACC)
    rev_r_phi_q = tl.full((BLOCK_D,), 0.0, dtype=ACC)
    rev_g = tl.full((BLOCK_E,), 0.0, dtype=ACC)
    start = split * tokens_per_split
    end = tl.minimum(start + tokens_per_split, N)
    for n0 in range(start, end, BLOCK_N):
        rows = n0 + offs_n
        row_valid = rows < end
        q, q_mask = _load_rows(q_base, rows, sqn, offs_d, D, end, ACC)
        do, _ = _load_rows(do_base, rows, sdon, offs_e, E, end, ACC)
        den = tl.load(DEN + pid_bh * N + rows, mask=row_valid, other=1.0)
        r = tl.load(R + pid_bh * N + rows, mask=row_valid, other=0.0)
        phi_q = _feature(q, q_mask, inv_s, KIND, NORM_EPS, POWER)
        g = do / den[:, None]
        rev_state = tl.dot(tl.trans(phi_q), g, rev_state, input_precision=PRECISION)
        rev_r_phi_q += _sum(r[:, None] * phi_q, axis=0)
        rev_g += _sum(g, axis=0)
    tl.store(RS_part + slot * BLOCK_D * BLOCK_E + offs_d[:, None] * BLOCK_E + offs_e[None, :], rev_state)
    tl.store(RZ_part + slot * BLOCK_D + offs_d, rev_r_phi_q)
    tl.store(RSV_part + slot * BLOCK_E + offs_e, rev_g)


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
    pid_bh = tl.program_id(0)
    split = tl.program_id(1)
    b = pid_bh // H
    h = pid_bh % H
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    offs_e = tl.arange(0, BLOCK_E)
    inv_s = _inverse_scale(SCALE, h, offs_d, D, KIND, ACC)
    q_base = Q + b * sqb + h * sqh
    k_base = K + b * skb + h * skh
    v_base = V + b * svb + h * svh
    do_base = DO + b * sdob + h * sdoh
    if CHUNKED:
        rev_state, rev_r_phi_q, rev_g = _load_state(RS0, RZ0, RSV0, pid_bh * tl.num_programs(1) + split, offs_d,
                                                    offs_e, BLOCK_D, BLOCK_E)
    else:
        rev_state = tl.full((BLOCK_D, BLOCK_E), 0.0, dtype=ACC)
        rev_r_phi_q = tl.full((BLOCK_D,), 0.0, dtype=ACC)
        rev_g = tl.full((BLOCK_E,), 0.0, dtype=ACC)
    start = split * tokens_per_split
    end = tl.minimum(start + tokens_per_split, N)
    n_chunks = (end - start + BLOCK_N - 1) // BLOCK_N
    for i in range(0, n_chunks):
        n0 = start + (n_chunks - 1 - i) * BLOCK_N
        rows = n0 + offs_n
        row_valid = rows < end
        q, q_mask = _load_rows(q_base, rows, sqn, offs_d, D, end, ACC)
        k, k_mask = _load_rows(k_base, rows, skn, offs_d, D, end, ACC)
        v, _ = _load_rows(v_base, rows, svn, offs_e, E, end, ACC)
        do, _ = _load_rows(do_base, rows, sdon, offs_e, E, end, ACC)
        den = tl.load(DEN + pid_bh * N + rows, mask=row_valid, other=1.0)
        r = tl.load(R + pid_bh * N + rows, mask=row_valid, other=0.0)
        phi_q = _feature(q, q_mask, inv_s, KIND, NORM_EPS, POWER)
        phi_k = _feature(k, k_mask, inv_s, KIND, NORM_EPS, POWER)
        g = do / den[:, None]
        attend = (offs_n[:, None] >= offs_n[None, :]) & row_valid[None, :]
        scores = tl.dot(phi_q, tl.trans(phi_k), input_precision=PRECISION)
        if KIND == 0:
            scores += 1.0
        scores = tl.where(attend, scores, 0.0)
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
        rev_state = tl.dot(tl.trans(phi_q), g, rev_state, input_precision=PRECISION)
        rev_r_phi_q += _sum(r[:, None] * phi_q, axis=0)
        rev_g += _sum(g, axis=0)
