"""Flash-attention backward from the *final* out and lse.

In a ring, (out, lse) are the merge of many partials; recomputing each step's
probabilities as ``exp(q k^T * scale - lse)`` with the final lse gives exactly
that step's share of the full softmax, so every step's gradients are exact.

Three kernels, none with atomics (deterministic):
  * ``_bwd_preprocess``: delta = rowsum(dout * out) per query row, and in the same pass the
    lse in base 2 (``attention_backward_delta``), so the kernels below compute each
    probability as exp2 of one FMA (``q.k * scale * log2(e) - lse``).
  * ``_bwd_dkdv_kernel``: one program per (kv block, kv head); it walks every
    query head of its GQA group and every query block that can see it, so
    dk/dv of a kv head are summed in registers.
  * ``_bwd_dq_kernel``: one program per (query block, query head), walking
    the kv blocks its rows can see.
Each may add into existing gradient buffers (``accumulate``), which the ring
backward uses to sum contributions over steps.

Head dims as in the forward: q, k, dq, dk in tiles of ``BLOCK_D`` columns (``HEAD_DIM``),
v, out, dout, dv in tiles of ``BLOCK_DV`` (``HEAD_DIM_V``); the delta pass reads only out
and dout, so its one head dim is the value head dim.
"""
import math

import torch
import triton
import triton.language as tl

from .autotune import BACKWARD_FUSED_ACCUMULATE_MAX_BLOCK_D
from .launcher import launch
from .mask import (MaskSpec, block_count, block_start, visible,
                   visible_range)
from .softmax import LOG2_E, dot_precision, scores
from .tiles import (block_d, grid_1d, length_bucket, needs_int64, program_tile, seq_base, seqlen_info, tile_ptrs,
                    tile_width)


@triton.jit
def _bwd_preprocess(
    Out, DOut, Delta, Lse, LseLog2,
    stride_ob, stride_os, stride_oh, stride_od,
    stride_gb, stride_gs, stride_gh, stride_gd,
    stride_db, stride_dh, stride_ds,
    stride_lb, stride_lh, stride_ls,
    seqlen_q, num_heads, HEAD_DIM: tl.constexpr, LSE_LOG2: tl.constexpr, WIDE: tl.constexpr,
    BLOCK_D: tl.constexpr, BLOCK_M: tl.constexpr,
):
    # Row by row, so packed documents need no special case: a row is a row.
    tile, b, h = program_tile(seqlen_q, num_heads, BLOCK_M)
    offs_m = tile * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    row_ok = offs_m < seqlen_q
    tile_ok = row_ok[:, None] & (offs_d[None, :] < HEAD_DIM)
    o = tl.load(tile_ptrs(seq_base(Out, b, h, 0, stride_ob, stride_oh, stride_os), offs_m, offs_d,
                          stride_os, stride_od, WIDE), mask=tile_ok, other=0.0).to(tl.float32)
    do = tl.load(tile_ptrs(seq_base(DOut, b, h, 0, stride_gb, stride_gh, stride_gs), offs_m, offs_d,
                           stride_gs, stride_gd, WIDE), mask=tile_ok, other=0.0).to(tl.float32)
    tl.store(seq_base(Delta, b, h, 0, stride_db, stride_dh, stride_ds) + offs_m * stride_ds, tl.sum(o * do, 1),
             mask=row_ok)
    if LSE_LOG2:
        # The lse as the dk/dv and dq kernels read it (Delta's layout): in base 2, and +inf where a row
        # saw no key, so that p = exp2(s - lse) is 0 there without a mask and each score costs one FMA.
        lse = tl.load(seq_base(Lse, b, h, 0, stride_lb, stride_lh, stride_ls) + offs_m * stride_ls, mask=row_ok,
                      other=0.0)
        tl.store(seq_base(LseLog2, b, h, 0, stride_db, stride_dh, stride_ds) + offs_m * stride_ds,
                 tl.where(lse == float("-inf"), float("inf"), lse) * 1.4426950408889634, mask=row_ok)  # x log2(e)


