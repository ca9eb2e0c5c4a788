"""Flash-attention backward from the *final* out and lse.

In a ring, (out, lse) are the merge of many partials; recomputing each step's
probabilities as ``exp(q k^T * scale - lse)`` with the final lse gives exactly
that step's share of the full softmax, so every step's gradients are exact.

Three kernels, none with atomics (deterministic):
  * ``_bwd_preprocess``: delta = rowsum(dout * out), per query row.
  * ``_bwd_dkdv_kernel``: one program per (kv block, kv head); it walks every
    query head of its GQA group and every query block that can see it, so
    dk/dv of a kv head are summed in registers.
  * ``_bwd_dq_kernel``: one program per (query block, query head), walking
    the kv blocks its rows can see.
Each may add into existing gradient buffers (``accumulate``), which the ring
backward uses to sum contributions over steps.
"""
import math

import torch
import triton
import triton.language as tl

from ._launch import launch
from .flash_fwd import CPU_CONFIG, LOG2_E, dot_precision, tile_mask, visible_kv_range


@triton.jit
def _bwd_preprocess(
    Out, DOut, Delta,
    stride_ob, stride_os, stride_oh, stride_od,
    stride_gb, stride_gs, stride_gh, stride_gd,
    seqlen_q, num_heads, HEAD_DIM: tl.constexpr,
    BLOCK_D: tl.constexpr, BLOCK_M: tl.constexpr,
):
    pid_m = tl.program_id(0)
    pid_bh = tl.program_id(1)
    b = (pid_bh // num_heads).to(tl.int64)  # int64: batch offsets of large tensors pass 2**31
    h = pid_bh % num_heads
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    tile_ok = (offs_m[:, None] < seqlen_q) & (offs_d[None, :] < HEAD_DIM)
    o = tl.load(Out + b * stride_ob + h * stride_oh + offs_m[:, None] * stride_os + offs_d[None, :] * stride_od,
                mask=tile_ok, other=0.0).to(tl.float32)
    do = tl.load(DOut + b * stride_gb + h * stride_gh + offs_m[:, None] * stride_gs + offs_d[None, :] * stride_gd,
                 mask=tile_ok, other=0.0).to(tl.float32)
    # Delta is a contiguous (B, H, Sq) float32 scratch buffer.
    tl.store(Delta + pid_bh * seqlen_q + offs_m, tl.sum(o * do, 1), mask=offs_m < seqlen_q)


@triton.jit
def _load_row_stats(Lse, Delta, lse_base, delta_base, stride_ls, stride_ds, rows, seqlen_q):
    """lse (scaled to base 2) and delta for query rows; rows without keys get +inf so p = 0."""
    row_ok = rows < seqlen_q
    lse = tl.load(Lse + lse_base + rows * stride_ls, mask=row_ok, other=float("inf"))
    lse = tl.where(lse == float("-inf"), float("inf"), lse) * 1.4426950408889634  # x log2(e)
    delta = tl.load(Delta + delta_base + rows * stride_ds, mask=row_ok, other=0.0)
    return lse, delta


@triton.jit
def _dkdv_inner(dk, dv, k, v, Q, DOut, Lse, Delta,
                stride_qs, stride_qd, stride_gs, stride_gd, stride_ls, stride_ds,
                lse_base, delta_base, offs_n, offs_d,
                q_start, k_start, seqlen_q, seqlen_k, HEAD_DIM, qk_scale,
                lo, hi,
                MASKED: tl.constexpr,
                BLOCK_M: tl.constexpr, DOT_PRECISION: tl.constexpr):
    """Add the contributions of query rows [lo, hi) of one head to a kv block's dk, dv.

    Works on transposed tiles (keys along rows) so no transpose of p is needed.
    """
    offs_m = tl.arange(0, BLOCK_M)
    d_ok = offs_d < HEAD_DIM
    for start_m in range(lo, hi, BLOCK_M):
        rows = start_m + offs_m
        tile_ok = (rows[:, None] < seqlen_q) & d_ok[None, :]
        q = tl.load(Q + rows[:, None] * stride_qs + offs_d[None, :] * stride_qd, mask=tile_ok, other=0.0)
        do = tl.load(DOut + rows[:, None] * stride_gs + offs_d[None, :] * stride_gd, mask=tile_ok, other=0.0)
        lse, delta = _load_row_stats(Lse, Delta, lse_base, delta_base, stride_ls, stride_ds, rows, seqlen_q)
        s_t = tl.dot(k, tl.trans(q), input_precision=DOT_PRECISION) * qk_scale  # (BLOCK_N, BLOCK_M)
        p_t = tl.math.exp2(s_t - lse[None, :])
        if MASKED:
            visible = (k_start + offs_n)[:, None] <= (q_start + rows)[None, :]
            p_t = tl.where(visible, p_t, 0.0)
        dv += tl.dot(p_t.to(do.dtype), do, input_precision=DOT_PRECISION)
        dp_t = tl.dot(v, tl.trans(do), input_precision=DOT_PRECISION)
        ds_t = p_t * (dp_t - delta[None, :])
        dk += tl.dot(ds_t.to(q.dtype), q, input_precision=DOT_PRECISION)
    return dk, dv


@triton.jit
def _bwd_dkdv_kernel(
    Q, K, V, DOut, Lse, Delta, DK, DV,
    stride_qb, stride_qs, stride_qh, stride_qd,
    stride_kb, stride_ks, stride_kh, stride_kd,
    stride_vb, stride_vs, stride_vh, stride_vd,
    stride_gb, stride_gs, stride_gh, stride_gd,
    stride_lb, stride_lh, stride_ls,
    stride_db, stride_dh, stride_ds,
    stride_dkb, stride_dks, stride_dkh, stride_dkd,
    stride_dvb, stride_dvs, stride_dvh, stride_dvd,
    seqlen_q, seqlen_k, num_heads, num_heads_kv, HEAD_DIM: tl.constexpr, group_size,
    q_start, k_start, qk_scale, softmax_scale,
    IS_CAUSAL: tl.constexpr, ACCUMULATE: tl.constexpr, DOT_PRECISION: tl.constexpr,
    BLOCK_D: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):
    pid_n = tl.program_id(0)
    pid_bh = tl.program_id(1)
    b = (pid_bh // num_heads_kv).to(tl.int64)  # int64: batch offsets of large tensors pass 2**31
    h_kv = pid_bh % num_heads_kv
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    kv_ok = (offs_n[:, None] < seqlen_k) & (offs_d[None, :] < HEAD_DIM)
    k = tl.load(K + b * stride_kb + h_kv * stride_kh + offs_n[:, None] * stride_ks + offs_d[None, :] * stride_kd,
                mask=kv_ok, other=0.0)
    v = tl.load(V + b * stride_vb + h_kv * stride_vh + offs_n[:, None] * stride_vs + offs_d[None, :] * stride_vd,
                mask=kv_ok, other=0.0)
    dk = tl.zeros([BLOCK_N, BLOCK_D], dtype=tl.float32)
    dv = tl.zeros([BLOCK_N, BLOCK_D], dtype=tl.float32)

    # Causal: rows from first_row on see some key of this block, rows from full_row on
    # see all of them, so only query blocks in between need the position mask.
    # (Rows past seqlen_q load zeros and lse=+inf, so p = 0 there without a mask; keys
    # past seqlen_k only produce dk/dv rows that are never stored.)
    if IS_CAUSAL:
        k_lo = pid_n * BLOCK_N
        k_last = tl.minimum(k_lo + BLOCK_N, seqlen_k) - 1
        first_row = tl.minimum(tl.maximum(k_start + k_lo - q_start, 0), seqlen_q)
        full_row = tl.minimum(tl.maximum(k_start + k_last - q_start, 0), seqlen_q)
        lo = (first_row // BLOCK_M) * BLOCK_M
        mid = tl.cdiv(full_row, BLOCK_M) * BLOCK_M
    else:
        lo = 0
        mid = 0
    for g in range(0, group_size):
        h = h_kv * group_size + g
        q_ptr = Q + b * stride_qb + h * stride_qh
        do_ptr = DOut + b * stride_gb + h * stride_gh
        lse_base = b * stride_lb + h * stride_lh
        delta_base = b * stride_db + h * stride_dh
        dk, dv = _dkdv_inner(dk, dv, k, v, q_ptr, do_ptr, Lse, Delta,
                             stride_qs, stride_qd, stride_gs, stride_gd, stride_ls, stride_ds,
                             lse_base, delta_base, offs_n, offs_d,
                             q_start, k_start, seqlen_q, seqlen_k, HEAD_DIM, qk_scale,
                             lo, mid, True, BLOCK_M, DOT_PRECISION)
        dk, dv = _dkdv_inner(dk, dv, k, v, q_ptr, do_ptr, Lse, Delta,
                             stride_qs, stride_qd, stride_gs, stride_gd, stride_ls, stride_ds,
                             lse_base, delta_base, offs_n, offs_d,
                             q_start, k_start, seqlen_q, seqlen_k, HEAD_DIM, qk_scale,
                             mid, seqlen_q, False, BLOCK_M, DOT_PRECISION)
    dk = dk * softmax_scale

    dk_ptrs = DK + b * stride_dkb + h_kv * stride_dkh + offs_n[:, None] * stride_dks + offs_d[None, :] * stride_dkd
    dv_ptrs = DV + b * stride_dvb + h_kv * stride_dvh + offs_n[:, None] * stride_dvs + offs_d[None, :] * stride_dvd
    if ACCUMULATE:
        dk += tl.load(dk_ptrs, mask=kv_ok, other=0.0).to(tl.float32)
        dv += tl.load(dv_ptrs, mask=kv_ok, other=0.0).to(tl.float32)
    tl.store(dk_ptrs, dk.to(DK.dtype.element_ty), mask=kv_ok)
    tl.store(dv_ptrs, dv.to(DV.dtype.element_ty), mask=kv_ok)


@triton.jit
def _dq_inner(dq, q, do, lse, delta, K, V, stride_ks, stride_kd, stride_vs, stride_vd,
              offs_m, offs_d, q_start, k_start, seqlen_k, HEAD_DIM, qk_scale,
              lo, hi,
              MASKED: tl.constexpr, IS_CAUSAL: tl.constexpr,
              BLOCK_N: tl.constexpr, DOT_PRECISION: tl.constexpr):
    """Add the contributions of key blocks [lo, hi) to one query tile's dq."""
    offs_n = tl.arange(0, BLOCK_N)
    d_ok = offs_d < HEAD_DIM
    for start_n in range(lo, hi, BLOCK_N):
        cols = start_n + offs_n
        kv_ok = (cols[:, None] < seqlen_k) & d_ok[None, :]
        k = tl.load(K + cols[:, None] * stride_ks + offs_d[None, :] * stride_kd, mask=kv_ok, other=0.0)
        v = tl.load(V + cols[:, None] * stride_vs + offs_d[None, :] * stride_vd, mask=kv_ok, other=0.0)
        s = tl.dot(q, tl.trans(k), input_precision=DOT_PRECISION) * qk_scale
        p = tl.math.exp2(s - lse[:, None])
        if MASKED:
            p = tl.where(tile_mask(offs_m, cols, q_start, k_start, seqlen_k, IS_CAUSAL), p, 0.0)
        dp = tl.dot(do, tl.trans(v), input_precision=DOT_PRECISION)
        ds = p * (dp - delta[:, None])
        dq += tl.dot(ds.to(k.dtype), k, input_precision=DOT_PRECISION)
    return dq


@triton.jit
def _bwd_dq_kernel(
    Q, K, V, DOut, Lse, Delta, DQ,
    stride_qb, stride_qs, stride_qh, stride_qd,
    stride_kb, stride_ks, stride_kh, stride_kd,
    stride_vb, stride_vs, stride_vh, stride_vd,
    stride_gb, stride_gs, stride_gh, stride_gd,
    stride_lb, stride_lh, stride_ls,
    stride_db, stride_dh, stride_ds,
    stride_dqb, stride_dqs, stride_dqh, stride_dqd,
    seqlen_q, seqlen_k, num_heads, HEAD_DIM: tl.constexpr, group_size,
    q_start, k_start, qk_scale, softmax_scale,
    IS_CAUSAL: tl.constexpr, ACCUMULATE: tl.constexpr, DOT_PRECISION: tl.constexpr,
    BLOCK_D: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):
    pid_m = tl.program_id(0)
    pid_bh = tl.program_id(1)
    b = (pid_bh // num_heads).to(tl.int64)  # int64: batch offsets of large tensors pass 2**31
    h = pid_bh % num_heads
    h_kv = h // group_size
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    tile_ok = (offs_m[:, None] < seqlen_q) & (offs_d[None, :] < HEAD_DIM)
    q = tl.load(Q + b * stride_qb + h * stride_qh + offs_m[:, None] * stride_qs + offs_d[None, :] * stride_qd,
                mask=tile_ok, other=0.0)
    do = tl.load(DOut + b * stride_gb + h * stride_gh + offs_m[:, None] * stride_gs + offs_d[None, :] * stride_gd,
                 mask=tile_ok, other=0.0)
    lse, delta = _load_row_stats(Lse, Delta, b * stride_lb + h * stride_lh, b * stride_db + h * stride_dh,
                                 stride_ls, stride_ds, offs_m, seqlen_q)
    K += b * stride_kb + h_kv * stride_kh
    V += b * stride_vb + h_kv * stride_vh
    dq = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)

    q_hi = tl.minimum((pid_m + 1) * BLOCK_M, seqlen_q)
    full_end, end = visible_kv_range(pid_m * BLOCK_M, q_hi, q_start, k_start, seqlen_k, IS_CAUSAL)
    unmasked_end = (full_end // BLOCK_N) * BLOCK_N
    dq = _dq_inner(dq, q, do, lse, delta, K, V, stride_ks, stride_kd, stride_vs, stride_vd,
                   offs_m, offs_d, q_start, k_start, seqlen_k, HEAD_DIM, qk_scale,
                   0, unmasked_end, False, IS_CAUSAL, BLOCK_N, DOT_PRECISION)
    dq = _dq_inner(dq, q, do, lse, delta, K, V, stride_ks, stride_kd, stride_vs, stride_vd,
                   offs_m, offs_d, q_start, k_start, seqlen_k, HEAD_DIM, qk_scale,
                   unmasked_end, end, True, IS_CAUSAL, BLOCK_N, DOT_PRECISION)
    dq = dq * softmax_scale

    dq_ptrs = DQ + b * stride_dqb + h * stride_dqh + offs_m[:, None] * stride_dqs + offs_d[None, :] * stride_dqd
    if ACCUMULATE:
        dq += tl.load(dq_ptrs, mask=tile_ok, other=0.0).to(tl.float32)
    tl.store(dq_ptrs, dq.to(DQ.dtype.element_ty), mask=tile_ok)


def _bwd_configs():
    return [triton.Config({"BLOCK_M": bm, "BLOCK_N": bn}, num_warps=w, num_stages=s)
            for bm, bn, w, s in [(64, 64, 4, 2), (64, 128, 8, 2), (128, 64, 8, 2), (32, 64, 4, 3),
                                 (64, 64, 8, 3), (32, 128, 4, 2), (128, 128, 8, 1)]]


def _prune_bwd_configs(configs, named_args, **kwargs):
    block_d = kwargs.get("BLOCK_D", named_args.get("BLOCK_D", 128))
    kept = [c for c in configs if block_d <= 64 or c.kwargs["BLOCK_M"] * c.kwargs["BLOCK_N"] <= 64 * 128]
    return kept or configs


_tune_key = ["seqlen_q", "seqlen_k", "BLOCK_D", "IS_CAUSAL", "ACCUMULATE"]
_bwd_dkdv_kernel_tuned = triton.autotune(configs=_bwd_configs(), key=_tune_key,
                                         prune_configs_by={"early_config_prune": _prune_bwd_configs},
                                         restore_value=["DK", "DV"])(_bwd_dkdv_kernel)
_bwd_dq_kernel_tuned = triton.autotune(configs=_bwd_configs(), key=_tune_key,
                                       prune_configs_by={"early_config_prune": _prune_bwd_configs},
                                       restore_value=["DQ"])(_bwd_dq_kernel)
_bwd_preprocess_tuned = triton.autotune(configs=[triton.Config({"BLOCK_M": bm}, num_warps=4) for bm in (32, 64, 128)],
                                        key=["HEAD_DIM"])(_bwd_preprocess)


def attention_backward_delta(out, dout):
    """delta = rowsum(dout * out) as a contiguous (B, H, Sq) float32 tensor."""
    batch, seqlen_q, heads, head_dim = out.shape
    delta = torch.empty((batch, heads, seqlen_q), dtype=torch.float32, device=out.device)
    if delta.numel() == 0:
        return delta
    args = (out, dout, delta, *out.stride(), *dout.stride(), seqlen_q, heads, head_dim)
    grid = lambda meta: (triton.cdiv(seqlen_q, meta["BLOCK_M"]), batch * heads)  # noqa: E731
    launch(_bwd_preprocess, _bwd_preprocess_tuned, grid, args,
           {"BLOCK_D": max(16, triton.next_power_of_2(head_dim))}, {"BLOCK_M": 32}, out)
    return delta


def attention_backward(dout, q, k, v, out, lse, softmax_scale=None, causal=False, q_start=0, k_start=0,
                       delta=None, dq=None, dk=None, dv=None, accumulate=False):
    """Gradients of attention for one (q, kv) pair, given the final out and lse.

    ``delta`` (shaped like ``lse``, any strides) may be precomputed once: the ring
    backward computes it for its whole local sequence and passes row slices.
    ``dq``/``dk``/``dv`` may be given (any strides, e.g. float32 accumulators);
    with ``accumulate=True`` this call's gradients are added to them.
    Returns (dq, dk, dv).
    """
    batch, seqlen_q, heads, head_dim = q.shape
    seqlen_k, heads_kv = k.shape[1], k.shape[2]
    if softmax_scale is None:
        softmax_scale = 1.0 / math.sqrt(head_dim)
    if accumulate and (dq is None or dk is None or dv is None):
        raise ValueError("attention_backward: accumulate=True needs dq, dk and dv buffers")
    dq = torch.empty_like(q) if dq is None else dq
    dk = torch.empty_like(k) if dk is None else dk
    dv = torch.empty_like(v) if dv is None else dv
    if seqlen_q == 0 or seqlen_k == 0 or q.numel() == 0:
        if not accumulate:
            dq.zero_(), dk.zero_(), dv.zero_()
        return dq, dk, dv
    if delta is None:
        delta = attention_backward_delta(out, dout)
    group_size = heads // heads_kv
    scales = (int(q_start), int(k_start), float(softmax_scale) * LOG2_E, float(softmax_scale))
    constants = {"IS_CAUSAL": bool(causal), "ACCUMULATE": bool(accumulate),
                 "DOT_PRECISION": dot_precision(q.dtype), "BLOCK_D": max(16, triton.next_power_of_2(head_dim))}
    if tuple(delta.shape) != tuple(lse.shape):
        raise ValueError(f"attention_backward: delta must have lse's shape {tuple(lse.shape)}, "
                         f"got {tuple(delta.shape)}")
    common = (*q.stride(), *k.stride(), *v.stride(), *dout.stride(), *lse.stride(), *delta.stride())

    dkdv_args = (q, k, v, dout, lse, delta, dk, dv, *common, *dk.stride(), *dv.stride(),
                 seqlen_q, seqlen_k, heads, heads_kv, head_dim, group_size, *scales)
    grid = lambda meta: (triton.cdiv(seqlen_k, meta["BLOCK_N"]), batch * heads_kv)  # noqa: E731
    launch(_bwd_dkdv_kernel, _bwd_dkdv_kernel_tuned, grid, dkdv_args, constants, CPU_CONFIG, q)

    dq_args = (q, k, v, dout, lse, delta, dq, *common, *dq.stride(),
               seqlen_q, seqlen_k, heads, head_dim, group_size, *scales)
    grid = lambda meta: (triton.cdiv(seqlen_q, meta["BLOCK_M"]), batch * heads)  # noqa: E731
    launch(_bwd_dq_kernel, _bwd_dq_kernel_tuned, grid, dq_args, constants, CPU_CONFIG, q)
    return dq, dk, dv
