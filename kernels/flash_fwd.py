"""Flash-attention forward: out and log-sum-exp, with causality by global positions.

Layout is flash-attn's, (batch, seqlen, heads, headdim), read through arbitrary
strides. Query row i sits at global position ``q_start + i`` and key column j at
``k_start + j``; a key is visible when ``key_pos <= query_pos`` (DESIGN.md).
KV blocks that are invisible to the whole query tile are never visited, and only
blocks that straddle the diagonal or the sequence end pay for a mask.

Notation follows the FlashAttention papers: ``m_i`` running row max, ``l_i``
running row sum, ``acc`` unnormalised output. We work in base 2 (exp2) with the
softmax scale folded into ``qk_scale = softmax_scale * log2(e)``; the lse we
return is in natural log.
"""
import math

import torch
import triton
import triton.language as tl

from ._launch import launch
from .merge import merge_partials

LOG2_E = 1.4426950408889634


@triton.jit
def visible_kv_range(q_lo, q_hi, q_start, k_start, seqlen_k, IS_CAUSAL: tl.constexpr):
    """Key index range for query rows [q_lo, q_hi) (local indices, q_hi exclusive).

    Returns (full_end, end): keys [0, full_end) are visible to every row of the
    tile, keys [full_end, end) to some rows, keys from ``end`` on to none.
    This is the one place the causal-position rule turns into loop bounds.
    """
    if IS_CAUSAL:
        # key j is visible to row i iff k_start + j <= q_start + i
        end = tl.minimum(seqlen_k, tl.maximum(q_start + q_hi - k_start, 0))
        full_end = tl.minimum(end, tl.maximum(q_start + q_lo + 1 - k_start, 0))
    else:
        end = seqlen_k
        full_end = seqlen_k
    return full_end, end


@triton.jit
def tile_mask(rows, cols, q_start, k_start, seqlen_k, IS_CAUSAL: tl.constexpr):
    """Which (query row, key column) pairs of a tile count: keys inside the
    sequence and, when causal, at a position no later than the query's."""
    visible = cols[None, :] < seqlen_k
    if IS_CAUSAL:
        visible = visible & ((k_start + cols)[None, :] <= (q_start + rows)[:, None])
    return visible


@triton.jit
def online_softmax_step(s, m_i, l_i):
    """Fold a tile of base-2 scores ``s`` (invisible entries -inf) into the running max and sum.

    Returns (p, alpha, m_i, l_i): the tile's unnormalised probabilities, the
    factor that rescales what was accumulated so far, and the new max and sum.
    """
    m_new = tl.maximum(m_i, tl.max(s, 1))
    # A row that has seen no visible key yet keeps m = -inf; shift it by 0 to avoid NaN.
    m_shift = tl.where(m_new == float("-inf"), 0.0, m_new)
    p = tl.math.exp2(s - m_shift[:, None])
    alpha = tl.math.exp2(m_i - m_shift)
    return p, alpha, m_new, l_i * alpha + tl.sum(p, 1)


@triton.jit
def finish_softmax(acc, l_i, m_i):
    """Normalise: (out, lse in natural log). A row with no visible key gives out 0
    and lse -inf, the identity of the merge."""
    has_keys = l_i > 0.0
    l_safe = tl.where(has_keys, l_i, 1.0)
    out = acc * tl.where(has_keys, 1.0 / l_safe, 0.0)[:, None]
    lse = tl.where(has_keys, (m_i + tl.math.log2(l_safe)) * 0.6931471805599453, float("-inf"))  # x ln 2
    return out, lse