@triton.jit
def _load_row_stats(LseLog2, Delta, rows, seqlen_q, stride_ls, stride_ds):
    """The base-2 lse and delta of query rows; rows past the sequence get lse +inf (p = 0)."""
    row_ok = rows < seqlen_q
    lse = tl.load(LseLog2 + rows * stride_ls, mask=row_ok, other=float("inf"))
    delta = tl.load(Delta + rows * stride_ds, mask=row_ok, other=0.0)
    return lse, delta


@triton.jit
def _dkdv_inner(dk, dv, k, v, Q, DOut, LseLog2, Delta, DQ,
                stride_qh, stride_gh, stride_lh, stride_dh, stride_dqh,
                stride_qs, stride_qd, stride_gs, stride_gd, stride_ls, stride_ds, stride_dqs, stride_dqd,
                k_pos, offs_d, offs_dv, q_pos0, seqlen_q, group_size, HEAD_DIM, HEAD_DIM_V, softmax_scale, softcap,
                window_left, window_right, lo, full_lo, full_hi, hi,
                MASKED: tl.constexpr, LEFT: tl.constexpr, RIGHT: tl.constexpr, SOFTCAP: tl.constexpr,
                ATOMIC_DQ: tl.constexpr, WIDE: tl.constexpr, BLOCK_M: tl.constexpr, DOT_PRECISION: tl.constexpr):
    """Add the contributions of the masked or the unmasked query blocks (mask.visible_range)
    of every query head of the GQA group (``group_size`` heads from ``Q``, ``stride_qh``
    apart) to a kv block's dk, dv; with ATOMIC_DQ also add each block's share of dq
    (ds @ k, scaled) into the fp32 buffer ``DQ`` with atomics: the 5-GEMM backward.

    One flat loop over (head, query block): with a loop over heads around the block
    loops, ptxas spilled registers in every config at head dim 128 (bench/aot.py).
    The head and block indices are counters (no division per iteration).
    Works on transposed tiles (keys along rows) so no transpose of p is needed.
    """
    offs_m = tl.arange(0, BLOCK_M)
    d_ok = offs_d < HEAD_DIM
    dv_ok = offs_dv < HEAD_DIM_V
    num_blocks = block_count(lo, full_lo, full_hi, hi, MASKED, BLOCK_M)
    g = 0  # head of the group
    j = 0  # block within the head
    for _ in range(0, group_size * num_blocks):
        rows = block_start(j, lo, full_lo, full_hi, MASKED, BLOCK_M) + offs_m
        h = g.to(tl.int64)  # head offsets in int64, as in seq_base
        row_ok = rows[:, None] < seqlen_q
        tile_ok = row_ok & d_ok[None, :]
        q = tl.load(tile_ptrs(Q + h * stride_qh, rows, offs_d, stride_qs, stride_qd, WIDE), mask=tile_ok, other=0.0)
        do = tl.load(tile_ptrs(DOut + h * stride_gh, rows, offs_dv, stride_gs, stride_gd, WIDE),
                     mask=row_ok & dv_ok[None, :], other=0.0)
        lse, delta = _load_row_stats(LseLog2 + h * stride_lh, Delta + h * stride_dh, rows, seqlen_q, stride_ls,
                                     stride_ds)
        s_t, t_t = scores(tl.dot(k, tl.trans(q), input_precision=DOT_PRECISION), softmax_scale, softcap, SOFTCAP)
        p_t = tl.math.exp2(s_t - lse[None, :])  # (BLOCK_N, BLOCK_M)
        if MASKED:
            p_t = tl.where(visible((q_pos0 + rows)[None, :], k_pos[:, None], window_left, window_right, LEFT, RIGHT),
                           p_t, 0.0)
        dv += tl.dot(p_t.to(do.dtype), do, input_precision=DOT_PRECISION)
        dp_t = tl.dot(v, tl.trans(do), input_precision=DOT_PRECISION)
        ds_t = p_t * (dp_t - delta[None, :])
        if SOFTCAP:
            ds_t = ds_t * (1.0 - t_t * t_t)  # d/ds of softcap * tanh(s / softcap)
        ds_t = ds_t.to(q.dtype)
        dk += tl.dot(ds_t, q, input_precision=DOT_PRECISION)
        if ATOMIC_DQ:
            dq = tl.dot(tl.trans(ds_t), k, input_precision=DOT_PRECISION) * softmax_scale
            tl.atomic_add(tile_ptrs(DQ + h * stride_dqh, rows, offs_d, stride_dqs, stride_dqd, WIDE), dq,
                          mask=tile_ok, sem="relaxed")
        j += 1
        if j == num_blocks:
            j = 0
            g += 1
    return dk, dv


