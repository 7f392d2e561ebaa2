"""Triton kernels for linear attention (the device code only; the wrapper is kernels/linear_attention.py).

This file is executed twice by `kernels.linear_attention._kernel_module`: once with Triton's
interpreter on (for CPU tensors) and once compiled (for CUDA tensors). `@triton.jit` reads
TRITON_INTERPRET when it decorates, so each copy gets consistent kernels *and* helpers no
matter which test module imported Triton first. Do not import this file directly.

Notation (all per (batch, head); rows are tokens, padded to BLOCK_N, columns padded to BLOCK_D/BLOCK_E):
  φ = feature map (KIND 0: L2 normalise = linear-affine, 1: elu+1, 2: relu)
  A_ij = C + φq_i·φk_j  (C = 1 for linear-affine: the "1 +" of the affine kernel, else 0)
  num_i = Σ_j A_ij v_j ,  rowsum_i = Σ_j A_ij  (j over all tokens, or j ≤ i when causal)
  den_i = count_i (affine, denominator=count) | rowsum_i (affine, kernel) | rowsum_i + eps (elu/relu)
  out_i = num_i / den_i
Backward (g_i = do_i/den_i, r_i = do_i·out_i/den_i; ROWSUM_DEN: den depends on rowsum, i.e. every
case but linear-affine with denominator=count; decided on the host):
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
def _feature(x, valid, KIND: tl.constexpr, NORM_EPS: tl.constexpr):
    """φ(x) for a (rows, cols) block; zero where `valid` is false (elu+1 would make padding 1)."""
    if KIND == 0:
        norm = tl.sqrt(_sum(x * x, axis=1))
        phi = x / tl.maximum(norm, NORM_EPS)[:, None]
    elif KIND == 1:
        phi = tl.where(x > 0, x + 1.0, tl.exp(x))
    else:
        phi = tl.maximum(x, 0.0)
    return tl.where(valid, phi, 0.0)


@_device
def _feature_grad(x, dphi, valid, KIND: tl.constexpr, NORM_EPS: tl.constexpr):
    """Vector-Jacobian product of φ at x: dφ -> dx (recomputes φ from x; nothing saved)."""
    if KIND == 0:
        norm = tl.sqrt(_sum(x * x, axis=1))
        clamped = tl.maximum(norm, NORM_EPS)
        y = x / clamped[:, None]
        proj = _sum(y * dphi, axis=1)
        # below NORM_EPS F.normalize divides by the constant eps: no projection term
        dx = tl.where((norm > NORM_EPS)[:, None], dphi - y * proj[:, None], dphi) / clamped[:, None]
    elif KIND == 1:
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
# bidirectional
# ----------------------------------------------------------------------------------------------


@triton.jit
def _bidir_state_kernel(
    K, V, S_part, Z_part, SV_part,
    H, N, tokens_per_split,
    skb, skh, skn, svb, svh, svn,
    D: tl.constexpr, E: tl.constexpr, KIND: tl.constexpr, NORM_EPS: tl.constexpr,
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
        phi_k = _feature(k, k_mask, KIND, NORM_EPS)
        state = tl.dot(tl.trans(phi_k), v, state, input_precision=PRECISION)
        key_sum += _sum(phi_k, axis=0)
        value_sum += _sum(v, axis=0)
    slot = pid_bh * n_splits + split
    tl.store(S_part + slot * BLOCK_D * BLOCK_E + offs_d[:, None] * BLOCK_E + offs_e[None, :], state)
    tl.store(Z_part + slot * BLOCK_D + offs_d, key_sum)
    tl.store(SV_part + slot * BLOCK_E + offs_e, value_sum)


@triton.jit
def _bidir_out_kernel(
    Q, S, Z, SV, O,
    H, N, eps,
    sqb, sqh, sqn, sob, soh, son,
    D: tl.constexpr, E: tl.constexpr, KIND: tl.constexpr, ROWSUM_DEN: tl.constexpr,
    NORM_EPS: tl.constexpr, ACC: tl.constexpr, PRECISION: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_E: tl.constexpr,
):
    """out = (φq S + C Σv) / den for one block of queries. Grid (B*H, cdiv(N, BLOCK_N))."""
    pid_bh = tl.program_id(0)
    b = pid_bh // H
    h = pid_bh % H
    offs_d = tl.arange(0, BLOCK_D)
    offs_e = tl.arange(0, BLOCK_E)
    rows = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    state = tl.load(S + pid_bh * BLOCK_D * BLOCK_E + offs_d[:, None] * BLOCK_E + offs_e[None, :])
    key_sum = tl.load(Z + pid_bh * BLOCK_D + offs_d)
    value_sum = tl.load(SV + pid_bh * BLOCK_E + offs_e)
    q, q_mask = _load_rows(Q + b * sqb + h * sqh, rows, sqn, offs_d, D, N, ACC)
    phi_q = _feature(q, q_mask, KIND, NORM_EPS)
    num = tl.dot(phi_q, state, input_precision=PRECISION)
    rowsum = _sum(phi_q * key_sum[None, :], axis=1)
    if KIND == 0:
        num += value_sum[None, :]
        rowsum += N
    den = _denominator(rowsum, N * 1.0, rows < N, eps, KIND, ROWSUM_DEN)
    _store_rows(O + b * sob + h * soh, rows, son, offs_e, E, N, num / den[:, None])


@triton.jit
def _bidir_bwd_query_kernel(
    Q, DO, S, Z, SV, DQ, DS_part, DZ_part, DSV_part,
    H, N, tokens_per_split, eps,
    sqb, sqh, sqn, sdob, sdoh, sdon, sdqb, sdqh, sdqn,
    D: tl.constexpr, E: tl.constexpr, KIND: tl.constexpr, ROWSUM_DEN: tl.constexpr,
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
        phi_q = _feature(q, q_mask, KIND, NORM_EPS)
        num = tl.dot(phi_q, state, input_precision=PRECISION)
        rowsum = _sum(phi_q * key_sum[None, :], axis=1)
        if KIND == 0:
            num += value_sum[None, :]
            rowsum += N
        den = _denominator(rowsum, N * 1.0, rows < end, eps, KIND, ROWSUM_DEN)
        g = do / den[:, None]
        d_phi_q = tl.dot(g, tl.trans(state), input_precision=PRECISION)
        if ROWSUM_DEN:
            r = _sum(g * num, axis=1) / den
            d_phi_q -= r[:, None] * key_sum[None, :]
            d_key_sum -= _sum(r[:, None] * phi_q, axis=0)
        dq = _feature_grad(q, d_phi_q, q_mask, KIND, NORM_EPS)
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
    K, V, DS, DZ, DSV, DK, DV,
    H, N,
    skb, skh, skn, svb, svh, svn, sdkb, sdkh, sdkn, sdvb, sdvh, sdvn,
    D: tl.constexpr, E: tl.constexpr, KIND: tl.constexpr, NORM_EPS: tl.constexpr,
    ACC: tl.constexpr, PRECISION: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_E: tl.constexpr,
):
    """dφk = v dSᵀ + dZ, dv = φk dS + dSV for one block of keys. Grid (B*H, cdiv(N, BLOCK_N))."""
    pid_bh = tl.program_id(0)
    b = pid_bh // H
    h = pid_bh % H
    offs_d = tl.arange(0, BLOCK_D)
    offs_e = tl.arange(0, BLOCK_E)
    rows = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    d_state = tl.load(DS + pid_bh * BLOCK_D * BLOCK_E + offs_d[:, None] * BLOCK_E + offs_e[None, :])
    d_key_sum = tl.load(DZ + pid_bh * BLOCK_D + offs_d)
    d_value_sum = tl.load(DSV + pid_bh * BLOCK_E + offs_e)
    k, k_mask = _load_rows(K + b * skb + h * skh, rows, skn, offs_d, D, N, ACC)
    v, _ = _load_rows(V + b * svb + h * svh, rows, svn, offs_e, E, N, ACC)
    phi_k = _feature(k, k_mask, KIND, NORM_EPS)
    d_phi_k = tl.dot(v, tl.trans(d_state), input_precision=PRECISION) + d_key_sum[None, :]
    dk = _feature_grad(k, d_phi_k, k_mask, KIND, NORM_EPS)
    dv = tl.dot(phi_k, d_state, input_precision=PRECISION) + d_value_sum[None, :]
    _store_rows(DK + b * sdkb + h * sdkh, rows, sdkn, offs_d, D, N, dk)
    _store_rows(DV + b * sdvb + h * sdvh, rows, sdvn, offs_e, E, N, dv)


# ----------------------------------------------------------------------------------------------
# causal: chunks of BLOCK_N tokens, masked product inside a chunk + running state of earlier chunks
# ----------------------------------------------------------------------------------------------


@_device
def _causal_chunk(
    q_base, k_base, v_base, rows, offs_n, offs_d, offs_e, n0, N, sqn, skn, svn, state, key_sum, value_sum, eps,
    D: tl.constexpr, E: tl.constexpr, KIND: tl.constexpr, ROWSUM_DEN: tl.constexpr,
    NORM_EPS: tl.constexpr, ACC: tl.constexpr, PRECISION: tl.constexpr,
):
    """Recompute one chunk of the forward: returns q, its mask, φq, φk, v, masked A, num, den."""
    q, q_mask = _load_rows(q_base, rows, sqn, offs_d, D, N, ACC)
    k, k_mask = _load_rows(k_base, rows, skn, offs_d, D, N, ACC)
    v, _ = _load_rows(v_base, rows, svn, offs_e, E, N, ACC)
    phi_q = _feature(q, q_mask, KIND, NORM_EPS)
    phi_k = _feature(k, k_mask, KIND, NORM_EPS)
    attend = (offs_n[:, None] >= offs_n[None, :]) & (rows < N)[None, :]
    scores = tl.dot(phi_q, tl.trans(phi_k), input_precision=PRECISION)
    if KIND == 0:
        scores += 1.0
    scores = tl.where(attend, scores, 0.0)
    num = tl.dot(scores, v, input_precision=PRECISION) + tl.dot(phi_q, state, input_precision=PRECISION)
    rowsum = _sum(scores, axis=1) + _sum(phi_q * key_sum[None, :], axis=1)
    if KIND == 0:
        num += value_sum[None, :]
        rowsum += n0
    den = _denominator(rowsum, (rows + 1).to(ACC), rows < N, eps, KIND, ROWSUM_DEN)
    return q, q_mask, phi_q, phi_k, v, scores, num, den


@triton.jit
def _causal_fwd_kernel(
    Q, K, V, O,
    H, N, eps,
    sqb, sqh, sqn, skb, skh, skn, svb, svh, svn, sob, soh, son,
    D: tl.constexpr, E: tl.constexpr, KIND: tl.constexpr, ROWSUM_DEN: tl.constexpr,
    NORM_EPS: tl.constexpr, ACC: tl.constexpr, PRECISION: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_E: tl.constexpr,
):
    """Causal forward, one program per (batch, head) sweeping the chunks in order. Grid (B*H,)."""
    pid_bh = tl.program_id(0)
    b = pid_bh // H
    h = pid_bh % H
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    offs_e = tl.arange(0, BLOCK_E)
    q_base = Q + b * sqb + h * sqh
    k_base = K + b * skb + h * skh
    v_base = V + b * svb + h * svh
    o_base = O + b * sob + h * soh
    state = tl.full((BLOCK_D, BLOCK_E), 0.0, dtype=ACC)
    key_sum = tl.full((BLOCK_D,), 0.0, dtype=ACC)
    value_sum = tl.full((BLOCK_E,), 0.0, dtype=ACC)
    for n0 in range(0, N, BLOCK_N):
        rows = n0 + offs_n
        q, q_mask, phi_q, phi_k, v, scores, num, den = _causal_chunk(
            q_base, k_base, v_base, rows, offs_n, offs_d, offs_e, n0, N, sqn, skn, svn,
            state, key_sum, value_sum, eps, D, E, KIND, ROWSUM_DEN, NORM_EPS, ACC, PRECISION)
        _store_rows(o_base, rows, son, offs_e, E, N, num / den[:, None])
        state = tl.dot(tl.trans(phi_k), v, state, input_precision=PRECISION)
        key_sum += _sum(phi_k, axis=0)
        value_sum += _sum(v, axis=0)


@triton.jit
def _causal_bwd_query_kernel(
    Q, K, V, DO, DQ, DEN, R,
    H, N, eps,
    sqb, sqh, sqn, skb, skh, skn, svb, svh, svn, sdob, sdoh, sdon, sdqb, sdqh, sdqn,
    D: tl.constexpr, E: tl.constexpr, KIND: tl.constexpr, ROWSUM_DEN: tl.constexpr,
    NORM_EPS: tl.constexpr, ACC: tl.constexpr, PRECISION: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_E: tl.constexpr,
):
    """dq by a forward sweep (recomputing the forward); writes the O(N) stats den and r. Grid (B*H,)."""
    pid_bh = tl.program_id(0)
    b = pid_bh // H
    h = pid_bh % H
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    offs_e = tl.arange(0, BLOCK_E)
    q_base = Q + b * sqb + h * sqh
    k_base = K + b * skb + h * skh
    v_base = V + b * svb + h * svh
    do_base = DO + b * sdob + h * sdoh
    dq_base = DQ + b * sdqb + h * sdqh
    state = tl.full((BLOCK_D, BLOCK_E), 0.0, dtype=ACC)
    key_sum = tl.full((BLOCK_D,), 0.0, dtype=ACC)
    value_sum = tl.full((BLOCK_E,), 0.0, dtype=ACC)
    for n0 in range(0, N, BLOCK_N):
        rows = n0 + offs_n
        q, q_mask, phi_q, phi_k, v, scores, num, den = _causal_chunk(
            q_base, k_base, v_base, rows, offs_n, offs_d, offs_e, n0, N, sqn, skn, svn,
            state, key_sum, value_sum, eps, D, E, KIND, ROWSUM_DEN, NORM_EPS, ACC, PRECISION)
        do, _ = _load_rows(do_base, rows, sdon, offs_e, E, N, ACC)
        g = do / den[:, None]
        d_scores = tl.dot(g, tl.trans(v), input_precision=PRECISION)
        r = tl.full((BLOCK_N,), 0.0, dtype=ACC)
        if ROWSUM_DEN:
            r = _sum(g * num, axis=1) / den
            d_scores -= r[:, None]
        attend = (offs_n[:, None] >= offs_n[None, :]) & (rows < N)[None, :]
        d_scores = tl.where(attend, d_scores, 0.0)
        d_phi_q = tl.dot(d_scores, phi_k, input_precision=PRECISION)
        d_phi_q += tl.dot(g, tl.trans(state), input_precision=PRECISION)
        if ROWSUM_DEN:
            d_phi_q -= r[:, None] * key_sum[None, :]
        dq = _feature_grad(q, d_phi_q, q_mask, KIND, NORM_EPS)
        _store_rows(dq_base, rows, sdqn, offs_d, D, N, dq)
        tl.store(DEN + pid_bh * N + rows, den, mask=rows < N)
        tl.store(R + pid_bh * N + rows, r, mask=rows < N)
        state = tl.dot(tl.trans(phi_k), v, state, input_precision=PRECISION)
        key_sum += _sum(phi_k, axis=0)
        value_sum += _sum(v, axis=0)


@triton.jit
def _causal_bwd_key_kernel(
    Q, K, V, DO, DEN, R, DK, DV,
    H, N,
    sqb, sqh, sqn, skb, skh, skn, svb, svh, svn, sdob, sdoh, sdon, sdkb, sdkh, sdkn, sdvb, sdvh, sdvn,
    D: tl.constexpr, E: tl.constexpr, KIND: tl.constexpr, ROWSUM_DEN: tl.constexpr,
    NORM_EPS: tl.constexpr, ACC: tl.constexpr, PRECISION: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_E: tl.constexpr,
):
    """dk, dv by a reverse sweep carrying Σ_{later} φq gᵀ, Σ_{later} r φq, Σ_{later} g. Grid (B*H,)."""
    pid_bh = tl.program_id(0)
    b = pid_bh // H
    h = pid_bh % H
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    offs_e = tl.arange(0, BLOCK_E)
    q_base = Q + b * sqb + h * sqh
    k_base = K + b * skb + h * skh
    v_base = V + b * svb + h * svh
    do_base = DO + b * sdob + h * sdoh
    rev_state = tl.full((BLOCK_D, BLOCK_E), 0.0, dtype=ACC)
    rev_r_phi_q = tl.full((BLOCK_D,), 0.0, dtype=ACC)
    rev_g = tl.full((BLOCK_E,), 0.0, dtype=ACC)
    n_chunks = (N + BLOCK_N - 1) // BLOCK_N
    for i in range(0, n_chunks):
        n0 = (n_chunks - 1 - i) * BLOCK_N
        rows = n0 + offs_n
        row_valid = rows < N
        q, q_mask = _load_rows(q_base, rows, sqn, offs_d, D, N, ACC)
        k, k_mask = _load_rows(k_base, rows, skn, offs_d, D, N, ACC)
        v, _ = _load_rows(v_base, rows, svn, offs_e, E, N, ACC)
        do, _ = _load_rows(do_base, rows, sdon, offs_e, E, N, ACC)
        den = tl.load(DEN + pid_bh * N + rows, mask=row_valid, other=1.0)
        r = tl.load(R + pid_bh * N + rows, mask=row_valid, other=0.0)
        phi_q = _feature(q, q_mask, KIND, NORM_EPS)
        phi_k = _feature(k, k_mask, KIND, NORM_EPS)
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
        dk = _feature_grad(k, d_phi_k, k_mask, KIND, NORM_EPS)
        _store_rows(DK + b * sdkb + h * sdkh, rows, sdkn, offs_d, D, N, dk)
        _store_rows(DV + b * sdvb + h * sdvh, rows, sdvn, offs_e, E, N, dv)
        rev_state = tl.dot(tl.trans(phi_q), g, rev_state, input_precision=PRECISION)
        rev_r_phi_q += _sum(r[:, None] * phi_q, axis=0)
        rev_g += _sum(g, axis=0)
