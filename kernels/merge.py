"""Exact merge of attention partials by their log-sum-exp.

For partials (o_s, lse_s) over disjoint key sets, with m = max_s lse_s:
    w_s = exp(lse_s - m)
    lse = m + log(sum_s w_s)
    o   = sum_s o_s * w_s / sum_s w_s
(for two partials: lse = logaddexp(lse_a, lse_b), o = o_a * exp(lse_a - lse) + o_b * exp(lse_b - lse)).
An empty partial (no visible key) is (0, -inf), the identity of the merge. An
lse of +inf also marks an empty partial: flash-attn writes it for rows without
keys, and vLLM's merge reads it so; here it is read as -inf, never as NaN.

Every weight is taken relative to the largest lse, which is one of the inputs
exactly, and the merged lse is formed once, at the end: no rounded
intermediate lse feeds a weight, so a merge of N partials keeps fp32 accuracy
at any finite lse (an lse rounded to fp32 after each pairwise step would lose
1e-3 of relative accuracy at |lse| ~ 4e4). Natural log throughout: converting
lse to base 2 would round it just the same.

``empty_as_minus_inf``, ``partial_weight`` and ``finish_merge`` are the one
place this arithmetic lives; ``merge_partials`` (two partials, also the forward
kernel's epilogue) and the split-KV reduction of kernels/decode.py are made of them.
"""
import torch
import triton
import triton.language as tl

from .launcher import launch
from .tiles import block_d, grid_1d, needs_int64, program_tile, seq_base, tile_ptrs


@triton.jit
def empty_as_minus_inf(lse):
    """``lse`` with the +inf marker of an empty partial read as -inf."""
    return tl.where(lse == float("inf"), float("-inf"), lse)


@triton.jit
def partial_weight(lse_s, m):
    """exp(lse_s - m): the weight of partial s in a merge whose largest lse is ``m``; 0 if it is empty."""
    # Every partial empty (m = -inf): shift by 0 so that no (-inf) - (-inf) = NaN appears.
    shift = tl.where(m == float("-inf"), 0.0, m)
    return tl.exp(empty_as_minus_inf(lse_s) - shift)


@triton.jit
def finish_merge(m, l):
    """(lse, 1 / l) of a merge whose largest lse is ``m`` and whose weights sum to ``l``: the
    merged lse and the factor that normalises sum_s o_s * w_s; (-inf, 0) if every partial is empty."""
    nonempty = l > 0.0
    l_safe = tl.where(nonempty, l, 1.0)
    return tl.where(nonempty, m + tl.log(l_safe), float("-inf")), tl.where(nonempty, 1.0 / l_safe, 0.0)


@triton.jit
def merge_partials(o_a, lse_a, o_b, lse_b):
    """Merge two fp32 tiles: o_* (BLOCK_M, BLOCK_D), lse_* (BLOCK_M,) in natural log."""
    m = tl.maximum(empty_as_minus_inf(lse_a), empty_as_minus_inf(lse_b))
    w_a = partial_weight(lse_a, m)
    w_b = partial_weight(lse_b, m)
    lse, inv = finish_merge(m, w_a + w_b)
    # Normalised row weights first, then one pass over the tiles.
    return o_a * (w_a * inv)[:, None] + o_b * (w_b * inv)[:, None], lse


