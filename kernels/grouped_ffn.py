"""Triton kernels of the grouped expert FFN, one kernel per job (forward and backward).

Only ``@triton.jit`` code lives here; launchers, autotuning and autograd are in
``memoe_fast/ops/triton_path.py`` and ``memoe_fast/ops/triton_tuning.py``.

Slots are the T·k (token, choice) pairs sorted by expert: ``tok[s]`` is the token of slot ``s`` and
expert ``e`` owns slots ``offs[e] .. offs[e+1]``. Row-tile programs find their expert on the device
(``_tile_expert``), so the grid is an upper bound known without a host sync: ``cdiv(T·k, BLOCK_M) + E``
row tiles times the column tiles, in grouped (L2-aware) order; the extra programs return at once.

An optional operand (a bias, the saved expert output, the host output, the GLU's second projection)
is a pointer that is ``None`` when absent: the launcher passes ``None`` and the kernel tests
``ptr is not None`` at compile time, so no placeholder tensor stands in for it.

``T_BUCKET`` (the slot count rounded up to a power of two) is an autotune key only: the tile that
suits 512 slots is not the one that suits 16384.
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
def _grouped_order(pid, num_m, num_n, GROUP_M: tl.constexpr):
    """(pid_m, pid_n) of a 1-D program id in groups of GROUP_M row tiles, so that the programs running
    together share their column tiles of the weight in L2."""
    width = GROUP_M * num_n
    group = pid // width
    first_m = group * GROUP_M
    size_m = tl.minimum(num_m - first_m, GROUP_M)
    pid_m = first_m + (pid % width) % size_m
    pid_n = (pid % width) // size_m
    return pid_m, pid_n


@triton.jit
def _silu_parts(h):
    """(silu(h), silu'(h)) in fp32."""
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
def _expert_up_fwd_kernel(
    x_ptr,  # (T, D) tokens
    tok_ptr,  # (T*k,) int64 token of each expert-sorted slot
    offs_ptr,  # (E + 1,) int64 first slot of each expert
    w1_ptr,  # (E, F, D) the activation's input projection: gate_proj (GLU) or up_proj (2-layer)
    w3_ptr,  # (E, F, D) GLU up_proj, or None
    b1_ptr,  # (E, F) bias of w1, or None
    b3_ptr,  # (E, F) bias of w3, or None
    h_ptr,  # (T*k, F) out: pre-activation, or None (not saved)
    u_ptr,  # (T*k, F) out: GLU up projection, or None (not saved)
    a_ptr,  # (T*k, F) out: act(h) [* u]
    D, F, E, num_slots, T_BUCKET,
    stride_xt, stride_xd,
    stride_w1e, stride_w1f, stride_w1d,
    stride_w3e, stride_w3f, stride_w3d,
    stride_b1e, stride_b3e,
    ACT: tl.constexpr, DOT_PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
):
    """Grid: ((cdiv(T*k, BLOCK_M) + E) * cdiv(F, BLOCK_N),). One program owns a BLOCK_M x BLOCK_N tile of
    one expert's hidden activations; its x rows are gathered by token on load. ACT 0 is the GLU
    (silu(x w1) * (x w3)), else the 2-layer activation of ``_act_parts``."""
    pid_m, pid_n = _grouped_order(tl.program_id(0).to(tl.int64), tl.cdiv(num_slots, BLOCK_M) + E, tl.cdiv(F, BLOCK_N), GROUP_M)
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
    if w3_ptr is not None:
        acc_u = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    w1_base = w1_ptr + expert * stride_w1e
    w3_base = w3_ptr + expert * stride_w3e if w3_ptr is not None else w1_base
    for k0 in range(0, D, BLOCK_K):
        kk = k0 + ks
        k_mask = kk < D
        x = tl.load(x_ptr + token[:, None] * stride_xt + kk[None, :] * stride_xd,
                    mask=row_mask[:, None] & k_mask[None, :], other=0.0)
        w1 = tl.load(w1_base + cols[None, :] * stride_w1f + kk[:, None] * stride_w1d,
                     mask=col_mask[None, :] & k_mask[:, None], other=0.0)
        acc_h = tl.dot(x, w1, acc_h, input_precision=DOT_PRECISION)
        if w3_ptr is not None:
            w3 = tl.load(w3_base + cols[None, :] * stride_w3f + kk[:, None] * stride_w3d,
                         mask=col_mask[None, :] & k_mask[:, None], other=0.0)
            acc_u = tl.dot(x, w3, acc_u, input_precision=DOT_PRECISION)
    if b1_ptr is not None:
        acc_h += tl.load(b1_ptr + expert * stride_b1e + cols, mask=col_mask, other=0.0).to(tl.float32)[None, :]
    if w3_ptr is not None:
        if b3_ptr is not None:
            acc_u += tl.load(b3_ptr + expert * stride_b3e + cols, mask=col_mask, other=0.0).to(tl.float32)[None, :]
        act, _ds = _silu_parts(acc_h)
        act = act * acc_u
    else:
        act, _ds = _act_parts(acc_h, ACT)
    mask = row_mask[:, None] & col_mask[None, :]
    out_off = rows[:, None] * F + cols[None, :]
    tl.store(a_ptr + out_off, act.to(a_ptr.dtype.element_ty), mask=mask)
    if h_ptr is not None:
        tl.store(h_ptr + out_off, acc_h.to(h_ptr.dtype.element_ty), mask=mask)
    if u_ptr is not None:
        tl.store(u_ptr + out_off, acc_u.to(u_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _expert_down_fwd_kernel(
    a_ptr,  # (T*k, F) hidden activations, expert-sorted
    tok_ptr,  # (T*k,) int64 token of each slot
    offs_ptr,  # (E + 1,) int64 first slot of each expert
    w2_ptr,  # (E, D, F) down_proj
    b2_ptr,  # (E, D) down_bias, or None
    coef_ptr,  # (T*k,) fp32 routing weight x token scale of each slot
    y_ptr,  # (T*k, D) out: unscaled expert output (for the routing-weight gradient), or None
    host_ptr,  # (T, D) host output added in the epilogue (store variant only), or None
    out_ptr,  # (T, D) out: x's dtype (ATOMIC=False, one slot per token) or fp32 accumulator (ATOMIC)
    D, F, E, num_slots, T_BUCKET,
    stride_w2e, stride_w2d, stride_w2f,
    stride_b2e,
    stride_ht, stride_hd,
    stride_ot, stride_od,
    ATOMIC: tl.constexpr, DOT_PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
):
    """Grid: ((cdiv(T*k, BLOCK_M) + E) * cdiv(D, BLOCK_N),). One program owns a BLOCK_M x BLOCK_N tile of
    one expert's output rows and scatters coef · (a W2^T + b2) to the tokens' rows: a plain store when
    every token has one slot (k = 1), a relaxed fp32 atomic add otherwise (no separate combine pass)."""
    pid_m, pid_n = _grouped_order(tl.program_id(0).to(tl.int64), tl.cdiv(num_slots, BLOCK_M) + E, tl.cdiv(D, BLOCK_N), GROUP_M)
    expert, start, end = _tile_expert(offs_ptr, pid_m, E, BLOCK_M)
    if expert < 0:
        return
    rows = start + tl.arange(0, BLOCK_M)
    row_mask = rows < end
    cols = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    col_mask = cols < D
    ks = tl.arange(0, BLOCK_K)
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    w_base = w2_ptr + expert * stride_w2e
    for k0 in range(0, F, BLOCK_K):
        kk = k0 + ks
        k_mask = kk < F
        a = tl.load(a_ptr + rows[:, None] * F + kk[None, :], mask=row_mask[:, None] & k_mask[None, :], other=0.0)
        w = tl.load(w_base + cols[None, :] * stride_w2d + kk[:, None] * stride_w2f,
                    mask=col_mask[None, :] & k_mask[:, None], other=0.0)
        acc = tl.dot(a, w, acc, input_precision=DOT_PRECISION)
    if b2_ptr is not None:
        acc += tl.load(b2_ptr + expert * stride_b2e + cols, mask=col_mask, other=0.0).to(tl.float32)[None, :]
    mask = row_mask[:, None] & col_mask[None, :]
    if y_ptr is not None:
        tl.store(y_ptr + rows[:, None] * D + cols[None, :], acc.to(y_ptr.dtype.element_ty), mask=mask)
    acc = acc * tl.load(coef_ptr + rows, mask=row_mask, other=0.0)[:, None]
    token = tl.load(tok_ptr + rows, mask=row_mask, other=0).to(tl.int64)
    out_off = token[:, None] * stride_ot + cols[None, :] * stride_od
    if ATOMIC:
        tl.atomic_add(out_ptr + out_off, acc, mask=mask, sem="relaxed")
    else:
        if host_ptr is not None:
            acc += tl.load(host_ptr + token[:, None] * stride_ht + cols[None, :] * stride_hd,
                           mask=mask, other=0.0).to(tl.float32)
        tl.store(out_ptr + out_off, acc.to(out_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _expert_up_bwd_kernel(
    g_ptr,  # (T, D) gradient of the output
    tok_ptr,  # (T*k,) int64 token of each slot
    offs_ptr,  # (E + 1,) int64 first slot of each expert
    coef_ptr,  # (T*k,) fp32 routing weight x token scale of each slot
    w2_ptr,  # (E, D, F) down_proj
    h_ptr,  # (T*k, F) saved pre-activation
    u_ptr,  # (T*k, F) saved GLU up projection, or None (2-layer experts)
    y_ptr,  # (T*k, D) saved unscaled expert output, or None (no routing-weight gradient)
    dh_ptr,  # (T*k, F) out: gradient of the pre-activation
    du_ptr,  # (T*k, F) out: gradient of the GLU up projection, or None
    dcoef_ptr,  # (T*k,) fp32 out: gradient of coef, or None
    D, F, E, num_slots, T_BUCKET,
    stride_gt, stride_gd,
    stride_w2e, stride_w2d, stride_w2f,
    ACT: tl.constexpr, DOT_PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
):
    """Grid: ((cdiv(T*k, BLOCK_M) + E) * cdiv(F, BLOCK_N),). One program owns a BLOCK_M x BLOCK_N tile of
    da = coef · g[tok] @ W2[e] and turns it into dh (and du) through the activation's derivative; the
    programs of the first column tile also reduce dcoef = g[tok] · y over D."""
    pid_m, pid_n = _grouped_order(tl.program_id(0).to(tl.int64), tl.cdiv(num_slots, BLOCK_M) + E, tl.cdiv(F, BLOCK_N), GROUP_M)
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
    if u_ptr is not None:
        u = tl.load(u_ptr + off, mask=mask, other=0.0).to(tl.float32)
        s, ds = _silu_parts(h)
        tl.store(du_ptr + off, (da * s).to(du_ptr.dtype.element_ty), mask=mask)
        tl.store(dh_ptr + off, (da * u * ds).to(dh_ptr.dtype.element_ty), mask=mask)
    else:
        _y, dg = _act_parts(h, ACT)
        tl.store(dh_ptr + off, (da * dg).to(dh_ptr.dtype.element_ty), mask=mask)
    if dcoef_ptr is not None:
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
def _expert_dx_kernel(
    dh_ptr,  # (T*k, F) gradient of the pre-activation, expert-sorted
    du_ptr,  # (T*k, F) gradient of the GLU up projection, or None (2-layer experts)
    tok_ptr,  # (T*k,) int64 token of each slot
    offs_ptr,  # (E + 1,) int64 first slot of each expert
    w1_ptr,  # (E, F, D) the activation's input projection
    w3_ptr,  # (E, F, D) GLU up_proj, or None
    dx_ptr,  # (T, D) out: x's dtype (ATOMIC=False) or fp32 accumulator (ATOMIC)
    D, F, E, num_slots, T_BUCKET,
    stride_w1e, stride_w1f, stride_w1d,
    stride_w3e, stride_w3f, stride_w3d,
    stride_dxt, stride_dxd,
    ATOMIC: tl.constexpr, DOT_PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
):
    """Grid: ((cdiv(T*k, BLOCK_M) + E) * cdiv(D, BLOCK_N),). One program owns a BLOCK_M x BLOCK_N tile of
    dx rows = dh @ W1[e] (+ du @ W3[e]) and scatters it to the tokens' rows (relaxed fp32 atomics when a
    token has several slots). Two operand pairs per K step: its own autotune cache, sized for that."""
    pid_m, pid_n = _grouped_order(tl.program_id(0).to(tl.int64), tl.cdiv(num_slots, BLOCK_M) + E, tl.cdiv(D, BLOCK_N), GROUP_M)
    expert, start, end = _tile_expert(offs_ptr, pid_m, E, BLOCK_M)
    if expert < 0:
        return
    rows = start + tl.arange(0, BLOCK_M)
    row_mask = rows < end
    cols = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    col_mask = cols < D
    ks = tl.arange(0, BLOCK_K)
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    w1_base = w1_ptr + expert * stride_w1e
    w3_base = w3_ptr + expert * stride_w3e if w3_ptr is not None else w1_base
    for k0 in range(0, F, BLOCK_K):
        kk = k0 + ks
        k_mask = kk < F
        m2 = row_mask[:, None] & k_mask[None, :]
        wm = k_mask[:, None] & col_mask[None, :]
        dh = tl.load(dh_ptr + rows[:, None] * F + kk[None, :], mask=m2, other=0.0)
        w1 = tl.load(w1_base + kk[:, None] * stride_w1f + cols[None, :] * stride_w1d, mask=wm, other=0.0)
        acc = tl.dot(dh, w1, acc, input_precision=DOT_PRECISION)
        if du_ptr is not None:
            du = tl.load(du_ptr + rows[:, None] * F + kk[None, :], mask=m2, other=0.0)
            w3 = tl.load(w3_base + kk[:, None] * stride_w3f + cols[None, :] * stride_w3d, mask=wm, other=0.0)
            acc = tl.dot(du, w3, acc, input_precision=DOT_PRECISION)
    mask = row_mask[:, None] & col_mask[None, :]
    token = tl.load(tok_ptr + rows, mask=row_mask, other=0).to(tl.int64)
    out_off = token[:, None] * stride_dxt + cols[None, :] * stride_dxd
    if ATOMIC:
        tl.atomic_add(dx_ptr + out_off, acc, mask=mask, sem="relaxed")
    else:
        tl.store(dx_ptr + out_off, acc.to(dx_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _expert_wgrad_in_kernel(
    dy_ptr,  # (T*k, F) expert-sorted gradient of a first-layer output (dh or du)
    x_ptr,  # (T, D) tokens, gathered by tok
    tok_ptr,  # (T*k,) int64 token of each slot
    offs_ptr,  # (E + 1,) int64 first slot of each expert
    dw_ptr,  # (E, F, D) out: contiguous weight gradient
    db_ptr,  # (E, F) out: bias gradient (column sums of dy per expert), or None
    F, D, T_BUCKET,
    stride_xt, stride_xd,
    DOT_PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
):
    """Grid: (cdiv(F, BLOCK_M) * cdiv(D, BLOCK_N), E). One program owns a BLOCK_M x BLOCK_N tile of
    dW[e] = Σ_{slots s of e} dy[s]^T x[tok[s]] and reduces over all of the expert's slots (zero for an
    expert without slots); no atomics, so the result is deterministic."""
    pid_m, pid_n = _grouped_order(tl.program_id(0).to(tl.int64), tl.cdiv(F, BLOCK_M), tl.cdiv(D, BLOCK_N), GROUP_M)
    expert = tl.program_id(1).to(tl.int64)
    lo = tl.load(offs_ptr + expert).to(tl.int64)
    hi = tl.load(offs_ptr + expert + 1).to(tl.int64)
    ms = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    ns = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    m_mask = ms < F
    n_mask = ns < D
    ks = tl.arange(0, BLOCK_K)
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    db = tl.zeros((BLOCK_M,), dtype=tl.float32)
    for k0 in range(lo, hi, BLOCK_K):
        slots = k0 + ks
        k_mask = slots < hi
        token = tl.load(tok_ptr + slots, mask=k_mask, other=0).to(tl.int64)
        dyt = tl.load(dy_ptr + slots[None, :] * F + ms[:, None], mask=k_mask[None, :] & m_mask[:, None], other=0.0)
        x = tl.load(x_ptr + token[:, None] * stride_xt + ns[None, :] * stride_xd,
                    mask=k_mask[:, None] & n_mask[None, :], other=0.0)
        if db_ptr is not None:
            db += tl.sum(dyt.to(tl.float32), axis=1)
        acc = tl.dot(dyt.to(x.dtype), x, acc, input_precision=DOT_PRECISION)
    tl.store(dw_ptr + expert * F * D + ms[:, None] * D + ns[None, :], acc.to(dw_ptr.dtype.element_ty),
             mask=m_mask[:, None] & n_mask[None, :])
    if db_ptr is not None:
        if pid_n == 0:
            tl.store(db_ptr + expert * F + ms, db.to(db_ptr.dtype.element_ty), mask=m_mask)


@triton.jit
def _expert_wgrad_down_kernel(
    g_ptr,  # (T, D) gradient of the output, gathered by tok
    a_ptr,  # (T*k, F) expert-sorted hidden activations
    tok_ptr,  # (T*k,) int64 token of each slot
    offs_ptr,  # (E + 1,) int64 first slot of each expert
    coef_ptr,  # (T*k,) fp32 routing weight x token scale of each slot
    dw_ptr,  # (E, D, F) out: contiguous down_proj gradient
    db_ptr,  # (E, D) out: down_bias gradient, or None
    D, F, T_BUCKET,
    stride_gt, stride_gd,
    DOT_PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
):
    """Grid: (cdiv(D, BLOCK_M) * cdiv(F, BLOCK_N), E). One program owns a BLOCK_M x BLOCK_N tile of
    dW2[e] = Σ_{slots s of e} (coef[s] · g[tok[s]])^T a[s], reduced over all of the expert's slots."""
    pid_m, pid_n = _grouped_order(tl.program_id(0).to(tl.int64), tl.cdiv(D, BLOCK_M), tl.cdiv(F, BLOCK_N), GROUP_M)
    expert = tl.program_id(1).to(tl.int64)
    lo = tl.load(offs_ptr + expert).to(tl.int64)
    hi = tl.load(offs_ptr + expert + 1).to(tl.int64)
    ms = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    ns = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    m_mask = ms < D
    n_mask = ns < F
    ks = tl.arange(0, BLOCK_K)
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    db = tl.zeros((BLOCK_M,), dtype=tl.float32)
    for k0 in range(lo, hi, BLOCK_K):
        slots = k0 + ks
        k_mask = slots < hi
        token = tl.load(tok_ptr + slots, mask=k_mask, other=0).to(tl.int64)
        gt = tl.load(g_ptr + token[None, :] * stride_gt + ms[:, None] * stride_gd,
                     mask=k_mask[None, :] & m_mask[:, None], other=0.0)
        a = tl.load(a_ptr + slots[:, None] * F + ns[None, :], mask=k_mask[:, None] & n_mask[None, :], other=0.0)
        c = tl.load(coef_ptr + slots, mask=k_mask, other=0.0)
        gt32 = gt.to(tl.float32) * c[None, :]
        if db_ptr is not None:
            db += tl.sum(gt32, axis=1)
        acc = tl.dot(gt32.to(a.dtype), a, acc, input_precision=DOT_PRECISION)
    tl.store(dw_ptr + expert * D * F + ms[:, None] * F + ns[None, :], acc.to(dw_ptr.dtype.element_ty),
             mask=m_mask[:, None] & n_mask[None, :])
    if db_ptr is not None:
        if pid_n == 0:
            tl.store(db_ptr + expert * D + ms, db.to(db_ptr.dtype.element_ty), mask=m_mask)
