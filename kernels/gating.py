"""Triton kernels of the bypass gate, one kernel per job.

Only ``@triton.jit`` code lives here; launchers and autograd are in ``memoe_fast/ops/triton_path.py``.
The gate is ``W_x x_t + (W_a a + b)[s(t)]``: the anchor term is one launch over the S sequences
(``_gate_anchor_kernel``), then the token launch adds the per-sequence row it gathers, takes the
softmax and the top-k and counts the tokens per expert. E is small (4 to 16), so the logits are a
broadcast multiply and a row sum in fp32 over BLOCK_E = next_power_of_2(E) columns, not an MMA padded
to 16 columns.
"""
import triton
import triton.language as tl


@triton.jit
def _gate_anchor_kernel(
    anchor_ptr,  # (S, A) per-sequence anchors, any float dtype
    w_ptr,  # (E, A) the anchor block of the router weight
    bias_ptr,  # (E,) router bias, or None
    table_ptr,  # (S, E) fp32 out: per-sequence logits W_a a + b
    S, A, E,
    stride_as, stride_aa,
    stride_we, stride_wa,
    BLOCK_S: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_E: tl.constexpr,
):
    """Grid: (cdiv(S, BLOCK_S),). One program owns BLOCK_S sequences and all E logits of each."""
    pid = tl.program_id(0).to(tl.int64)
    rows = pid * BLOCK_S + tl.arange(0, BLOCK_S)
    row_mask = rows < S
    cols = tl.arange(0, BLOCK_E)
    col_mask = cols < E
    ks = tl.arange(0, BLOCK_K)
    acc = tl.zeros((BLOCK_S, BLOCK_E), dtype=tl.float32)
    for k0 in range(0, A, BLOCK_K):
        kk = k0 + ks
        a = tl.load(anchor_ptr + rows[:, None] * stride_as + kk[None, :] * stride_aa,
                    mask=row_mask[:, None] & (kk[None, :] < A), other=0.0).to(tl.float32)
        w = tl.load(w_ptr + cols[:, None] * stride_we + kk[None, :] * stride_wa,
                    mask=col_mask[:, None] & (kk[None, :] < A), other=0.0).to(tl.float32)
        acc += tl.sum(a[:, None, :] * w[None, :, :], axis=2)
    if bias_ptr is not None:
        acc += tl.load(bias_ptr + cols, mask=col_mask, other=0.0).to(tl.float32)[None, :]
    tl.store(table_ptr + rows[:, None] * E + cols[None, :], acc, mask=row_mask[:, None] & col_mask[None, :])


