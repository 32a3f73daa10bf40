"""Triton kernels of the bypass gate: logits without the concat, softmax, noise, top-k, counts.

Only ``@triton.jit`` code lives here; launchers and autograd are in ``memoe_fast/ops/triton_path.py``.
The gate is ``W_x x_t + (W_a a)[s(t)]``: the anchor term is one launch over the S anchors
(``FINALIZE=False``, raw logits), then the token launch adds the per-sequence row it gathers.
"""
import triton
import triton.language as tl


@triton.jit
def _gate_fwd_kernel(
    x_ptr,  # (N, K) token rows (or anchor rows), any float dtype
    w_ptr,  # (E, K) the matching column block of w_gate
    table_ptr,  # (S, E) fp32 per-sequence logits added to each row (HAS_TABLE)
    seq_ptr,  # (N,) int64 sequence of each row (HAS_TABLE)
    noise_ptr,  # (N, E) added to the logits (HAS_NOISE)
    logits_ptr,  # (N, E) fp32 raw logits, written when not FINALIZE
    probs_ptr,  # (N, E) fp32 softmax (FINALIZE)
    weights_ptr,  # (N, TOP_K) fp32 routing weights (FINALIZE)
    experts_ptr,  # (N, TOP_K) int64 chosen experts (FINALIZE)
    counts_ptr,  # (E,) int32 tokens per expert, atomically incremented (FINALIZE)
    N, K, E,
    stride_xn, stride_xk,
    stride_we, stride_wk,
    stride_tn, stride_te,
    stride_nn, stride_ne,
    HAS_TABLE: tl.constexpr, HAS_NOISE: tl.constexpr, FINALIZE: tl.constexpr, RENORM: tl.constexpr,
    TOP_K: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_E: tl.constexpr,
):
    """Grid: (cdiv(N, BLOCK_N),). One program owns BLOCK_N rows and all E logits of each."""
    pid = tl.program_id(0).to(tl.int64)
    rows = pid * BLOCK_N + tl.arange(0, BLOCK_N)
    row_mask = rows < N
    cols = tl.arange(0, BLOCK_E)
    col_mask = cols < E
    ks = tl.arange(0, BLOCK_K)
    acc = tl.zeros((BLOCK_N, BLOCK_E), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        kk = k0 + ks
        x = tl.load(x_ptr + rows[:, None] * stride_xn + kk[None, :] * stride_xk,
                    mask=row_mask[:, None] & (kk[None, :] < K), other=0.0).to(tl.float32)
        w = tl.load(w_ptr + cols[None, :] * stride_we + kk[:, None] * stride_wk,
                    mask=col_mask[None, :] & (kk[:, None] < K), other=0.0).to(tl.float32)
        # fp32 logits like the reference: no tf32 rounding of the gate
        acc = tl.dot(x, w, acc, input_precision="ieee")
    mask2 = row_mask[:, None] & col_mask[None, :]
    if HAS_TABLE:
        seq = tl.load(seq_ptr + rows, mask=row_mask, other=0).to(tl.int64)
        acc += tl.load(table_ptr + seq[:, None] * stride_tn + cols[None, :] * stride_te, mask=mask2, other=0.0)
    if HAS_NOISE:
        acc += tl.load(noise_ptr + rows[:, None] * stride_nn + cols[None, :] * stride_ne,
                       mask=mask2, other=0.0).to(tl.float32)
    if not FINALIZE:
        tl.store(logits_ptr + rows[:, None] * E + cols[None, :], acc, mask=mask2)
    else:
        logits = tl.where(col_mask[None, :], acc, float("-inf"))
        m = tl.max(logits, axis=1)
        p = tl.exp(logits - m[:, None])
        p = p / tl.sum(p, axis=1)[:, None]
        tl.store(probs_ptr + rows[:, None] * E + cols[None, :], p, mask=mask2)
        # Top-k by repeated arg-max (lowest index wins a tie); padded columns hold -1 and never win.
        # A first pass sums the k winners so the second can store them renormalised.
        denom = tl.zeros((BLOCK_N,), dtype=tl.float32) + 1.0
        if RENORM:
            denom = tl.zeros((BLOCK_N,), dtype=tl.float32)
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
        tl.atomic_add(counts_ptr + cols, counts, mask=col_mask)


@triton.jit
def _gate_bwd_kernel(
    probs_ptr,  # (T, E) fp32 softmax from the forward
    weights_ptr,  # (T, TOP_K) fp32 routing weights from the forward
    experts_ptr,  # (T, TOP_K) int64 chosen experts
    dprobs_ptr,  # (T, E) fp32 gradient of probs (HAS_DPROBS)
    dweights_ptr,  # (T, TOP_K) fp32 gradient of the routing weights (HAS_DWEIGHTS)
    w_ptr,  # (E, D) the x block of w_gate (NEED_DX)
    dlogits_ptr,  # (T, E) fp32 out: gradient of the logits
    dx_ptr,  # (T, D) out: dlogits @ W_x (NEED_DX)
    T, D, E,
    stride_dpt, stride_dpe,
    stride_dwt, stride_dwk,
    stride_we, stride_wd,
    stride_dxt, stride_dxd,
    HAS_DPROBS: tl.constexpr, HAS_DWEIGHTS: tl.constexpr, RENORM: tl.constexpr, NEED_DX: tl.constexpr,
    TOP_K: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_E: tl.constexpr,
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
    if HAS_DPROBS:
        dp += tl.load(dprobs_ptr + rows[:, None] * stride_dpt + cols[None, :] * stride_dpe, mask=mask2, other=0.0)
    if HAS_DWEIGHTS:
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
    if NEED_DX:
        ds = tl.arange(0, BLOCK_D)
        for d0 in range(0, D, BLOCK_D):
            dd = d0 + ds
            w = tl.load(w_ptr + cols[:, None] * stride_we + dd[None, :] * stride_wd,
                        mask=col_mask[:, None] & (dd[None, :] < D), other=0.0).to(tl.float32)
            dx = tl.dot(dl, w, input_precision="ieee")
            tl.store(dx_ptr + rows[:, None] * stride_dxt + dd[None, :] * stride_dxd,
                     dx.to(dx_ptr.dtype.element_ty), mask=row_mask[:, None] & (dd[None, :] < D))