@triton.jit
def _fwd_inner(acc, l_i, m_i, q, K, V, stride_ks, stride_kd, stride_vs, stride_vd,
               offs_m, offs_d, q_start, k_start, seqlen_k, HEAD_DIM, qk_scale,
               lo, hi,
               MASKED: tl.constexpr, IS_CAUSAL: tl.constexpr,
               BLOCK_N: tl.constexpr, DOT_PRECISION: tl.constexpr):
    """Online softmax over the key blocks [lo, hi) of one query tile."""
    offs_n = tl.arange(0, BLOCK_N)
    d_ok = offs_d < HEAD_DIM
    for start_n in range(lo, hi, BLOCK_N):
        cols = start_n + offs_n
        # K is loaded as (D, BLOCK_N), ready for q @ k^T.
        if MASKED:
            k = tl.load(K + cols[None, :] * stride_ks + offs_d[:, None] * stride_kd,
                        mask=(cols[None, :] < seqlen_k) & d_ok[:, None], other=0.0)
        else:
            k = tl.load(K + cols[None, :] * stride_ks + offs_d[:, None] * stride_kd, mask=d_ok[:, None], other=0.0)
        s = tl.dot(q, k, input_precision=DOT_PRECISION) * qk_scale
        if MASKED:
            s = tl.where(tile_mask(offs_m, cols, q_start, k_start, seqlen_k, IS_CAUSAL), s, float("-inf"))
        p, alpha, m_i, l_i = online_softmax_step(s, m_i, l_i)
        if MASKED:
            v = tl.load(V + cols[:, None] * stride_vs + offs_d[None, :] * stride_vd,
                        mask=(cols[:, None] < seqlen_k) & d_ok[None, :], other=0.0)
        else:
            v = tl.load(V + cols[:, None] * stride_vs + offs_d[None, :] * stride_vd, mask=d_ok[None, :], other=0.0)
        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=DOT_PRECISION)
    return acc, l_i, m_i