@triton.jit
def _merge_kernel(
    OutA, LseA, OutB, LseB, OutDst, LseDst,
    stride_ab, stride_as, stride_ah, stride_ad,
    stride_bb, stride_bs, stride_bh, stride_bd,
    stride_db, stride_ds, stride_dh, stride_dd,
    stride_lab, stride_lah, stride_las,
    stride_lbb, stride_lbh, stride_lbs,
    stride_ldb, stride_ldh, stride_lds,
    seqlen, num_heads, HEAD_DIM: tl.constexpr, WIDE: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr,
):
    tile, b, h = program_tile(seqlen, num_heads, BLOCK_M)
    offs_m = tile * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    row_ok = offs_m < seqlen
    tile_ok = row_ok[:, None] & (offs_d[None, :] < HEAD_DIM)

    o_a = tl.load(tile_ptrs(seq_base(OutA, b, h, 0, stride_ab, stride_ah, stride_as), offs_m, offs_d,
                            stride_as, stride_ad, WIDE), mask=tile_ok, other=0.0).to(tl.float32)
    o_b = tl.load(tile_ptrs(seq_base(OutB, b, h, 0, stride_bb, stride_bh, stride_bs), offs_m, offs_d,
                            stride_bs, stride_bd, WIDE), mask=tile_ok, other=0.0).to(tl.float32)
    lse_a = tl.load(seq_base(LseA, b, h, 0, stride_lab, stride_lah, stride_las) + offs_m * stride_las,
                    mask=row_ok, other=float("-inf"))
    lse_b = tl.load(seq_base(LseB, b, h, 0, stride_lbb, stride_lbh, stride_lbs) + offs_m * stride_lbs,
                    mask=row_ok, other=float("-inf"))

    o, lse = merge_partials(o_a, lse_a, o_b, lse_b)

    tl.store(tile_ptrs(seq_base(OutDst, b, h, 0, stride_db, stride_dh, stride_ds), offs_m, offs_d,
                       stride_ds, stride_dd, WIDE), o.to(OutDst.dtype.element_ty), mask=tile_ok)
    tl.store(seq_base(LseDst, b, h, 0, stride_ldb, stride_ldh, stride_lds) + offs_m * stride_lds, lse, mask=row_ok)


def _check_partial(out, lse, name):
    if out.dim() != 4:
        raise ValueError(f"merge_attention: {name} out must be (batch, seqlen, heads, headdim), got shape {tuple(out.shape)}")
    b, s, h, _ = out.shape
    if tuple(lse.shape) != (b, h, s):
        raise ValueError(f"merge_attention: {name} lse must have shape {(b, h, s)} to match out {tuple(out.shape)}, "
                         f"got {tuple(lse.shape)}")
    if lse.dtype != torch.float32:
        raise TypeError(f"merge_attention: {name} lse must be float32, got {lse.dtype}")


def merge_attention(out_a, lse_a, out_b, lse_b, inplace=False):
    """Merge partial (out_b, lse_b) into (out_a, lse_a).

    out: (B, S, H, D) any float dtype and strides; lse: (B, H, S) float32, natural log.
    A row whose lse is -inf or +inf is empty (flash-attn and vLLM mark rows without
    keys with +inf): it contributes nothing, and two empty rows give (0, -inf).
    Returns (out, lse); with ``inplace=True`` they are ``out_a`` and ``lse_a``,
    updated in place, otherwise new tensors of out_a's dtype. Math in fp32; a
    half-precision out is rounded to nearest, on either device.
    """
    _check_partial(out_a, lse_a, "first")
    _check_partial(out_b, lse_b, "second")
    if out_a.shape != out_b.shape:
        raise ValueError(f"merge_attention: partials differ in shape: {tuple(out_a.shape)} vs {tuple(out_b.shape)}")
    devices = {t.device for t in (out_a, lse_a, out_b, lse_b)}
    if len(devices) != 1:
        raise ValueError(f"merge_attention: all tensors must be on one device, got {sorted(map(str, devices))}")
    if inplace:
        out, lse = out_a, lse_a
    else:
        out, lse = torch.empty_like(out_a), torch.empty_like(lse_a)
    batch, seqlen, heads, head_dim = out_a.shape
    if out.numel() == 0:
        return out, lse
    args = (out_a, lse_a, out_b, lse_b, out, lse,
            *out_a.stride(), *out_b.stride(), *out.stride(),
            *lse_a.stride(), *lse_b.stride(), *lse.stride(),
            seqlen, heads)
    constants = {"HEAD_DIM": head_dim, "WIDE": needs_int64(out_a, out_b, out), "BLOCK_D": block_d(head_dim)}
    launch(_merge_kernel, grid_1d(seqlen, batch * heads), args, constants, out_a, in_place=inplace)
    return out, lse