@triton.jit
def _gate_fwd_kernel(
    x_ptr,  # (T, D) tokens, any float dtype
    w_ptr,  # (E, D) the token block of the router weight
    table_ptr,  # (S, E) fp32 per-sequence logits from _gate_anchor_kernel
    seq_ptr,  # (T,) int64 sequence of each token
    noise_ptr,  # (T, E) added to the logits, or None
    probs_ptr,  # (T, E) fp32 out: softmax
    weights_ptr,  # (T, TOP_K) fp32 out: routing weights
    experts_ptr,  # (T, TOP_K) int64 out: chosen experts
    counts_ptr,  # (E,) int32 out: tokens per expert, atomically incremented (zeroed by the launcher)
    T, D, E, T_BUCKET,
    stride_xt, stride_xd,
    stride_we, stride_wd,
    stride_nt, stride_ne,
    RENORM: tl.constexpr, TOP_K: tl.constexpr,
    BLOCK_T: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_E: tl.constexpr,
):
    """Grid: (cdiv(T, BLOCK_T),). One program owns BLOCK_T tokens: their E logits (fp32, like the
    reference: no tf32 rounding of the gate), softmax, top-k (lowest index wins a tie) and counts."""
    pid = tl.program_id(0).to(tl.int64)
    rows = pid * BLOCK_T + tl.arange(0, BLOCK_T)
    row_mask = rows < T
    cols = tl.arange(0, BLOCK_E)
    col_mask = cols < E
    ks = tl.arange(0, BLOCK_K)
    acc = tl.zeros((BLOCK_T, BLOCK_E), dtype=tl.float32)
    for k0 in range(0, D, BLOCK_K):
        kk = k0 + ks
        x = tl.load(x_ptr + rows[:, None] * stride_xt + kk[None, :] * stride_xd,
                    mask=row_mask[:, None] & (kk[None, :] < D), other=0.0).to(tl.float32)
        w = tl.load(w_ptr + cols[:, None] * stride_we + kk[None, :] * stride_wd,
                    mask=col_mask[:, None] & (kk[None, :] < D), other=0.0).to(tl.float32)
        acc += tl.sum(x[:, None, :] * w[None, :, :], axis=2)
    mask2 = row_mask[:, None] & col_mask[None, :]
    seq = tl.load(seq_ptr + rows, mask=row_mask, other=0).to(tl.int64)
    acc += tl.load(table_ptr + seq[:, None] * E + cols[None, :], mask=mask2, other=0.0)
    if noise_ptr is not None:
        acc += tl.load(noise_ptr + rows[:, None] * stride_nt + cols[None, :] * stride_ne,
                       mask=mask2, other=0.0).to(tl.float32)
    logits = tl.where(col_mask[None, :], acc, float("-inf"))
    m = tl.max(logits, axis=1)
    p = tl.exp(logits - m[:, None])
    p = p / tl.sum(p, axis=1)[:, None]
    tl.store(probs_ptr + rows[:, None] * E + cols[None, :], p, mask=mask2)
    # Top-k by repeated arg-max; padded columns hold -1 and never win. A first pass sums the k
    # winners so that the second can store them renormalised.
    denom = tl.zeros((BLOCK_T,), dtype=tl.float32) + 1.0
    if RENORM:
        denom = tl.zeros((BLOCK_T,), dtype=tl.float32)
        q = tl.where(col_mask[None, :], p, -1.0)
        for _j in tl.static_range(TOP_K):
            best = tl.max(q, axis=1)
            idx = tl.min(tl.where(q == best[:, None], cols[None, :], BLOCK_E), axis=1)
            denom += best
            q = tl.where(cols[None, :] == idx[:, None], -1.0, q)
    q = tl.where(col_mask[None, :], p, -1.0)
    counts = tl.zeros((BLOCK_E,), dtype=tl.int32)
    for j in tl.static_range(TOP_K):
        best = tl.max(q, axis=1)
        idx = tl.min(tl.where(q == best[:, None], cols[None, :], BLOCK_E), axis=1)
        hit = (cols[None, :] == idx[:, None]) & row_mask[:, None]
        counts += tl.sum(hit.to(tl.int32), axis=0)
        q = tl.where(cols[None, :] == idx[:, None], -1.0, q)
        tl.store(weights_ptr + rows * TOP_K + j, best / denom, mask=row_mask)
        tl.store(experts_ptr + rows * TOP_K + j, idx.to(tl.int64), mask=row_mask)
    tl.atomic_add(counts_ptr + cols, counts, mask=col_mask, sem="relaxed")