@triton.jit(do_not_specialize=["seqlen_q", "seqlen_k", "q_start", "k_start", "window_left", "window_right",
                               "seqlen_q_bucket", "seqlen_k_bucket"])
def _bwd_dkdv_kernel(
    Q, K, V, DOut, LseLog2, Delta, DK, DV, DQ, CuSeqlensQ, CuSeqlensK, PosQ, PosK,
    stride_qb, stride_qs, stride_qh, stride_qd,
    stride_kb, stride_ks, stride_kh, stride_kd,
    stride_vb, stride_vs, stride_vh, stride_vd,
    stride_gb, stride_gs, stride_gh, stride_gd,
    stride_lb, stride_lh, stride_ls,
    stride_db, stride_dh, stride_ds,
    stride_dkb, stride_dks, stride_dkh, stride_dkd,
    stride_dvb, stride_dvs, stride_dvh, stride_dvd,
    stride_dqb, stride_dqs, stride_dqh, stride_dqd,
    seqlen_q, seqlen_k, num_heads_kv, group_size,
    q_start, k_start, window_left, window_right, softmax_scale, softcap,
    seqlen_q_bucket, seqlen_k_bucket,
    HEAD_DIM: tl.constexpr, HEAD_DIM_V: tl.constexpr, VARLEN: tl.constexpr, LEFT: tl.constexpr,
    RIGHT: tl.constexpr, SOFTCAP: tl.constexpr, ACCUMULATE: tl.constexpr, ATOMIC_DQ: tl.constexpr, WIDE: tl.constexpr,
    DOT_PRECISION: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr, BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
):
    tile, seq, h_kv = program_tile(seqlen_k, num_heads_kv, BLOCK_N)  # seqlen_k: the longest, if packed
    batch, q_row0, seqlen_q, k_row0, seqlen_k, q_pos0, k_pos0 = seqlen_info(
        seq, CuSeqlensQ, CuSeqlensK, PosQ, PosK, seqlen_q, seqlen_k, q_start, k_start, VARLEN)
    if tile * BLOCK_N >= seqlen_k:
        return
    offs_n = tile * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    offs_dv = tl.arange(0, BLOCK_DV)
    k_ok = (offs_n[:, None] < seqlen_k) & (offs_d[None, :] < HEAD_DIM)
    v_ok = (offs_n[:, None] < seqlen_k) & (offs_dv[None, :] < HEAD_DIM_V)
    k = tl.load(tile_ptrs(seq_base(K, batch, h_kv, k_row0, stride_kb, stride_kh, stride_ks), offs_n, offs_d,
                          stride_ks, stride_kd, WIDE), mask=k_ok, other=0.0)
    v = tl.load(tile_ptrs(seq_base(V, batch, h_kv, k_row0, stride_vb, stride_vh, stride_vs), offs_n, offs_dv,
                          stride_vs, stride_vd, WIDE), mask=v_ok, other=0.0)
    dk = tl.zeros([BLOCK_N, BLOCK_D], dtype=tl.float32)
    dv = tl.zeros([BLOCK_N, BLOCK_DV], dtype=tl.float32)

    # The queries that see this key block: the visibility rule read backwards
    # (q sees k iff k - right <= q <= k + left), so the bounds swap sides.
    last_key = tl.minimum((tile + 1) * BLOCK_N, seqlen_k) - 1
    lo, full_lo, full_hi, hi = visible_range(k_pos0 + tile * BLOCK_N, k_pos0 + last_key, q_pos0, seqlen_q,
                                             window_right, window_left, RIGHT, LEFT, BLOCK_M)
    k_pos = k_pos0 + offs_n
    h = h_kv * group_size  # the first query head of the group sharing this kv head (GQA)
    q_ptr = seq_base(Q, batch, h, q_row0, stride_qb, stride_qh, stride_qs)
    do_ptr = seq_base(DOut, batch, h, q_row0, stride_gb, stride_gh, stride_gs)
    lse_ptr = seq_base(LseLog2, batch, h, q_row0, stride_lb, stride_lh, stride_ls)
    delta_ptr = seq_base(Delta, batch, h, q_row0, stride_db, stride_dh, stride_ds)
    dq_ptr = seq_base(DQ, batch, h, q_row0, stride_dqb, stride_dqh, stride_dqs)
    dk, dv = _dkdv_inner(dk, dv, k, v, q_ptr, do_ptr, lse_ptr, delta_ptr, dq_ptr,
                         stride_qh, stride_gh, stride_lh, stride_dh, stride_dqh,
                         stride_qs, stride_qd, stride_gs, stride_gd, stride_ls, stride_ds, stride_dqs, stride_dqd,
                         k_pos, offs_d, offs_dv, q_pos0, seqlen_q, group_size, HEAD_DIM, HEAD_DIM_V, softmax_scale,
                         softcap, window_left, window_right, lo, full_lo, full_hi, hi,
                         False, LEFT, RIGHT, SOFTCAP, ATOMIC_DQ, WIDE, BLOCK_M, DOT_PRECISION)
    dk, dv = _dkdv_inner(dk, dv, k, v, q_ptr, do_ptr, lse_ptr, delta_ptr, dq_ptr,
                         stride_qh, stride_gh, stride_lh, stride_dh, stride_dqh,
                         stride_qs, stride_qd, stride_gs, stride_gd, stride_ls, stride_ds, stride_dqs, stride_dqd,
                         k_pos, offs_d, offs_dv, q_pos0, seqlen_q, group_size, HEAD_DIM, HEAD_DIM_V, softmax_scale,
                         softcap, window_left, window_right, lo, full_lo, full_hi, hi,
                         True, LEFT, RIGHT, SOFTCAP, ATOMIC_DQ, WIDE, BLOCK_M, DOT_PRECISION)
    dk = dk * softmax_scale

    dk_ptrs = tile_ptrs(seq_base(DK, batch, h_kv, k_row0, stride_dkb, stride_dkh, stride_dks), offs_n, offs_d,
                        stride_dks, stride_dkd, WIDE)
    dv_ptrs = tile_ptrs(seq_base(DV, batch, h_kv, k_row0, stride_dvb, stride_dvh, stride_dvs), offs_n, offs_dv,
                        stride_dvs, stride_dvd, WIDE)
    # dk first, then dv: the previous values of only one accumulator are in registers at a time.
    if ACCUMULATE:
        dk += tl.load(dk_ptrs, mask=k_ok, other=0.0).to(tl.float32)
    tl.store(dk_ptrs, dk.to(DK.dtype.element_ty), mask=k_ok)
    if ACCUMULATE:
        dv += tl.load(dv_ptrs, mask=v_ok, other=0.0).to(tl.float32)
    tl.store(dv_ptrs, dv.to(DV.dtype.element_ty), mask=v_ok)


