"""Triton kernels of the grouped expert FFN (forward and backward).

Only ``@triton.jit`` code lives here; launchers and autograd are in ``memoe_fast/ops/triton_path.py``.

Slots are the T·k (token, choice) pairs sorted by expert: ``tok[s]`` is the token of slot ``s`` and
expert ``e`` owns slots ``offs[e] .. offs[e+1]``. Row-tile programs find their expert on the device
(``_tile_expert``), so the grid is an upper bound known without a host sync:
``cdiv(T·k, BLOCK_M) + E`` row tiles; the extra programs return at once.
"""
import triton
import triton.language as tl


@triton.jit
def _tile_expert(offs_ptr, pid_m, E, BLOCK_M: tl.constexpr):
    """(expert, first slot, end slot) of row tile ``pid_m``; expert = -1 past the last tile."""
    expert = pid_m * 0 - 1
    start = pid_m * 0
    end = pid_m * 0
    tiles = pid_m * 0
    for e in range(E):
        lo = tl.load(offs_ptr + e).to(tl.int64)
        hi = tl.load(offs_ptr + e + 1).to(tl.int64)
        nt = (hi - lo + BLOCK_M - 1) // BLOCK_M
        hit = (pid_m >= tiles) & (pid_m < tiles + nt)
        expert = tl.where(hit, e, expert)
        start = tl.where(hit, lo + (pid_m - tiles) * BLOCK_M, start)
        end = tl.where(hit, hi, end)
        tiles += nt
    return expert, start, end


@triton.jit
def _silu_parts(h):
    sig = 1.0 / (1.0 + tl.exp(-h))
    return h * sig, sig * (1.0 + h * (1.0 - sig))


@triton.jit
def _act_parts(h, ACT: tl.constexpr):
    """(act(h), act'(h)) in fp32 for the 2-layer experts: ACT 1 = exact GELU, 2 = tanh GELU, 3 = ReLU.
    tanh is written through the sigmoid, which every backend has."""
    if ACT == 2:
        c: tl.constexpr = 0.7978845608028654  # sqrt(2 / pi)
        z = c * (h + 0.044715 * h * h * h)
        t = 2.0 / (1.0 + tl.exp(-2.0 * z)) - 1.0
        y = 0.5 * h * (1.0 + t)
        dy = 0.5 * (1.0 + t) + 0.5 * h * (1.0 - t * t) * c * (1.0 + 3.0 * 0.044715 * h * h)
    elif ACT == 3:
        y = tl.maximum(h, 0.0)
        dy = tl.where(h > 0.0, 1.0, 0.0)
    else:
        cdf = 0.5 * (1.0 + tl.erf(h * 0.7071067811865476))
        y = h * cdf
        dy = cdf + h * tl.exp(-0.5 * h * h) * 0.3989422804014327
    return y, dy


