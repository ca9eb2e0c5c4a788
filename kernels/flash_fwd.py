"""Flash-attention forward: out and log-sum-exp, with visibility by global positions.

Layout is flash-attn's, (batch, seqlen, heads, headdim), read through arbitrary
strides; packed documents are (1, total, heads, headdim) with ``cu_seqlens``.
q and k share one head dim (``HEAD_DIM``, tiles of ``BLOCK_D`` columns); v and out
have their own (``HEAD_DIM_V``, ``BLOCK_DV``), e.g. MLA's (192, 128): the value tile,
the accumulator and the output are sized by the value head dim, and when the two are
equal both constexprs hold the same value and the kernel is the one-head-dim kernel.
Query row i of a sequence sits at global position ``q_pos0 + i`` and key column
j at ``k_pos0 + j``; which keys a query sees is the one rule of kernels/mask.py
(causal, sliding window). Key blocks invisible to the whole query tile are never
visited, and only blocks on a boundary pay for a mask.

Extras: a logit softcap (flash-attn's ``softcap * tanh(s / softcap)``), and
attention sinks (one logit per head with no value): a sink is exactly the
partial (out 0, lse sink_h), folded into the result by the one LSE merge.
"""
import math
import os

import torch
import triton
import triton.language as tl

from .autotune import FORWARD_FUSED_ACCUMULATE_MAX_BLOCK_D, MAX_BLOCK_N
from .launcher import launch
from .mask import MaskSpec, block_count, block_start, visible, visible_range
from .merge import merge_attention, merge_partials
from .softmax import LOG2_E, dot_precision, finish_softmax, online_softmax_step, scores  # noqa: F401 (re-exported)
from .tiles import (block_d, grid_1d, length_bucket, needs_int64, program_tile, row_descriptor, seq_base, seqlen_info,
                    tile_ptrs, tile_width, tma_compatible)

__all__ = ["attention_forward", "LOG2_E", "dot_precision", "finish_softmax", "online_softmax_step"]


@triton.jit
def _fwd_inner(acc, l_i, m_i, q, K, V, stride_ks, stride_kd, stride_vs, stride_vd,
               q_pos, offs_d, offs_dv, k_pos0, seqlen_k, HEAD_DIM, HEAD_DIM_V, softmax_scale, softcap,
               window_left, window_right,
               lo, full_lo, full_hi, hi,
               MASKED: tl.constexpr, LEFT: tl.constexpr, RIGHT: tl.constexpr, SOFTCAP: tl.constexpr,
               SCALE_IN_EXP2: tl.constexpr, TMA: tl.constexpr, WARP_SPECIALIZE: tl.constexpr,
               WIDE: tl.constexpr, BLOCK_N: tl.constexpr, DOT_PRECISION: tl.constexpr):
    """Online softmax over the masked or the unmasked key blocks (mask.visible_range) of one query tile.

    K and V are tensor descriptors when TMA (rows past the sequence read as zero), else
    pointers to the sequence's first row. With SCALE_IN_EXP2 the scores stay raw products
    and the scale joins exp2's argument (softmax.online_softmax_step)."""
    offs_n = tl.arange(0, BLOCK_N)
    d_ok = offs_d < HEAD_DIM
    dv_ok = offs_dv < HEAD_DIM_V
    # Warp specialization (producer warps issue the loads, consumer warpgroups get the registers)
    # where the config asks for it; Triton forms it only in a kernel with this one loop (no EDGES).
    for i in tl.range(0, block_count(lo, full_lo, full_hi, hi, MASKED, BLOCK_N), warp_specialize=WARP_SPECIALIZE):
        start = block_start(i, lo, full_lo, full_hi, MASKED, BLOCK_N)
        cols = start + offs_n
        col_ok = cols < seqlen_k
        if TMA:
            k = K.load([start, 0]).T
        else:
            # K is loaded as (D, BLOCK_N), ready for q @ k^T.
            k_ptrs = tile_ptrs(K, offs_d, cols, stride_kd, stride_ks, WIDE)
            if MASKED:
                k = tl.load(k_ptrs, mask=d_ok[:, None] & col_ok[None, :], other=0.0)
            else:
                k = tl.load(k_ptrs, mask=d_ok[:, None], other=0.0)
        qk = tl.dot(q, k, input_precision=DOT_PRECISION)
        if SCALE_IN_EXP2:
            x = qk
        else:
            x, _ = scores(qk, softmax_scale, softcap, SOFTCAP)
        if MASKED:
            seen = col_ok[None, :] & visible(q_pos[:, None], (k_pos0 + cols)[None, :],
                                             window_left, window_right, LEFT, RIGHT)
            x = tl.where(seen, x, float("-inf"))
        if SCALE_IN_EXP2:
            p, alpha, m_i, l_i = online_softmax_step(x, m_i, l_i, softmax_scale * 1.4426950408889634)
        else:
            p, alpha, m_i, l_i = online_softmax_step(x, m_i, l_i, 1.0)
        if TMA:
            v = V.load([start, 0])
        else:
            v_ptrs = tile_ptrs(V, cols, offs_dv, stride_vs, stride_vd, WIDE)
            if MASKED:
                v = tl.load(v_ptrs, mask=col_ok[:, None] & dv_ok[None, :], other=0.0)
            else:
                v = tl.load(v_ptrs, mask=dv_ok[None, :], other=0.0)
        acc = tl.dot(p.to(v.dtype), v, acc * alpha[:, None], input_precision=DOT_PRECISION)
    return acc, l_i, m_i