@triton.jit
def _dq_inner(dq, q, do, lse, delta, K, V, stride_ks, stride_kd, stride_vs, stride_vd,
              q_pos, offs_d, offs_dv, k_pos0, seqlen_k, HEAD_DIM, HEAD_DIM_V, softmax_scale, softcap,
              window_left, window_right, lo, full_lo, full_hi, hi,
              MASKED: tl.constexpr, LEFT: tl.constexpr, RIGHT: tl.constexpr, SOFTCAP: tl.constexpr,
              WIDE: tl.constexpr, BLOCK_N: tl.constexpr, DOT_PRECISION: tl.constexpr):
    """Add the contributions of the masked or the unmasked key blocks (mask.visible_range) to one query tile's dq."""
    offs_n = tl.arange(0, BLOCK_N)
    d_ok = offs_d < HEAD_DIM
    dv_ok = offs_dv < HEAD_DIM_V
    for i in range(0, block_count(lo, full_lo, full_hi, hi, MASKED, BLOCK_N)):
        cols = block_start(i, lo, full_lo, full_hi, MASKED, BLOCK_N) + offs_n
        col_ok = cols < seqlen_k
        k = tl.load(tile_ptrs(K, cols, offs_d, stride_ks, stride_kd, WIDE), mask=col_ok[:, None] & d_ok[None, :],
                    other=0.0)
        v = tl.load(tile_ptrs(V, cols, offs_dv, stride_vs, stride_vd, WIDE), mask=col_ok[:, None] & dv_ok[None, :],
                    other=0.0)
        s, t = scores(tl.dot(q, tl.trans(k), input_precision=DOT_PRECISION), softmax_scale, softcap, SOFTCAP)
        p = tl.math.exp2(s - lse[:, None])
        if MASKED:
            seen = col_ok[None, :] & visible(q_pos[:, None], (k_pos0 + cols)[None, :],
                                             window_left, window_right, LEFT, RIGHT)
            p = tl.where(seen, p, 0.0)
        dp = tl.dot(do, tl.trans(v), input_precision=DOT_PRECISION)
        ds = p * (dp - delta[:, None])
        if SOFTCAP:
            ds = ds * (1.0 - t * t)
        dq += tl.dot(ds.to(k.dtype), k, input_precision=DOT_PRECISION)
    return dq