@triton.jit
def _grouped_up_fwd_kernel(
    x_ptr,  # (T, D) tokens
    tok_ptr,  # (T*k,) int64 token of each expert-sorted slot
    offs_ptr,  # (E + 1,) int64 first slot of each expert
    w1_ptr,  # (E, F, D) gate_proj / c_fc
    w3_ptr,  # (E, F, D) up_proj (GLU)
    b1_ptr,  # (E, F) bias of w1 (HAS_B1)
    b3_ptr,  # (E, F) bias of w3 (HAS_B3)
    h_ptr,  # (T*k, F) out: pre-activation (SAVE)
    u_ptr,  # (T*k, F) out: up projection (GLU and SAVE)
    a_ptr,  # (T*k, F) out: act(h) [* u]
    D, F, E,
    stride_xt, stride_xd,
    stride_w1e, stride_w1f, stride_w1d,
    stride_w3e, stride_w3f, stride_w3d,
    stride_b1e, stride_b1f,
    stride_b3e, stride_b3f,
    GLU: tl.constexpr, ACT: tl.constexpr, HAS_B1: tl.constexpr, HAS_B3: tl.constexpr, SAVE: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):
    """Grid: (cdiv(T*k, BLOCK_M) + E, cdiv(F, BLOCK_N)). One program owns a BLOCK_M x BLOCK_N tile of
    one expert's hidden activations; its x rows are gathered by token on load."""
    pid_m = tl.program_id(0).to(tl.int64)
    pid_n = tl.program_id(1).to(tl.int64)
    expert, start, end = _tile_expert(offs_ptr, pid_m, E, BLOCK_M)
    if expert < 0:
        return
    rows = start + tl.arange(0, BLOCK_M)
    row_mask = rows < end
    token = tl.load(tok_ptr + rows, mask=row_mask, other=0).to(tl.int64)
    cols = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    col_mask = cols < F
    ks = tl.arange(0, BLOCK_K)
    acc_h = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    acc_u = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    w1_base = w1_ptr + expert * stride_w1e
    w3_base = w3_ptr + expert * stride_w3e
    for k0 in range(0, D, BLOCK_K):
        kk = k0 + ks
        k_mask = kk < D
        x = tl.load(x_ptr + token[:, None] * stride_xt + kk[None, :] * stride_xd,
                    mask=row_mask[:, None] & k_mask[None, :], other=0.0)
        w1 = tl.load(w1_base + cols[None, :] * stride_w1f + kk[:, None] * stride_w1d,
                     mask=col_mask[None, :] & k_mask[:, None], other=0.0)
        acc_h = tl.dot(x, w1, acc_h, input_precision=DOT_PRECISION)
        if GLU:
            w3 = tl.load(w3_base + cols[None, :] * stride_w3f + kk[:, None] * stride_w3d,
                         mask=col_mask[None, :] & k_mask[:, None], other=0.0)
            acc_u = tl.dot(x, w3, acc_u, input_precision=DOT_PRECISION)
    if HAS_B1:
        acc_h += tl.load(b1_ptr + expert * stride_b1e + cols * stride_b1f, mask=col_mask, other=0.0).to(tl.float32)[None, :]
    if HAS_B3:
        acc_u += tl.load(b3_ptr + expert * stride_b3e + cols * stride_b3f, mask=col_mask, other=0.0).to(tl.float32)[None, :]
    if GLU:
        act, _d = _silu_parts(acc_h)
        act = act * acc_u
    else:
        act, _d = _act_parts(acc_h, ACT)
    mask = row_mask[:, None] & col_mask[None, :]
    out_off = rows[:, None] * F + cols[None, :]
    tl.store(a_ptr + out_off, act.to(a_ptr.dtype.element_ty), mask=mask)
    if SAVE:
        tl.store(h_ptr + out_off, acc_h.to(h_ptr.dtype.element_ty), mask=mask)
        if GLU:
            tl.store(u_ptr + out_off, acc_u.to(u_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _grouped_down_kernel(
    a_ptr,  # (T*k, K) grouped rows: the activations (forward) or dh (backward dx)
    a2_ptr,  # (T*k, K) second grouped operand: du (HAS_SECOND)
    tok_ptr,  # (T*k,) int64 token of each slot
    offs_ptr,  # (E + 1,) int64 first slot of each expert
    w_ptr,  # (E, N, K) by strides: w2 (E, D, F) forward; w1 (E, F, D) seen as (E, D, F) for dx
    w2nd_ptr,  # (E, N, K) by strides: w3 for dx (HAS_SECOND)
    bias_ptr,  # (E, N) b2 (HAS_BIAS)
    coef_ptr,  # (T*k,) fp32 routing weight x token scale of each slot (HAS_COEF)
    y_ptr,  # (T*k, N) out: unscaled expert output, for the routing-weight gradient (SAVE_Y)
    host_ptr,  # (T, N) added in the epilogue (HAS_HOST, non-atomic only)
    out_ptr,  # (T, N) out: scatter target; fp32 accumulation buffer when ATOMIC
    N, K, E,
    stride_we, stride_wn, stride_wk,
    stride_w2e, stride_w2n, stride_w2k,
    stride_be, stride_bn,
    stride_ht, stride_hn,
    stride_ot, stride_on,
    HAS_SECOND: tl.constexpr, HAS_BIAS: tl.constexpr, HAS_COEF: tl.constexpr, SAVE_Y: tl.constexpr,
    HAS_HOST: tl.constexpr, ATOMIC: tl.constexpr, DOT_PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):
    """Grid: (cdiv(T*k, BLOCK_M) + E, cdiv(N, BLOCK_N)). One program owns a BLOCK_M x BLOCK_N tile of
    one expert's output rows and scatters it to the tokens' rows: a plain store when every token has
    one slot (k = 1), an fp32 atomic add otherwise; there is no separate combine pass."""
    pid_m = tl.program_id(0).to(tl.int64)
    pid_n = tl.program_id(1).to(tl.int64)
    expert, start, end = _tile_expert(offs_ptr, pid_m, E, BLOCK_M)
    if expert < 0:
        return
    rows = start + tl.arange(0, BLOCK_M)
    row_mask = rows < end
    cols = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    col_mask = cols < N
    ks = tl.arange(0, BLOCK_K)
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    w_base = w_ptr + expert * stride_we
    w2nd_base = w2nd_ptr + expert * stride_w2e
    for k0 in range(0, K, BLOCK_K):
        kk = k0 + ks
        k_mask = kk < K
        a = tl.load(a_ptr + rows[:, None] * K + kk[None, :], mask=row_mask[:, None] & k_mask[None, :], other=0.0)
        w = tl.load(w_base + cols[None, :] * stride_wn + kk[:, None] * stride_wk,
                    mask=col_mask[None, :] & k_mask[:, None], other=0.0)
        acc = tl.dot(a, w, acc, input_precision=DOT_PRECISION)
        if HAS_SECOND:
            a2 = tl.load(a2_ptr + rows[:, None] * K + kk[None, :], mask=row_mask[:, None] & k_mask[None, :], other=0.0)
            w2 = tl.load(w2nd_base + cols[None, :] * stride_w2n + kk[:, None] * stride_w2k,
                         mask=col_mask[None, :] & k_mask[:, None], other=0.0)
            acc = tl.dot(a2, w2, acc, input_precision=DOT_PRECISION)
    if HAS_BIAS:
        acc += tl.load(bias_ptr + expert * stride_be + cols * stride_bn, mask=col_mask, other=0.0).to(tl.float32)[None, :]
    mask = row_mask[:, None] & col_mask[None, :]
    if SAVE_Y:
        tl.store(y_ptr + rows[:, None] * N + cols[None, :], acc.to(y_ptr.dtype.element_ty), mask=mask)
    if HAS_COEF:
        acc = acc * tl.load(coef_ptr + rows, mask=row_mask, other=0.0)[:, None]
    token = tl.load(tok_ptr + rows, mask=row_mask, other=0).to(tl.int64)
    out_off = token[:, None] * stride_ot + cols[None, :] * stride_on
    if ATOMIC:
        tl.atomic_add(out_ptr + out_off, acc, mask=mask)
    else:
        if HAS_HOST:
            acc += tl.load(host_ptr + token[:, None] * stride_ht + cols[None, :] * stride_hn,
                           mask=mask, other=0.0).to(tl.float32)
        tl.store(out_ptr + out_off, acc.to(out_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _grouped_up_bwd_kernel(
    g_ptr,  # (T, D) gradient of the output
    tok_ptr,  # (T*k,) int64 token of each slot
    offs_ptr,  # (E + 1,) int64 first slot of each expert
    coef_ptr,  # (T*k,) fp32 routing weight x token scale of each slot
    w2_ptr,  # (E, D, F) down_proj / c_proj
    h_ptr,  # (T*k, F) saved pre-activation
    u_ptr,  # (T*k, F) saved up projection (GLU)
    y_ptr,  # (T*k, D) saved unscaled expert output (NEED_DCOEF)
    dh_ptr,  # (T*k, F) out: gradient of the pre-activation
    du_ptr,  # (T*k, F) out: gradient of the up projection (GLU)
    dcoef_ptr,  # (T*k,) fp32 out: gradient of coef (NEED_DCOEF)
    D, F, E,
    stride_gt, stride_gd,
    stride_w2e, stride_w2d, stride_w2f,
    GLU: tl.constexpr, ACT: tl.constexpr, NEED_DCOEF: tl.constexpr, DOT_PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):
    """Grid: (cdiv(T*k, BLOCK_M) + E, cdiv(F, BLOCK_N)). One program owns a BLOCK_M x BLOCK_N tile of
    da = coef · g[tok] @ W2[e] and turns it into dh (and du) through the activation's derivative; the
    programs of the first column block also reduce dcoef = g[tok] · y over D."""
    pid_m = tl.program_id(0).to(tl.int64)
    pid_n = tl.program_id(1).to(tl.int64)
    expert, start, end = _tile_expert(offs_ptr, pid_m, E, BLOCK_M)
    if expert < 0:
        return
    rows = start + tl.arange(0, BLOCK_M)
    row_mask = rows < end
    token = tl.load(tok_ptr + rows, mask=row_mask, other=0).to(tl.int64)
    cols = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    col_mask = cols < F
    ks = tl.arange(0, BLOCK_K)
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    w2_base = w2_ptr + expert * stride_w2e
    for k0 in range(0, D, BLOCK_K):
        kk = k0 + ks
        k_mask = kk < D
        g = tl.load(g_ptr + token[:, None] * stride_gt + kk[None, :] * stride_gd,
                    mask=row_mask[:, None] & k_mask[None, :], other=0.0)
        w2 = tl.load(w2_base + kk[:, None] * stride_w2d + cols[None, :] * stride_w2f,
                     mask=k_mask[:, None] & col_mask[None, :], other=0.0)
        acc = tl.dot(g.to(w2.dtype), w2, acc, input_precision=DOT_PRECISION)
    coef = tl.load(coef_ptr + rows, mask=row_mask, other=0.0)
    da = acc * coef[:, None]
    mask = row_mask[:, None] & col_mask[None, :]
    off = rows[:, None] * F + cols[None, :]
    h = tl.load(h_ptr + off, mask=mask, other=0.0).to(tl.float32)
    if GLU:
        u = tl.load(u_ptr + off, mask=mask, other=0.0).to(tl.float32)
        s, ds = _silu_parts(h)
        tl.store(du_ptr + off, (da * s).to(du_ptr.dtype.element_ty), mask=mask)
        tl.store(dh_ptr + off, (da * u * ds).to(dh_ptr.dtype.element_ty), mask=mask)
    else:
        _y, dg = _act_parts(h, ACT)
        tl.store(dh_ptr + off, (da * dg).to(dh_ptr.dtype.element_ty), mask=mask)
    if NEED_DCOEF:
        if pid_n == 0:
            dc = tl.zeros((BLOCK_M,), dtype=tl.float32)
            for k0 in range(0, D, BLOCK_K):
                kk = k0 + ks
                m2 = row_mask[:, None] & (kk[None, :] < D)
                g = tl.load(g_ptr + token[:, None] * stride_gt + kk[None, :] * stride_gd, mask=m2, other=0.0)
                y = tl.load(y_ptr + rows[:, None] * D + kk[None, :], mask=m2, other=0.0)
                dc += tl.sum(g.to(tl.float32) * y.to(tl.float32), axis=1)
            tl.store(dcoef_ptr + rows, dc, mask=row_mask)


@triton.jit
def _grouped_wgrad_kernel(
    l_ptr,  # (R_l, M) left rows: grouped (T*k, M) or token rows (T, M) gathered by tok (L_GATHER)
    r_ptr,  # (R_r, N) right rows: grouped (T*k, N) or token rows (T, N) gathered by tok (R_GATHER)
    tok_ptr,  # (T*k,) int64 token of each slot
    offs_ptr,  # (E + 1,) int64 first slot of each expert
    coef_ptr,  # (T*k,) fp32 scale of each left row (L_SCALE)
    dw_ptr,  # (E, M, N) out: per-expert weight gradient, contiguous
    db_ptr,  # (E, M) out: per-expert bias gradient = column sums of the scaled left rows (HAS_DB)
    M, N,
    stride_lr, stride_lc,
    stride_rr, stride_rc,
    L_GATHER: tl.constexpr, R_GATHER: tl.constexpr, L_SCALE: tl.constexpr, HAS_DB: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):
    """Grid: (cdiv(M, BLOCK_M), cdiv(N, BLOCK_N), E). One program owns a BLOCK_M x BLOCK_N tile of
    dW[e] = Σ_{slots s of e} L[s]^T R[s] and reduces over all of the expert's slots (zero for an
    expert without slots); no atomics, so the result is deterministic."""
    pid_m = tl.program_id(0).to(tl.int64)
    pid_n = tl.program_id(1).to(tl.int64)
    expert = tl.program_id(2).to(tl.int64)
    lo = tl.load(offs_ptr + expert).to(tl.int64)
    hi = tl.load(offs_ptr + expert + 1).to(tl.int64)
    ms = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    ns = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    m_mask = ms < M
    n_mask = ns < N
    ks = tl.arange(0, BLOCK_K)
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    db = tl.zeros((BLOCK_M,), dtype=tl.float32)
    for k0 in range(lo, hi, BLOCK_K):
        slots = k0 + ks
        k_mask = slots < hi
        if L_GATHER or R_GATHER:
            token = tl.load(tok_ptr + slots, mask=k_mask, other=0).to(tl.int64)
        if L_GATHER:
            l_rows = token
        else:
            l_rows = slots
        if R_GATHER:
            r_rows = token
        else:
            r_rows = slots
        lt = tl.load(l_ptr + l_rows[None, :] * stride_lr + ms[:, None] * stride_lc,
                     mask=k_mask[None, :] & m_mask[:, None], other=0.0)  # (BLOCK_M, BLOCK_K) = L^T tile
        r = tl.load(r_ptr + r_rows[:, None] * stride_rr + ns[None, :] * stride_rc,
                    mask=k_mask[:, None] & n_mask[None, :], other=0.0)
        if L_SCALE:
            c = tl.load(coef_ptr + slots, mask=k_mask, other=0.0)
            lt32 = lt.to(tl.float32) * c[None, :]
            lt = lt32.to(r.dtype)
            if HAS_DB:
                db += tl.sum(lt32, axis=1)
        elif HAS_DB:
            db += tl.sum(lt.to(tl.float32), axis=1)
        acc = tl.dot(lt.to(r.dtype), r, acc, input_precision=DOT_PRECISION)
    tl.store(dw_ptr + expert * M * N + ms[:, None] * N + ns[None, :], acc.to(dw_ptr.dtype.element_ty),
             mask=m_mask[:, None] & n_mask[None, :])
    if HAS_DB:
        if pid_n == 0:
            tl.store(db_ptr + expert * M + ms, db.to(db_ptr.dtype.element_ty), mask=m_mask)