@triton.jit(do_not_specialize=["seqlen_q", "seqlen_k", "q_start", "k_start", "window_left", "window_right",
                               "seqlen_q_bucket", "seqlen_k_bucket"])
def _fwd_kernel(
    Q, K, V, Out, Lse, Sinks, CuSeqlensQ, CuSeqlensK, PosQ, PosK,
    stride_qb, stride_qs, stride_qh, stride_qd,
    stride_kb, stride_ks, stride_kh, stride_kd,
    stride_vb, stride_vs, stride_vh, stride_vd,
    stride_ob, stride_os, stride_oh, stride_od,
    stride_lb, stride_lh, stride_ls,
    seqlen_q, seqlen_k, num_heads, group_size,
    q_start, k_start, window_left, window_right, softmax_scale, softcap,
    seqlen_q_bucket, seqlen_k_bucket,
    HEAD_DIM: tl.constexpr, HEAD_DIM_V: tl.constexpr, VARLEN: tl.constexpr, LEFT: tl.constexpr, RIGHT: tl.constexpr,
    SOFTCAP: tl.constexpr, SINKS: tl.constexpr, ACCUMULATE: tl.constexpr, WIDE: tl.constexpr,
    SCALE_IN_EXP2: tl.constexpr, TMA: tl.constexpr, EDGES: tl.constexpr, DOT_PRECISION: tl.constexpr,
    BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, WARP_SPECIALIZE: tl.constexpr,
):
    tile, seq, h = program_tile(seqlen_q, num_heads, BLOCK_M)  # seqlen_q: the longest, if packed
    batch, q_row0, seqlen_q, k_row0, seqlen_k, q_pos0, k_pos0 = seqlen_info(
        seq, CuSeqlensQ, CuSeqlensK, PosQ, PosK, seqlen_q, seqlen_k, q_start, k_start, VARLEN)
    h_kv = h // group_size  # GQA: query heads [h_kv*g, (h_kv+1)*g) share kv head h_kv

    offs_m = tile * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    offs_dv = tl.arange(0, BLOCK_DV)
    row_ok = offs_m < seqlen_q
    q_ok = row_ok[:, None] & (offs_d[None, :] < HEAD_DIM)
    out_ok = row_ok[:, None] & (offs_dv[None, :] < HEAD_DIM_V)

    Q = seq_base(Q, batch, h, q_row0, stride_qb, stride_qh, stride_qs)
    K = seq_base(K, batch, h_kv, k_row0, stride_kb, stride_kh, stride_ks)
    V = seq_base(V, batch, h_kv, k_row0, stride_vb, stride_vh, stride_vs)
    Out = seq_base(Out, batch, h, q_row0, stride_ob, stride_oh, stride_os)
    if TMA:
        # One descriptor per sequence (or packed document) and head: its rows are exactly the sequence's.
        Q = row_descriptor(Q, seqlen_q, stride_qs, BLOCK_M, BLOCK_D)
        K = row_descriptor(K, seqlen_k, stride_ks, BLOCK_N, BLOCK_D)
        V = row_descriptor(V, seqlen_k, stride_vs, BLOCK_N, BLOCK_DV)
        Out = row_descriptor(Out, seqlen_q, stride_os, BLOCK_M, BLOCK_DV)
        q = Q.load([tile * BLOCK_M, 0])
    else:
        q = tl.load(tile_ptrs(Q, offs_m, offs_d, stride_qs, stride_qd, WIDE), mask=q_ok, other=0.0)

    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_DV], dtype=tl.float32)

    q_pos = q_pos0 + offs_m
    last_row = tl.minimum((tile + 1) * BLOCK_M, seqlen_q) - 1
    # A tile past the end of a shorter document visits no key and stores nothing (its rows are
    # masked). Not an early return: Triton's warp specialization cannot split a loop that follows one.
    keys = tl.where(tile * BLOCK_M < seqlen_q, seqlen_k, 0)
    lo, full_lo, full_hi, hi = visible_range(q_pos0 + tile * BLOCK_M, q_pos0 + last_row, k_pos0, keys,
                                             window_left, window_right, LEFT, RIGHT, BLOCK_N)
    # Blocks every row sees need no mask; those on the window's edges and the sequence end do, and
    # exist only with EDGES (the host's promise otherwise: no window, no documents, whole key blocks).
    acc, l_i, m_i = _fwd_inner(acc, l_i, m_i, q, K, V, stride_ks, stride_kd, stride_vs, stride_vd,
                               q_pos, offs_d, offs_dv, k_pos0, seqlen_k, HEAD_DIM, HEAD_DIM_V, softmax_scale,
                               softcap, window_left, window_right, lo, full_lo, full_hi, hi,
                               False, LEFT, RIGHT, SOFTCAP, SCALE_IN_EXP2, TMA, WARP_SPECIALIZE and not EDGES, WIDE,
                               BLOCK_N, DOT_PRECISION)
    if EDGES:
        acc, l_i, m_i = _fwd_inner(acc, l_i, m_i, q, K, V, stride_ks, stride_kd, stride_vs, stride_vd,
                                   q_pos, offs_d, offs_dv, k_pos0, seqlen_k, HEAD_DIM, HEAD_DIM_V,
                                   softmax_scale, softcap, window_left, window_right, lo, full_lo, full_hi, hi,
                                   True, LEFT, RIGHT, SOFTCAP, SCALE_IN_EXP2, TMA, False, WIDE, BLOCK_N,
                                   DOT_PRECISION)

    out, lse = finish_softmax(acc, l_i, m_i)
    if SINKS:
        # A sink is the partial (out 0, lse sink_h): one merge folds it in.
        sink = tl.load(Sinks + h).to(tl.float32) + tl.zeros([BLOCK_M], dtype=tl.float32)
        out, lse = merge_partials(out, lse, tl.zeros([BLOCK_M, BLOCK_DV], dtype=tl.float32), sink)

    lse_ptrs = seq_base(Lse, batch, h, q_row0, stride_lb, stride_lh, stride_ls) + offs_m * stride_ls
    if not TMA:
        out_ptrs = tile_ptrs(Out, offs_m, offs_dv, stride_os, stride_od, WIDE)
    if ACCUMULATE:
        # Fold this partial into the running (out, lse) already in Out/Lse.
        if TMA:
            out_prev = Out.load([tile * BLOCK_M, 0]).to(tl.float32)
        else:
            out_prev = tl.load(out_ptrs, mask=out_ok, other=0.0).to(tl.float32)
        lse_prev = tl.load(lse_ptrs, mask=row_ok, other=float("-inf"))
        out, lse = merge_partials(out_prev, lse_prev, out, lse)
    if TMA:
        Out.store([tile * BLOCK_M, 0], out.to(Out.dtype))
    else:
        tl.store(out_ptrs, out.to(Out.dtype.element_ty), mask=out_ok)
    tl.store(lse_ptrs, lse, mask=row_ok)