@triton.jit(do_not_specialize=["seqlen_q", "seqlen_k", "q_start", "k_start", "window_left", "window_right",
                               "seqlen_q_bucket", "seqlen_k_bucket"])
def _bwd_dq_kernel(
    Q, K, V, DOut, LseLog2, Delta, DQ, CuSeqlensQ, CuSeqlensK, PosQ, PosK,
    stride_qb, stride_qs, stride_qh, stride_qd,
    stride_kb, stride_ks, stride_kh, stride_kd,
    stride_vb, stride_vs, stride_vh, stride_vd,
    stride_gb, stride_gs, stride_gh, stride_gd,
    stride_lb, stride_lh, stride_ls,
    stride_db, stride_dh, stride_ds,
    stride_dqb, stride_dqs, stride_dqh, stride_dqd,
    seqlen_q, seqlen_k, num_heads, group_size,
    q_start, k_start, window_left, window_right, softmax_scale, softcap,
    seqlen_q_bucket, seqlen_k_bucket,
    HEAD_DIM: tl.constexpr, HEAD_DIM_V: tl.constexpr, VARLEN: tl.constexpr, LEFT: tl.constexpr,
    RIGHT: tl.constexpr, SOFTCAP: tl.constexpr, ACCUMULATE: tl.constexpr, WIDE: tl.constexpr,
    DOT_PRECISION: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr, BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
):
    tile, seq, h = program_tile(seqlen_q, num_heads, BLOCK_M)  # seqlen_q: the longest, if packed
    batch, q_row0, seqlen_q, k_row0, seqlen_k, q_pos0, k_pos0 = seqlen_info(
        seq, CuSeqlensQ, CuSeqlensK, PosQ, PosK, seqlen_q, seqlen_k, q_start, k_start, VARLEN)
    if tile * BLOCK_M >= seqlen_q:
        return
    h_kv = h // group_size
    offs_m = tile * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    offs_dv = tl.arange(0, BLOCK_DV)
    tile_ok = (offs_m[:, None] < seqlen_q) & (offs_d[None, :] < HEAD_DIM)
    q = tl.load(tile_ptrs(seq_base(Q, batch, h, q_row0, stride_qb, stride_qh, stride_qs), offs_m, offs_d,
                          stride_qs, stride_qd, WIDE), mask=tile_ok, other=0.0)
    do = tl.load(tile_ptrs(seq_base(DOut, batch, h, q_row0, stride_gb, stride_gh, stride_gs), offs_m, offs_dv,
                           stride_gs, stride_gd, WIDE),
                 mask=(offs_m[:, None] < seqlen_q) & (offs_dv[None, :] < HEAD_DIM_V), other=0.0)
    lse, delta = _load_row_stats(seq_base(LseLog2, batch, h, q_row0, stride_lb, stride_lh, stride_ls),
                                 seq_base(Delta, batch, h, q_row0, stride_db, stride_dh, stride_ds),
                                 offs_m, seqlen_q, stride_ls, stride_ds)
    K = seq_base(K, batch, h_kv, k_row0, stride_kb, stride_kh, stride_ks)
    V = seq_base(V, batch, h_kv, k_row0, stride_vb, stride_vh, stride_vs)
    dq = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)

    q_pos = q_pos0 + offs_m
    last_row = tl.minimum((tile + 1) * BLOCK_M, seqlen_q) - 1
    lo, full_lo, full_hi, hi = visible_range(q_pos0 + tile * BLOCK_M, q_pos0 + last_row, k_pos0, seqlen_k,
                                             window_left, window_right, LEFT, RIGHT, BLOCK_N)
    dq = _dq_inner(dq, q, do, lse, delta, K, V, stride_ks, stride_kd, stride_vs, stride_vd,
                   q_pos, offs_d, offs_dv, k_pos0, seqlen_k, HEAD_DIM, HEAD_DIM_V, softmax_scale, softcap,
                   window_left, window_right, lo, full_lo, full_hi, hi, False, LEFT, RIGHT, SOFTCAP, WIDE, BLOCK_N, DOT_PRECISION)
    dq = _dq_inner(dq, q, do, lse, delta, K, V, stride_ks, stride_kd, stride_vs, stride_vd,
                   q_pos, offs_d, offs_dv, k_pos0, seqlen_k, HEAD_DIM, HEAD_DIM_V, softmax_scale, softcap,
                   window_left, window_right, lo, full_lo, full_hi, hi, True, LEFT, RIGHT, SOFTCAP, WIDE, BLOCK_N, DOT_PRECISION)
    dq = dq * softmax_scale

    dq_ptrs = tile_ptrs(seq_base(DQ, batch, h, q_row0, stride_dqb, stride_dqh, stride_dqs), offs_m, offs_d,
                        stride_dqs, stride_dqd, WIDE)
    if ACCUMULATE:
        dq += tl.load(dq_ptrs, mask=tile_ok, other=0.0).to(tl.float32)
    tl.store(dq_ptrs, dq.to(DQ.dtype.element_ty), mask=tile_ok)