@triton.jit
def _fwd_kernel(
    Q, K, V, Out, Lse,
    stride_qb, stride_qs, stride_qh, stride_qd,
    stride_kb, stride_ks, stride_kh, stride_kd,
    stride_vb, stride_vs, stride_vh, stride_vd,
    stride_ob, stride_os, stride_oh, stride_od,
    stride_lb, stride_lh, stride_ls,
    seqlen_q, seqlen_k, num_heads, HEAD_DIM: tl.constexpr, group_size,
    q_start, k_start, qk_scale,
    IS_CAUSAL: tl.constexpr, ACCUMULATE: tl.constexpr, DOT_PRECISION: tl.constexpr,
    BLOCK_D: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):
    pid_m = tl.program_id(0)
    pid_bh = tl.program_id(1)
    b = (pid_bh // num_heads).to(tl.int64)  # int64: batch offsets of large tensors pass 2**31
    h = pid_bh % num_heads
    h_kv = h // group_size  # GQA: query heads [h_kv*g, (h_kv+1)*g) share kv head h_kv

    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    row_ok = offs_m < seqlen_q
    tile_ok = row_ok[:, None] & (offs_d[None, :] < HEAD_DIM)

    q = tl.load(Q + b * stride_qb + h * stride_qh + offs_m[:, None] * stride_qs + offs_d[None, :] * stride_qd,
                mask=tile_ok, other=0.0)
    K += b * stride_kb + h_kv * stride_kh
    V += b * stride_vb + h_kv * stride_vh

    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)

    q_hi = tl.minimum((pid_m + 1) * BLOCK_M, seqlen_q)
    full_end, end = visible_kv_range(pid_m * BLOCK_M, q_hi, q_start, k_start, seqlen_k, IS_CAUSAL)
    # Whole blocks that every row sees need no mask; the rest (diagonal, tail) do.
    unmasked_end = (full_end // BLOCK_N) * BLOCK_N
    acc, l_i, m_i = _fwd_inner(acc, l_i, m_i, q, K, V, stride_ks, stride_kd, stride_vs, stride_vd,
                               offs_m, offs_d, q_start, k_start, seqlen_k, HEAD_DIM, qk_scale,
                               0, unmasked_end, False, IS_CAUSAL, BLOCK_N, DOT_PRECISION)
    acc, l_i, m_i = _fwd_inner(acc, l_i, m_i, q, K, V, stride_ks, stride_kd, stride_vs, stride_vd,
                               offs_m, offs_d, q_start, k_start, seqlen_k, HEAD_DIM, qk_scale,
                               unmasked_end, end, True, IS_CAUSAL, BLOCK_N, DOT_PRECISION)

    out, lse = finish_softmax(acc, l_i, m_i)

    out_ptrs = Out + b * stride_ob + h * stride_oh + offs_m[:, None] * stride_os + offs_d[None, :] * stride_od
    lse_ptrs = Lse + b * stride_lb + h * stride_lh + offs_m * stride_ls
    if ACCUMULATE:
        # Fold this partial into the running (out, lse) already in Out/Lse.
        out_prev = tl.load(out_ptrs, mask=tile_ok, other=0.0).to(tl.float32)
        lse_prev = tl.load(lse_ptrs, mask=row_ok, other=float("-inf"))
        out, lse = merge_partials(out_prev, lse_prev, out, lse)
    tl.store(out_ptrs, out.to(Out.dtype.element_ty), mask=tile_ok)
    tl.store(lse_ptrs, lse, mask=row_ok)


def _fwd_configs():
    configs = []
    for bm, bn, warps, stages in [(128, 64, 8, 3), (128, 128, 8, 3), (128, 64, 4, 3), (64, 64, 4, 3),
                                  (128, 32, 4, 4), (64, 32, 4, 4), (64, 64, 4, 2), (128, 128, 8, 2)]:
        configs.append(triton.Config({"BLOCK_M": bm, "BLOCK_N": bn}, num_warps=warps, num_stages=stages))
    return configs


def _prune_fwd_configs(configs, named_args, **kwargs):
    # Large head dims with large tiles exceed shared memory; keep tiles in proportion.
    block_d = kwargs.get("BLOCK_D", named_args.get("BLOCK_D", 128))
    kept = [c for c in configs if block_d <= 128 or c.kwargs["BLOCK_N"] <= 64]
    return kept or configs


_fwd_kernel_tuned = triton.autotune(
    configs=_fwd_configs(),
    key=["seqlen_q", "seqlen_k", "BLOCK_D", "IS_CAUSAL", "ACCUMULATE"],
    prune_configs_by={"early_config_prune": _prune_fwd_configs},
    restore_value=["Out", "Lse"],
)(_fwd_kernel)

# Tiles for the interpreter: big enough to keep the number of programs small,
# small enough that the test shapes still cross block and diagonal boundaries.
CPU_CONFIG = {"BLOCK_M": 32, "BLOCK_N": 32}


def dot_precision(dtype):
    """fp32 inputs get true fp32 products (not TF32) so fp32 results match an fp32 reference."""
    return "ieee" if dtype == torch.float32 else "tf32"


def attention_forward(q, k, v, softmax_scale=None, causal=False, q_start=0, k_start=0,
                      out=None, lse=None, accumulate=False):
    """One flash-attention forward over q (B, Sq, H, D) and k, v (B, Sk, Hkv, D).

    Returns (out, lse): out (B, Sq, H, D), lse (B, H, Sq) float32 natural log.
    ``out``/``lse`` may be given (any strides; out may be float32 to hold a
    running ring result). With ``accumulate=True`` they must hold a partial
    already, and this call's partial is merged into them.
    Inputs are assumed validated by the caller (cpattn's API layer).
    """
    batch, seqlen_q, heads, head_dim = q.shape
    seqlen_k, heads_kv = k.shape[1], k.shape[2]
    if softmax_scale is None:
        softmax_scale = 1.0 / math.sqrt(head_dim)
    if accumulate and (out is None or lse is None):
        raise ValueError("attention_forward: accumulate=True needs the running out and lse")
    if out is None:
        out = torch.empty(q.shape, dtype=q.dtype, device=q.device)
    if lse is None:
        lse = torch.empty((batch, heads, seqlen_q), dtype=torch.float32, device=q.device)
    if q.numel() == 0:
        return out, lse
    if seqlen_k == 0:
        if not accumulate:
            out.zero_()
            lse.fill_(float("-inf"))
        return out, lse
    args = (q, k, v, out, lse,
            *q.stride(), *k.stride(), *v.stride(), *out.stride(), *lse.stride(),
            seqlen_q, seqlen_k, heads, head_dim, heads // heads_kv,
            int(q_start), int(k_start), float(softmax_scale) * LOG2_E)
    constants = {"IS_CAUSAL": bool(causal), "ACCUMULATE": bool(accumulate),
                 "DOT_PRECISION": dot_precision(q.dtype), "BLOCK_D": max(16, triton.next_power_of_2(head_dim))}
    grid = lambda meta: (triton.cdiv(seqlen_q, meta["BLOCK_M"]), batch * heads)  # noqa: E731
    launch(_fwd_kernel, _fwd_kernel_tuned, grid, args, constants, CPU_CONFIG, q)
    return out, lse
