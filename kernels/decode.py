"""Split-KV attention over a KV cache (flash-decoding), contiguous or paged.

A few query tokens per sequence (1 for plain decode, more for speculative
decoding or a prefill chunk) attend to a cache of keys and values:
  contiguous  k_cache (B, capacity, Hkv, D): sequence b's slot j at [b, j]
  paged       k_cache (num_pages, page_size, Hkv, D) and block_table (B, max_pages)
              int32: sequence b's slot j at [block_table[b, j // page_size], j % page_size]
``cache_seqlens[b]`` (int32) slots of sequence b are valid.

Positions (DESIGN.md, "the one rule of causality"): query token t of sequence b
sits at global position ``q_start[b] + t``; cache slot j holds the key at
    key_pos(j) = pos_offset + (j // pos_stripe) * pos_stride + j % pos_stripe,
i.e. the slots are runs of ``pos_stripe`` consecutive positions, run i starting
at ``pos_offset + i * pos_stride``. The default (1, 1, 0) is key_pos(j) = j; a
sequence-sharded cache whose rank holds every P-th stripe of S tokens passes
(S, P * S, rank * S). A key is visible when key_pos <= query_pos.

One program handles one (sequence, kv head, split of the slots, tile of query
rows). Its rows are the (token, query head) pairs of the query heads that share
that kv head (GQA): row r is token r // group_size, head h_kv * group_size +
r % group_size, so each key/value tile is loaded once for the whole group and
the dot products have at least 16 rows even for a single token. Each split
writes a partial (out, lse); ``merge_splits`` folds the partials with the one
LSE merge of kernels/merge.py. Notation as in flash_fwd.py (m_i, l_i, acc, base 2).
"""
import math

import torch
import triton
import triton.language as tl

from ._launch import launch
from .flash_fwd import LOG2_E, dot_precision, finish_softmax, online_softmax_step
from .merge import merge_partials
from .tiles import block_d, is_power_of_two