def lse_in_base_2(lse):
    """The lse (natural log) as the dk/dv and dq kernels read it: in base 2, +inf where a row saw no
    key. What ``attention_backward_delta(out, dout, lse)`` computes in its pass, as torch ops."""
    return torch.where(lse == float("-inf"), float("inf"), lse) * LOG2_E


def attention_backward_delta(out, dout, lse=None):
    """delta = rowsum(dout * out) as a contiguous (B, H, Sq) float32 tensor.

    With ``lse`` (B, H, Sq) (natural log, any strides) it returns ``(delta, lse_log2)``: the same
    pass also writes the lse as the gradient kernels read it (``lse_in_base_2``), so that the
    conversion costs no pass of its own and none inside their loops. Callers that run the
    backward many times over row slices (the ring) compute both once and pass both."""
    batch, seqlen_q, heads, head_dim = out.shape
    delta = torch.empty((batch, heads, seqlen_q), dtype=torch.float32, device=out.device)
    lse_log2 = None if lse is None else torch.empty_like(delta)
    if delta.numel():
        stats = lse if lse is not None else delta  # an unused pointer without lse
        args = (out, dout, delta, stats, delta if lse_log2 is None else lse_log2,
                *out.stride(), *dout.stride(), *delta.stride(), *stats.stride(), seqlen_q, heads)
        constants = {"HEAD_DIM": head_dim, "LSE_LOG2": lse is not None, "WIDE": needs_int64(out, dout),
                     "BLOCK_D": block_d(head_dim)}
        launch(_bwd_preprocess, grid_1d(seqlen_q, batch * heads), args, constants, out)
    return delta if lse is None else (delta, lse_log2)


