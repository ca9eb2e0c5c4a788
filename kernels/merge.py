"""Exact merge of two attention partials by their log-sum-exp.

For partials (o_a, lse_a) and (o_b, lse_b) over disjoint key sets:
    lse = logaddexp(lse_a, lse_b)
    o   = o_a * exp(lse_a - lse) + o_b * exp(lse_b - lse)
An empty partial (no visible key) is (0, -inf), the identity of the merge.
``merge_partials`` is the one place this formula lives; the forward kernel's
epilogue reuses it to accumulate into a running (out, lse).
"""
import torch
import triton
import triton.language as tl

from ._launch import launch


@triton.jit
def merge_partials(o_a, lse_a, o_b, lse_b):
    """Merge two fp32 tiles: o_* (BLOCK_M, BLOCK_D), lse_* (BLOCK_M,) in natural log."""
    lse_max = tl.maximum(lse_a, lse_b)
    # Two empty partials: shift by 0 instead of -inf so no (-inf) - (-inf) = NaN appears.
    shift = tl.where(lse_max == float("-inf"), 0.0, lse_max)
    w_a = tl.exp(lse_a - shift)
    w_b = tl.exp(lse_b - shift)
    w_sum = w_a + w_b
    nonempty = w_sum > 0.0
    w_safe = tl.where(nonempty, w_sum, 1.0)
    lse = tl.where(nonempty, shift + tl.log(w_safe), float("-inf"))
    inv = tl.where(nonempty, 1.0 / w_safe, 0.0)
    o = o_a * (w_a * inv)[:, None] + o_b * (w_b * inv)[:, None]
    return o, lse


@triton.jit
def _merge_kernel(
    OutA, LseA, OutB, LseB, OutDst, LseDst,
    stride_ab, stride_as, stride_ah, stride_ad,
    stride_bb, stride_bs, stride_bh, stride_bd,
    stride_db, stride_ds, stride_dh, stride_dd,
    stride_lab, stride_lah, stride_las,
    stride_lbb, stride_lbh, stride_lbs,
    stride_ldb, stride_ldh, stride_lds,
    seqlen, num_heads, HEAD_DIM: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr,
):
    pid_m = tl.program_id(0)
    pid_bh = tl.program_id(1)
    b = (pid_bh // num_heads).to(tl.int64)  # int64: batch offsets of large tensors pass 2**31
    h = pid_bh % num_heads
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    row_ok = offs_m < seqlen
    tile_ok = row_ok[:, None] & (offs_d[None, :] < HEAD_DIM)

    o_a = tl.load(OutA + b * stride_ab + h * stride_ah + offs_m[:, None] * stride_as + offs_d[None, :] * stride_ad,
                  mask=tile_ok, other=0.0).to(tl.float32)
    o_b = tl.load(OutB + b * stride_bb + h * stride_bh + offs_m[:, None] * stride_bs + offs_d[None, :] * stride_bd,
                  mask=tile_ok, other=0.0).to(tl.float32)
    lse_a = tl.load(LseA + b * stride_lab + h * stride_lah + offs_m * stride_las, mask=row_ok, other=float("-inf"))
    lse_b = tl.load(LseB + b * stride_lbb + h * stride_lbh + offs_m * stride_lbs, mask=row_ok, other=float("-inf"))

    o, lse = merge_partials(o_a, lse_a, o_b, lse_b)

    tl.store(OutDst + b * stride_db + h * stride_dh + offs_m[:, None] * stride_ds + offs_d[None, :] * stride_dd,
             o.to(OutDst.dtype.element_ty), mask=tile_ok)
    tl.store(LseDst + b * stride_ldb + h * stride_ldh + offs_m * stride_lds, lse, mask=row_ok)


_merge_kernel_tuned = triton.autotune(
    configs=[triton.Config({"BLOCK_M": bm}, num_warps=w) for bm in (16, 32, 64) for w in (2, 4, 8)],
    key=["HEAD_DIM"],
    restore_value=["OutDst", "LseDst"],
)(_merge_kernel)


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
    Returns (out, lse); with ``inplace=True`` they are ``out_a`` and ``lse_a``,
    updated in place, otherwise new tensors of out_a's dtype. Math in fp32.
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
    block_d = triton.next_power_of_2(head_dim)
    args = (out_a, lse_a, out_b, lse_b, out, lse,
            *out_a.stride(), *out_b.stride(), *out.stride(),
            *lse_a.stride(), *lse_b.stride(), *lse.stride(),
            seqlen, heads, head_dim)
    grid = lambda meta: (triton.cdiv(seqlen, meta["BLOCK_M"]), batch * heads)  # noqa: E731
    launch(_merge_kernel, _merge_kernel_tuned, grid, args, {"BLOCK_D": block_d}, {"BLOCK_M": 32}, out_a)
    return out, lse