@triton.jit
def _decode_kernel(
    Q, K, V, Out, Lse, SeqLens, QStart, BlockTable,
    stride_qb, stride_qs, stride_qh, stride_qd,
    stride_kb, stride_ks, stride_kh, stride_kd,
    stride_vb, stride_vs, stride_vh, stride_vd,
    stride_osplit, stride_ob, stride_os, stride_oh, stride_od,
    stride_lsplit, stride_lb, stride_lh, stride_ls,
    stride_btb,
    seqlen_q, num_heads_kv, group_size, HEAD_DIM: tl.constexpr, split_len,
    pos_stripe, pos_stride, pos_offset, qk_scale,
    PAGED: tl.constexpr, PAGE_SIZE: tl.constexpr, IS_CAUSAL: tl.constexpr, DOT_PRECISION: tl.constexpr,
    BLOCK_D: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):
    pid_bh = tl.program_id(0)
    pid_m = tl.program_id(1)
    split = tl.program_id(2)
    b = pid_bh // num_heads_kv
    h_kv = pid_bh % num_heads_kv

    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    tok = rows // group_size
    head = h_kv * group_size + rows % group_size
    offs_d = tl.arange(0, BLOCK_D)
    offs_n = tl.arange(0, BLOCK_N)
    row_ok = rows < seqlen_q * group_size
    d_ok = offs_d < HEAD_DIM
    tile_ok = row_ok[:, None] & d_ok[None, :]

    b64 = b.to(tl.int64)  # caches can exceed 2**31 elements
    q = tl.load(Q + b64 * stride_qb + tok[:, None] * stride_qs + head[:, None] * stride_qh + offs_d[None, :] * stride_qd,
                mask=tile_ok, other=0.0)
    seqlen_k = tl.load(SeqLens + b)
    q_pos = tl.load(QStart + b) + tok
    lo = split * split_len
    hi = tl.minimum(lo + split_len, seqlen_k)
    if IS_CAUSAL:
        # Skip the slots no row of the tile can see: those past the last row's position.
        # Slots with key_pos <= p: full runs below p, plus the start of p's run.
        last = tl.load(QStart + b) + (tl.minimum((pid_m + 1) * BLOCK_M, seqlen_q * group_size) - 1) // group_size
        rel = last - pos_offset
        n_visible = tl.where(rel < 0, 0, (rel // pos_stride) * pos_stripe + tl.minimum(rel % pos_stride + 1, pos_stripe))
        hi = tl.minimum(hi, n_visible)

    K += h_kv * stride_kh
    V += h_kv * stride_vh
    if not PAGED:
        K += b64 * stride_kb
        V += b64 * stride_vb

    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
    for start_n in range(lo, hi, BLOCK_N):
        cols = start_n + offs_n
        col_ok = cols < hi
        if PAGED:
            # Each column looks up its own page, so a tile may straddle pages.
            page = tl.load(BlockTable + b64 * stride_btb + cols // PAGE_SIZE, mask=col_ok, other=0).to(tl.int64)
            k_off = page * stride_kb + (cols % PAGE_SIZE) * stride_ks
            v_off = page * stride_vb + (cols % PAGE_SIZE) * stride_vs
        else:
            k_off = cols.to(tl.int64) * stride_ks
            v_off = cols.to(tl.int64) * stride_vs
        k = tl.load(K + k_off[None, :] + offs_d[:, None] * stride_kd, mask=col_ok[None, :] & d_ok[:, None], other=0.0)
        s = tl.dot(q, k, input_precision=DOT_PRECISION) * qk_scale
        visible = col_ok[None, :]
        if IS_CAUSAL:
            key_pos = pos_offset + (cols // pos_stripe) * pos_stride + cols % pos_stripe
            visible = visible & (key_pos[None, :] <= q_pos[:, None])
        s = tl.where(visible, s, float("-inf"))
        p, alpha, m_i, l_i = online_softmax_step(s, m_i, l_i)
        v = tl.load(V + v_off[:, None] + offs_d[None, :] * stride_vd, mask=col_ok[:, None] & d_ok[None, :], other=0.0)
        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=DOT_PRECISION)

    # An empty split (or rows with no visible key) gives out = 0, lse = -inf: the merge's identity.
    out, lse = finish_softmax(acc, l_i, m_i)
    Out += split * stride_osplit + b64 * stride_ob
    Lse += split * stride_lsplit + b64 * stride_lb
    tl.store(Out + tok[:, None] * stride_os + head[:, None] * stride_oh + offs_d[None, :] * stride_od,
             out.to(Out.dtype.element_ty), mask=tile_ok)
    tl.store(Lse + head * stride_lh + tok * stride_ls, lse, mask=row_ok)


@triton.jit
def _merge_splits_kernel(
    OutP, LseP, Out, Lse,
    stride_psplit, stride_pb, stride_ps, stride_ph, stride_pd,
    stride_lpsplit, stride_lpb, stride_lph, stride_lps,
    stride_ob, stride_os, stride_oh, stride_od,
    stride_lb, stride_lh, stride_ls,
    num_splits, seqlen, num_heads, HEAD_DIM: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr,
):
    # Rows are (token, head) pairs of one sequence, so a decode step's few tokens still fill a tile.
    b = tl.program_id(0).to(tl.int64)
    pid_m = tl.program_id(1)
    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    tok = rows // num_heads
    head = rows % num_heads
    offs_d = tl.arange(0, BLOCK_D)
    row_ok = rows < seqlen * num_heads
    tile_ok = row_ok[:, None] & (offs_d[None, :] < HEAD_DIM)
    part = OutP + b * stride_pb + tok[:, None] * stride_ps + head[:, None] * stride_ph + offs_d[None, :] * stride_pd
    part_lse = LseP + b * stride_lpb + head * stride_lph + tok * stride_lps

    o = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
    lse = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)  # (0, -inf): the empty partial
    for split in range(0, num_splits):
        o_s = tl.load(part + split * stride_psplit, mask=tile_ok, other=0.0).to(tl.float32)
        lse_s = tl.load(part_lse + split * stride_lpsplit, mask=row_ok, other=float("-inf"))
        o, lse = merge_partials(o, lse, o_s, lse_s)
    tl.store(Out + b * stride_ob + tok[:, None] * stride_os + head[:, None] * stride_oh + offs_d[None, :] * stride_od,
             o.to(Out.dtype.element_ty), mask=tile_ok)
    tl.store(Lse + b * stride_lb + head * stride_lh + tok * stride_ls, lse, mask=row_ok)


def merge_splits(out_parts, lse_parts, out=None, lse=None):
    """Merge N partials stacked on dim 0: out_parts (N, B, S, H, D), lse_parts (N, B, H, S) fp32.

    Returns (out, lse): out (B, S, H, D) in ``out``'s dtype (default out_parts'),
    lse (B, H, S) float32. The fold is the LSE merge of kernels/merge.py.
    Serves both the split-KV reduction and the merge across ranks.
    """
    num_splits, batch, seqlen, heads, head_dim = out_parts.shape
    if tuple(lse_parts.shape) != (num_splits, batch, heads, seqlen):
        raise ValueError(f"merge_splits: lse_parts must have shape {(num_splits, batch, heads, seqlen)}, "
                         f"got {tuple(lse_parts.shape)}")
    if out is None:
        out = torch.empty(out_parts.shape[1:], dtype=out_parts.dtype, device=out_parts.device)
    if lse is None:
        lse = torch.empty((batch, heads, seqlen), dtype=torch.float32, device=out_parts.device)
    if out.numel() == 0:
        return out, lse
    args = (out_parts, lse_parts, out, lse, *out_parts.stride(), *lse_parts.stride(), *out.stride(), *lse.stride(),
            num_splits, seqlen, heads, head_dim)
    grid = lambda meta: (batch, triton.cdiv(seqlen * heads, meta["BLOCK_M"]))  # noqa: E731
    launch(_merge_splits_kernel, grid, args, {"BLOCK_D": block_d(head_dim)}, out_parts)
    return out, lse


def _num_splits(q, batch, heads_kv, q_tiles, max_seqlen):
    """Enough programs to fill the GPU, but at least ~256 keys per split (fewer on CPU)."""
    if q.device.type == "cpu":
        return max(1, min(4, triton.cdiv(max_seqlen, 64)))
    sms = torch.cuda.get_device_properties(q.device).multi_processor_count
    want = triton.cdiv(2 * sms, batch * heads_kv * q_tiles)
    return max(1, min(want, triton.cdiv(max_seqlen, 256), 64))


def _validate(q, k_cache, v_cache, cache_seqlens, q_start, block_table, max_seqlen, slot_positions):
    where = "decode_attention"
    for name, t in (("q", q), ("k_cache", k_cache), ("v_cache", v_cache)):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{where}: {name} must be a torch.Tensor, got {type(t).__name__}")
        if t.dim() != 4:
            raise ValueError(f"{where}: {name} must be 4-D, got shape {tuple(t.shape)}")
        if t.dtype not in (torch.float16, torch.bfloat16, torch.float32):
            raise TypeError(f"{where}: {name} has dtype {t.dtype}; supported: float16, bfloat16, float32")
    if not (q.dtype == k_cache.dtype == v_cache.dtype):
        raise TypeError(f"{where}: q, k_cache, v_cache must share one dtype, got {q.dtype}, {k_cache.dtype}, "
                        f"{v_cache.dtype}")
    if q.device.type == "cpu" and q.dtype == torch.bfloat16:
        raise TypeError(f"{where}: bfloat16 on CPU is not supported by Triton's interpreter; pass float32")
    if k_cache.shape != v_cache.shape:
        raise ValueError(f"{where}: k_cache and v_cache shapes differ: {tuple(k_cache.shape)} vs {tuple(v_cache.shape)}")
    batch, _, heads, head_dim = q.shape
    heads_kv, cache_dim = k_cache.shape[2], k_cache.shape[3]
    if cache_dim != head_dim:
        raise ValueError(f"{where}: head dims differ: q {head_dim}, cache {cache_dim}")
    if head_dim > 256:
        raise ValueError(f"{where}: head dim {head_dim} is above the supported maximum 256")
    if heads_kv < 1 or heads % heads_kv != 0:
        raise ValueError(f"{where}: query heads ({heads}) must be a multiple of kv heads ({heads_kv})")
    for name, t in (("cache_seqlens", cache_seqlens), ("q_start", q_start)):
        if not isinstance(t, torch.Tensor) or t.dtype != torch.int32 or tuple(t.shape) != (batch,):
            raise TypeError(f"{where}: {name} must be an int32 tensor of shape ({batch},), got "
                            f"{getattr(t, 'dtype', type(t).__name__)} {tuple(getattr(t, 'shape', ()))}")
    tensors = [q, k_cache, v_cache, cache_seqlens, q_start] + ([block_table] if block_table is not None else [])
    if len({t.device for t in tensors}) != 1:
        raise ValueError(f"{where}: all tensors must be on one device, got {sorted({str(t.device) for t in tensors})}")
    stripe, stride, _ = slot_positions
    if stripe < 1 or stride < stripe:
        raise ValueError(f"{where}: slot_positions needs 1 <= stripe <= stride, got {slot_positions}")
    lens = cache_seqlens.cpu()
    if lens.numel() and int(lens.min()) < 0:
        raise ValueError(f"{where}: cache_seqlens must be >= 0, got {lens.tolist()}")
    if max_seqlen is not None and lens.numel() and int(lens.max()) > max_seqlen:
        raise ValueError(f"{where}: max_seqlen {max_seqlen} is below the longest cache length {int(lens.max())}")
    if block_table is None:
        if k_cache.shape[0] != batch:
            raise ValueError(f"{where}: contiguous cache has batch {k_cache.shape[0]} but q has {batch}")
        if lens.numel() and int(lens.max()) > k_cache.shape[1]:
            raise ValueError(f"{where}: cache_seqlens {lens.tolist()} exceed the cache capacity {k_cache.shape[1]}")
        return
    num_pages, page_size = k_cache.shape[0], k_cache.shape[1]
    if page_size < 16 or not is_power_of_two(page_size):
        raise ValueError(f"{where}: page size must be a power of two >= 16, got {page_size}")
    if not isinstance(block_table, torch.Tensor) or block_table.dtype != torch.int32 or block_table.dim() != 2 \
            or block_table.shape[0] != batch:
        raise TypeError(f"{where}: block_table must be an int32 tensor (batch={batch}, max_pages), got "
                        f"{getattr(block_table, 'dtype', type(block_table).__name__)} "
                        f"{tuple(getattr(block_table, 'shape', ()))}")
    table = block_table.cpu()
    for b, n in enumerate(lens.tolist()):
        used = -(-n // page_size)
        if used > table.shape[1]:
            raise ValueError(f"{where}: sequence {b} has {n} keys = {used} pages, but block_table has "
                             f"{table.shape[1]} columns")
        if used and (int(table[b, :used].min()) < 0 or int(table[b, :used].max()) >= num_pages):
            raise ValueError(f"{where}: block_table row {b} points outside the {num_pages} pages: "
                             f"{table[b, :used].tolist()}")


def decode_attention(q, k_cache, v_cache, cache_seqlens, q_start=None, block_table=None, softmax_scale=None,
                     causal=True, slot_positions=(1, 1, 0), num_splits=None, max_seqlen=None, validate=True,
                     out_dtype=None):
    """Attention of a few new query tokens per sequence over a (paged) KV cache.

    q (B, Sq, H, D); k_cache, v_cache (B, capacity, Hkv, D), or with
    ``block_table`` (B, max_pages) int32 the paged pool (num_pages, page_size,
    Hkv, D), page_size a power of two >= 16. cache_seqlens (B,) int32: valid
    slots per sequence. q_start (B,) int32: global position of query token 0
    (default ``cache_seqlens - Sq``: the new tokens are the cache's last Sq).
    slot_positions = (stripe, stride, offset) maps slots to key positions
    (module docstring). H must be a multiple of Hkv (GQA). With ``causal`` a
    key is visible iff key_pos <= query_pos.

    Returns (out (B, Sq, H, D) in q's dtype or ``out_dtype`` (float32 keeps a
    partial exact for a later merge), lse (B, H, Sq) float32 natural log,
    -inf where a query sees no key). ``validate=False`` skips the host-side
    checks (they read cache_seqlens and block_table back from the device);
    ``max_seqlen`` (a bound on cache_seqlens) likewise spares a read-back.
    """
    if q_start is None and isinstance(cache_seqlens, torch.Tensor) and isinstance(q, torch.Tensor) and q.dim() == 4:
        q_start = (cache_seqlens - q.shape[1]).to(torch.int32)
    slot_positions = tuple(int(x) for x in slot_positions)
    if validate:
        _validate(q, k_cache, v_cache, cache_seqlens, q_start, block_table, max_seqlen, slot_positions)
    batch, seqlen_q, heads, head_dim = q.shape
    heads_kv = k_cache.shape[2]
    group_size = heads // heads_kv
    if softmax_scale is None:
        softmax_scale = 1.0 / math.sqrt(head_dim)
    out = torch.empty(q.shape, dtype=out_dtype or q.dtype, device=q.device)
    lse = torch.empty((batch, heads, seqlen_q), dtype=torch.float32, device=q.device)
    if q.numel() == 0:
        return out, lse
    if max_seqlen is None:
        max_seqlen = int(cache_seqlens.max())
    paged = block_table is not None
    if num_splits is None:
        row_tiles = triton.cdiv(seqlen_q * group_size, 16)  # an estimate: BLOCK_M is tuned
        num_splits = _num_splits(q, batch, heads_kv, row_tiles, max_seqlen)
    num_splits = max(1, min(int(num_splits), max(1, max_seqlen)))
    split_len = max(1, triton.cdiv(max(1, max_seqlen), num_splits))
    if num_splits == 1:
        out_p, lse_p = out.unsqueeze(0), lse.unsqueeze(0)
    else:
        out_p = torch.empty((num_splits, *q.shape), dtype=torch.float32, device=q.device)
        lse_p = torch.empty((num_splits, batch, heads, seqlen_q), dtype=torch.float32, device=q.device)
    table = block_table if paged else cache_seqlens  # an unused pointer when contiguous
    args = (q, k_cache, v_cache, out_p, lse_p, cache_seqlens, q_start, table,
            *q.stride(), *k_cache.stride(), *v_cache.stride(), *out_p.stride(), *lse_p.stride(),
            table.stride(0),
            seqlen_q, heads_kv, group_size, head_dim, split_len,
            *slot_positions, float(softmax_scale) * LOG2_E)
    constants = {"PAGED": paged, "PAGE_SIZE": k_cache.shape[1] if paged else 1, "IS_CAUSAL": bool(causal),
                 "DOT_PRECISION": dot_precision(q.dtype), "BLOCK_D": block_d(head_dim)}
    grid = lambda meta: (batch * heads_kv, triton.cdiv(seqlen_q * group_size, meta["BLOCK_M"]), num_splits)  # noqa: E731
    launch(_decode_kernel, grid, args, constants, q)
    if num_splits > 1:
        merge_splits(out_p, lse_p, out=out, lse=lse)
    return out, lse