FORWARD_LOADS = ("tma", "pointers")


def forward_loads():
    """Which forward to run, from ``CPATTN_FORWARD``: "tma" (default: tensor-descriptor loads and the
    sm_90 TMA config list wherever ``tma_compatible`` holds) or "pointers" (the pointer-tile forward
    and its config list everywhere, the kernel measured on the H200 on 2026-12-04). Both stay until
    a GPU has compared them (bench/bench_attention.py --forward tma,pointers)."""
    value = os.environ.get("CPATTN_FORWARD", "tma").strip().lower()
    if value not in FORWARD_LOADS:
        raise ValueError(f"CPATTN_FORWARD must be one of {FORWARD_LOADS}, got {value!r}")
    return value


def tma_target(capability):
    """Whether the forward reads through tensor descriptors on a GPU of ``capability``
    (10 * major + minor): from sm_90 on (TMA), unless CPATTN_FORWARD=pointers."""
    return forward_loads() == "tma" and capability >= 90


def use_tma(device):
    """``tma_target`` for the GPU of ``device``; on CPU the interpreter runs the same descriptors."""
    if device.type == "cuda":
        major, minor = torch.cuda.get_device_capability(device)
        return tma_target(10 * major + minor)
    return device.type == "cpu" and forward_loads() == "tma"