def attention_backward(dout, q, k, v, out, lse, softmax_scale=None, causal=False, q_start=0, k_start=0,
                       delta=None, dq=None, dk=None, dv=None, accumulate=False, mask=None, softcap=0.0,
                       compute_dq=True, compute_dkdv=True, atomic_dq=False, lse_log2=None):
    """Gradients of attention for one (q, kv) pair, given the final out and lse.

    Shapes as in ``attention_forward``: v, out and dout may have a head dim of their own.
    Visibility as in ``attention_forward`` (``mask``, or ``causal``/``q_start``/``k_start``);
    ``softcap`` must be the forward's. ``delta`` (shaped like ``lse``, any strides) may be
    precomputed once: the ring backward computes it for its whole local sequence and
    passes row slices, with ``lse_log2`` (both from one ``attention_backward_delta(out, dout, lse)``;
    ``delta`` alone costs a conversion of ``lse`` by torch ops). ``dq``/``dk``/``dv`` may be given
    (any strides, e.g. float32 accumulators); with ``accumulate=True`` this call's gradients are added to them.
    ``compute_dq``/``compute_dkdv=False`` skip a kernel (its outputs are then None).
    ``atomic_dq=True`` (with both gradients asked for) runs the 5-GEMM backward: the dk/dv
    kernel also adds each key block's share of dq into an fp32 buffer with atomics, instead
    of a dq kernel recomputing the scores; the summation order of dq then varies from run
    to run (not deterministic). Returns (dq, dk, dv).
    """
    mask = mask or MaskSpec(causal=causal, q_start=q_start, k_start=k_start)
    batch, seqlen_q, heads, head_dim = q.shape
    seqlen_k, heads_kv, value_dim = k.shape[1], k.shape[2], v.shape[-1]
    if softmax_scale is None:
        softmax_scale = 1.0 / math.sqrt(head_dim)
    if accumulate and ((compute_dq and dq is None) or (compute_dkdv and (dk is None or dv is None))):
        raise ValueError("attention_backward: accumulate=True needs dq, dk and dv buffers")
    if atomic_dq and not (compute_dq and compute_dkdv):
        raise ValueError("attention_backward: atomic_dq=True computes dq inside the dk/dv kernel, so it needs "
                         "compute_dq and compute_dkdv")
    if accumulate and tile_width(head_dim, value_dim) > BACKWARD_FUSED_ACCUMULATE_MAX_BLOCK_D:
        fresh = [None if g is None else torch.empty(g.shape, dtype=g.dtype, device=g.device) for g in (dq, dk, dv)]
        parts = attention_backward(dout, q, k, v, out, lse, softmax_scale, delta=delta, dq=fresh[0], dk=fresh[1],
                                   dv=fresh[2], mask=mask, softcap=softcap, compute_dq=compute_dq,
                                   compute_dkdv=compute_dkdv, atomic_dq=atomic_dq, lse_log2=lse_log2)
        return tuple(None if part is None else g.add_(part) for g, part in zip((dq, dk, dv), parts))
    for name, stats in (("delta", delta), ("lse_log2", lse_log2)):
        if stats is not None and tuple(stats.shape) != tuple(lse.shape):
            raise ValueError(f"attention_backward: {name} must have lse's shape {tuple(lse.shape)}, "
                             f"got {tuple(stats.shape)}")
    dq = (torch.empty_like(q) if dq is None else dq) if compute_dq else None
    dk = (torch.empty_like(k) if dk is None else dk) if compute_dkdv else None
    dv = (torch.empty_like(v) if dv is None else dv) if compute_dkdv else None
    if seqlen_q == 0 or seqlen_k == 0 or batch * heads == 0:
        if not accumulate:
            for grad in (dq, dk, dv):
                if grad is not None:
                    grad.zero_()
        return dq, dk, dv
    if delta is None and lse_log2 is None:
        delta, lse_log2 = attention_backward_delta(out, dout, lse)
    elif delta is None:
        delta = attention_backward_delta(out, dout)
    elif lse_log2 is None:
        lse_log2 = lse_in_base_2(lse)
    max_q, max_k = mask.lengths(seqlen_q, seqlen_k)
    cu_q, cu_k, pos_q, pos_k, *positions = mask.kernel_args(q)
    common = (*q.stride(), *k.stride(), *v.stride(), *dout.stride(), *lse_log2.stride(), *delta.stride())
    per_call = (*positions, float(softmax_scale), float(softcap or 1.0), length_bucket(max_q), length_bucket(max_k))
    constants = {"HEAD_DIM": head_dim, "HEAD_DIM_V": value_dim, **mask.constants(), "SOFTCAP": bool(softcap),
                 "ACCUMULATE": bool(accumulate), "WIDE": needs_int64(q, k, v, dout, dq, dk, dv),
                 "DOT_PRECISION": dot_precision(q.dtype), "BLOCK_D": block_d(head_dim), "BLOCK_DV": block_d(value_dim)}
    num_seqs = mask.num_seqs(batch)
    if atomic_dq:
        # The atomics add into fp32: the caller's buffer itself when it is one and is accumulated into.
        dq_sum = dq if accumulate and dq.dtype == torch.float32 else torch.zeros(q.shape, dtype=torch.float32,
                                                                                   device=q.device)
    if compute_dkdv:
        dq_arg = dq_sum if atomic_dq else dk  # without atomics DQ is never touched
        args = (q, k, v, dout, lse_log2, delta, dk, dv, dq_arg, cu_q, cu_k, pos_q, pos_k, *common, *dk.stride(),
                *dv.stride(), *dq_arg.stride(), max_q, max_k, heads_kv, heads // heads_kv, *per_call)
        launch(_bwd_dkdv_kernel, grid_1d(max_k, num_seqs * heads_kv, "BLOCK_N"), args,
               {**constants, "ATOMIC_DQ": bool(atomic_dq)}, q, in_place=accumulate or atomic_dq)
    if atomic_dq:
        if dq is not dq_sum and accumulate:
            dq.add_(dq_sum)
        elif dq is not dq_sum:
            dq.copy_(dq_sum)
        return dq, dk, dv
    if compute_dq:
        args = (q, k, v, dout, lse_log2, delta, dq, cu_q, cu_k, pos_q, pos_k, *common, *dq.stride(),
                max_q, max_k, heads, heads // heads_kv, *per_call)
        launch(_bwd_dq_kernel, grid_1d(max_q, num_seqs * heads), args, constants, q, in_place=accumulate)
    return dq, dk, dv