@triton.jit
def _gate_bwd_kernel(
    probs_ptr,  # (T, E) fp32 softmax from the forward
    weights_ptr,  # (T, TOP_K) fp32 routing weights from the forward
    experts_ptr,  # (T, TOP_K) int64 chosen experts
    dprobs_ptr,  # (T, E) fp32 gradient of probs, or None
    dweights_ptr,  # (T, TOP_K) fp32 gradient of the routing weights, or None
    w_ptr,  # (E, D) the token block of the router weight
    dlogits_ptr,  # (T, E) fp32 out: gradient of the logits
    dx_ptr,  # (T, D) out: dlogits @ W_x, or None (x needs no gradient)
    T, D, E, T_BUCKET,
    stride_dpt, stride_dpe,
    stride_dwt, stride_dwk,
    stride_we, stride_wd,
    stride_dxt, stride_dxd,
    RENORM: tl.constexpr, TOP_K: tl.constexpr,
    BLOCK_T: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_E: tl.constexpr,
):
    """Grid: (cdiv(T, BLOCK_T),). One program owns BLOCK_T tokens: their logit gradient and their dx row."""
    pid = tl.program_id(0).to(tl.int64)
    rows = pid * BLOCK_T + tl.arange(0, BLOCK_T)
    row_mask = rows < T
    cols = tl.arange(0, BLOCK_E)
    col_mask = cols < E
    mask2 = row_mask[:, None] & col_mask[None, :]
    p = tl.load(probs_ptr + rows[:, None] * E + cols[None, :], mask=mask2, other=0.0)
    dp = tl.zeros((BLOCK_T, BLOCK_E), dtype=tl.float32)
    if dprobs_ptr is not None:
        dp += tl.load(dprobs_ptr + rows[:, None] * stride_dpt + cols[None, :] * stride_dpe, mask=mask2, other=0.0)
    if dweights_ptr is not None:
        # w_j = p_j / S (S = sum of the k chosen p): dp_j = (dw_j - sum_i dw_i w_i) / S
        denom = tl.zeros((BLOCK_T,), dtype=tl.float32) + 1.0
        wdot = tl.zeros((BLOCK_T,), dtype=tl.float32)
        if RENORM:
            denom = tl.zeros((BLOCK_T,), dtype=tl.float32)
            for j in tl.static_range(TOP_K):
                ej = tl.load(experts_ptr + rows * TOP_K + j, mask=row_mask, other=0)
                denom += tl.sum(tl.where(cols[None, :] == ej[:, None], p, 0.0), axis=1)
                wj = tl.load(weights_ptr + rows * TOP_K + j, mask=row_mask, other=0.0)
                dwj = tl.load(dweights_ptr + rows * stride_dwt + j * stride_dwk, mask=row_mask, other=0.0)
                wdot += wj * dwj
            denom = tl.where(row_mask, denom, 1.0)
        for j in tl.static_range(TOP_K):
            ej = tl.load(experts_ptr + rows * TOP_K + j, mask=row_mask, other=0)
            dwj = tl.load(dweights_ptr + rows * stride_dwt + j * stride_dwk, mask=row_mask, other=0.0)
            dp += tl.where(cols[None, :] == ej[:, None], ((dwj - wdot) / denom)[:, None], 0.0)
    dl = p * (dp - tl.sum(dp * p, axis=1)[:, None])
    tl.store(dlogits_ptr + rows[:, None] * E + cols[None, :], dl, mask=mask2)
    if dx_ptr is not None:
        ds = tl.arange(0, BLOCK_D)
        for d0 in range(0, D, BLOCK_D):
            dd = d0 + ds
            w = tl.load(w_ptr + cols[:, None] * stride_we + dd[None, :] * stride_wd,
                        mask=col_mask[:, None] & (dd[None, :] < D), other=0.0).to(tl.float32)
            dx = tl.sum(dl[:, :, None] * w[None, :, :], axis=1)
            tl.store(dx_ptr + rows[:, None] * stride_dxt + dd[None, :] * stride_dxd,
                     dx.to(dx_ptr.dtype.element_ty), mask=row_mask[:, None] & (dd[None, :] < D))


@triton.jit
def _gate_wgrad_kernel(
    dlogits_ptr,  # (T, E) fp32 gradient of the logits
    x_ptr,  # (T, D) tokens, any float dtype
    dw_ptr,  # (E, D) fp32 out: gradient of the token block of the router weight (zeroed by the launcher)
    T, D, E, tokens_per_program, T_BUCKET,
    stride_xt, stride_xd,
    BLOCK_T: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_E: tl.constexpr,
):
    """Grid: (cdiv(D, BLOCK_D), cdiv(T, tokens_per_program)). One program reduces dW_x[:, d-block] =
    Σ_t dlogits[t]^T x[t] over its run of tokens in fp32 (x is read in its own dtype, never copied to
    fp32) and adds it into dw with relaxed atomics."""
    pid_d = tl.program_id(0).to(tl.int64)
    pid_t = tl.program_id(1).to(tl.int64)
    dd = pid_d * BLOCK_D + tl.arange(0, BLOCK_D)
    d_mask = dd < D
    cols = tl.arange(0, BLOCK_E)
    col_mask = cols < E
    ts = tl.arange(0, BLOCK_T)
    acc = tl.zeros((BLOCK_E, BLOCK_D), dtype=tl.float32)
    t_lo = pid_t * tokens_per_program
    t_hi = tl.minimum(t_lo + tokens_per_program, T)
    for t0 in range(t_lo, t_hi, BLOCK_T):
        rows = t0 + ts
        r_mask = rows < t_hi
        dl = tl.load(dlogits_ptr + rows[:, None] * E + cols[None, :], mask=r_mask[:, None] & col_mask[None, :],
                     other=0.0)
        x = tl.load(x_ptr + rows[:, None] * stride_xt + dd[None, :] * stride_xd,
                    mask=r_mask[:, None] & d_mask[None, :], other=0.0).to(tl.float32)
        acc += tl.sum(dl[:, :, None] * x[:, None, :], axis=0)
    tl.atomic_add(dw_ptr + cols[:, None] * D + dd[None, :], acc, mask=col_mask[:, None] & d_mask[None, :],
                  sem="relaxed")