def attention_forward(q, k, v, softmax_scale=None, causal=False, q_start=0, k_start=0,
                      out=None, lse=None, accumulate=False, mask=None, softcap=0.0, sinks=None):
    """One flash-attention forward over q, k (B, Sq or Sk, H or Hkv, D) and v (B, Sk, Hkv, Dv).

    Returns (out, lse): out (B, Sq, H, Dv), lse (B, H, Sq) float32 natural log.
    The scale defaults to 1/sqrt(D), q's head dim (v's does not enter the scores).
    Visibility: ``mask`` (a MaskSpec), or for the common case ``causal`` with the
    global positions ``q_start``/``k_start`` of the first query row and key column.
    With a packed MaskSpec (cu_seqlens), q/k/v are (1, total, H, D) and lse (1, H, total).
    ``softcap > 0`` caps the logits; ``sinks`` (H,) adds one value-less logit per head.
    ``out``/``lse`` may be given (any strides; out may be float32 to hold a
    running ring result). With ``accumulate=True`` they must hold a partial
    already, and this call's partial is merged into them.
    Inputs are assumed validated by the caller (cpattn's API layer).
    """
    mask = mask or MaskSpec(causal=causal, q_start=q_start, k_start=k_start)
    batch, seqlen_q, heads, head_dim = q.shape
    seqlen_k, heads_kv, value_dim = k.shape[1], k.shape[2], v.shape[-1]
    out_shape = (batch, seqlen_q, heads, value_dim)
    if softmax_scale is None:
        softmax_scale = 1.0 / math.sqrt(head_dim)
    if accumulate and (out is None or lse is None):
        raise ValueError("attention_forward: accumulate=True needs the running out and lse")
    if accumulate and tile_width(head_dim, value_dim) > FORWARD_FUSED_ACCUMULATE_MAX_BLOCK_D:
        partial = attention_forward(q, k, v, softmax_scale, mask=mask, softcap=softcap, sinks=sinks,
                                    out=torch.empty(out_shape, dtype=out.dtype, device=q.device))
        return merge_attention(out, lse, *partial, inplace=True)
    if out is None:
        out = torch.empty(out_shape, dtype=q.dtype, device=q.device)
    if lse is None:
        lse = torch.empty((batch, heads, seqlen_q), dtype=torch.float32, device=q.device)
    if lse.numel() == 0:  # no query rows (a head dim of 0 still has rows: q.k = 0 for every key)
        return out, lse
    if seqlen_k == 0 and not mask.varlen and sinks is None:
        if not accumulate:
            out.zero_()
            lse.fill_(float("-inf"))
        return out, lse
    max_q, max_k = mask.lengths(seqlen_q, seqlen_k)
    args = (q, k, v, out, lse, q if sinks is None else sinks, *mask.kernel_args(q)[:4],
            *q.stride(), *k.stride(), *v.stride(), *out.stride(), *lse.stride(),
            max_q, seqlen_k, heads, heads // heads_kv,
            *mask.kernel_args(q)[4:], float(softmax_scale), float(softcap or 1.0),
            length_bucket(max_q), length_bucket(max_k))
    constants = {"HEAD_DIM": head_dim, "HEAD_DIM_V": value_dim, **mask.constants(), "SOFTCAP": bool(softcap),
                 "SINKS": sinks is not None, "ACCUMULATE": bool(accumulate), "WIDE": needs_int64(q, k, v, out, lse),
                 # The folded scale needs a positive scale (the row max is taken before scaling).
                 "SCALE_IN_EXP2": not softcap and softmax_scale > 0,
                 "TMA": use_tma(q.device) and tma_compatible(q, k, v, out),
                 # Whether some key block may need a mask; without, the forward is one loop.
                 "EDGES": mask.varlen or mask.left >= 0 or mask.right >= 0 or seqlen_k % MAX_BLOCK_N != 0,
                 "DOT_PRECISION": dot_precision(q.dtype), "BLOCK_D": block_d(head_dim),
                 "BLOCK_DV": block_d(value_dim)}
    launch(_fwd_kernel, grid_1d(max_q, mask.num_seqs(batch) * heads), args, constants, q, in_place=accumulate)
    return out, lse
