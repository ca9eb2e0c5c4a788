"""Split-KV attention over a KV cache (flash-decoding), contiguous or paged.

A few query tokens per sequence (1 for plain decode, more for speculative
decoding or a prefill chunk) attend to a cache of keys and values:
  contiguous  k_cache (B, capacity, Hkv, D): sequence b's slot j at [b, j]
  paged       k_cache (num_pages, page_size, Hkv, D) and block_table (B, max_pages)
              int32: sequence b's slot j at [block_table[b, j // page_size], j % page_size]
``cache_seqlens[b]`` (int32) slots of sequence b are valid. Keys and queries have
one head dim (``HEAD_DIM``), values and the output their own (``HEAD_DIM_V``).

Latent form (``LATENT``, MLA): the values are the first ``HEAD_DIM_V`` columns of the
keys themselves (v_cache a view of k_cache's leading columns, one buffer). Each key
tile is then read once, as two column blocks: its first ``HEAD_DIM_V`` columns, which
are the value tile, and the rest (MLA's rotary part); q.k is the sum of the two
blocks' products, and the first block feeds the value product as it is.

Positions: query token t of sequence b sits at global position ``q_positions[b, t]``
(by default ``cache_seqlens[b] - Sq + t``); cache slot j holds the key at
    key_pos(j) = pos_offset + (j // pos_stripe) * pos_stride + j % pos_stripe,
i.e. the slots are runs of ``pos_stripe`` consecutive positions, run i starting
at ``pos_offset + i * pos_stride``. The default (1, 1, 0) is key_pos(j) = j; a
sequence-sharded cache whose rank holds every P-th stripe of S tokens passes
(S, P * S, rank * S). Which keys a query sees is the one visibility rule of
kernels/mask.py (causal, sliding window); this slot -> position map is decode's own.

One program handles one (sequence, kv head, tile of query rows, split). Its rows
are the (token, query head) pairs of the query heads that share that kv head
(GQA): row r is token r // group_size, head h_kv * group_size + r % group_size,
so each key/value tile is loaded once for the whole group and the dot products
have at least 16 rows even for a single token. The grid is fixed by the shapes
(``num_splits`` splits per tile), never by the lengths: each program finds the
slots its rows can see on the device and takes its split's share of them (none:
it writes the empty partial), so a decode step launches the same grid every step
and reads nothing back to the host (CUDA graphs, torch.compile). Each split
writes a partial (out, lse); ``merge_splits`` folds them with the one LSE merge
of kernels/merge.py. Notation as in flash_fwd.py (m_i, l_i, acc, base 2).

Both launches are torch custom operators: torch.compile traces them without entering Triton.
"""
import math
from typing import List, Optional, Tuple

import torch
import triton
import triton.language as tl

from .launcher import launch
from .checks import check_block_table, check_int_tensor, check_qkv, check_scale, check_sinks, check_softcap, check_window
from .mask import causal_window, visible, visible_range
from .merge import empty_as_minus_inf, finish_merge, merge_partials, partial_weight
from .softmax import dot_precision, finish_softmax, online_softmax_step, scores
from .tiles import block_d, grid_1d, needs_int64, offsets, program_tile, seq_base, tile_ptrs


@triton.jit
def _pair_ptrs(base, tok, head, offs_d, stride_s, stride_h, stride_d, WIDE: tl.constexpr):
    """Pointers to a tile whose row r is the (token tok[r], head head[r]) pair of the slice at ``base``."""
    return tile_ptrs(base, tok, offs_d, stride_s, stride_d, WIDE) + offsets(head, stride_h, WIDE)[:, None]


@triton.jit
def _slot_position(slot, pos_stripe, pos_stride, pos_offset):
    """Global position of the key in cache slot ``slot``."""
    return pos_offset + (slot // pos_stripe) * pos_stride + slot % pos_stripe


@triton.jit
def _slots_before(pos, pos_stripe, pos_stride, pos_offset):
    """How many slots hold keys at positions below ``pos`` (slots are in position order)."""
    rel = pos - pos_offset
    return tl.where(rel <= 0, 0, (rel // pos_stride) * pos_stripe + tl.minimum(rel % pos_stride, pos_stripe))


@triton.jit
def _rope_columns(HEAD_DIM, HEAD_DIM_V, BLOCK_DR: tl.constexpr):
    """The key columns past the values in the latent form, [HEAD_DIM_V, HEAD_DIM), in a tile of BLOCK_DR."""
    cols = HEAD_DIM_V + tl.arange(0, BLOCK_DR)
    return cols, cols < HEAD_DIM


@triton.jit(do_not_specialize=["seqlen_q", "pos_offset", "window_left", "window_right"])
def _decode_kernel(
    Q, K, V, Out, Lse, SeqLens, QPos, BlockTable, Sinks,
    stride_qb, stride_qs, stride_qh, stride_qd,
    stride_kb, stride_ks, stride_kh, stride_kd,
    stride_vb, stride_vs, stride_vh, stride_vd,
    stride_osplit, stride_ob, stride_os, stride_oh, stride_od,
    stride_lsplit, stride_lb, stride_lh, stride_ls,
    stride_pb, stride_ps, stride_btb,
    seqlen_q, num_heads_kv, group_size, num_splits,
    pos_stripe, pos_stride, pos_offset, window_left, window_right, softmax_scale, softcap,
    HEAD_DIM: tl.constexpr, HEAD_DIM_V: tl.constexpr, LATENT: tl.constexpr, PAGED: tl.constexpr,
    PAGE_SIZE: tl.constexpr, LEFT: tl.constexpr, RIGHT: tl.constexpr, SOFTCAP: tl.constexpr, SINKS: tl.constexpr,
    WIDE: tl.constexpr, DOT_PRECISION: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr,
    BLOCK_DR: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):
    tile, b, h_kv = program_tile(seqlen_q * group_size, num_heads_kv, BLOCK_M)
    split = tl.program_id(1)
    rows = tile * BLOCK_M + tl.arange(0, BLOCK_M)
    row_ok = rows < seqlen_q * group_size
    tok = rows // group_size
    head = rows % group_size  # the query head within kv head h_kv's group
    h0 = h_kv * group_size
    offs_n = tl.arange(0, BLOCK_N)
    offs_dv = tl.arange(0, BLOCK_DV)
    dv_ok = offs_dv < HEAD_DIM_V
    out_ok = row_ok[:, None] & dv_ok[None, :]

    Q = seq_base(Q, b, h0, 0, stride_qb, stride_qh, stride_qs)
    if LATENT:
        # q's columns in the key tile's two blocks: those facing the values, and the rest.
        key_cols, key_cols_ok = _rope_columns(HEAD_DIM, HEAD_DIM_V, BLOCK_DR)
        q = tl.load(_pair_ptrs(Q, tok, head, offs_dv, stride_qs, stride_qh, stride_qd, WIDE), mask=out_ok, other=0.0)
        q_rope = tl.load(_pair_ptrs(Q, tok, head, key_cols, stride_qs, stride_qh, stride_qd, WIDE),
                         mask=row_ok[:, None] & key_cols_ok[None, :], other=0.0)
    else:
        key_cols = tl.arange(0, BLOCK_D)
        key_cols_ok = key_cols < HEAD_DIM
        q = tl.load(_pair_ptrs(Q, tok, head, key_cols, stride_qs, stride_qh, stride_qd, WIDE),
                    mask=row_ok[:, None] & key_cols_ok[None, :], other=0.0)
    q_pos = tl.load(seq_base(QPos, b, 0, 0, stride_pb, 0, 0) + tok * stride_ps, mask=row_ok, other=0)
    seqlen_k = tl.load(SeqLens + b)

    # The key positions some row of the tile can see (the one rule), then the slots holding them.
    first_pos = tl.min(tl.where(row_ok, q_pos, 2147483647), 0)
    last_pos = tl.max(tl.where(row_ok, q_pos, -2147483647), 0)
    key_end = tl.where(seqlen_k > 0, _slot_position(seqlen_k - 1, pos_stripe, pos_stride, pos_offset) + 1, 0)
    seen_pos = visible_range(first_pos, last_pos, 0, key_end, window_left, window_right, LEFT, RIGHT, 1)
    slot_lo = _slots_before(seen_pos[0], pos_stripe, pos_stride, pos_offset)  # [0], [3]: the outer bounds
    slot_hi = _slots_before(seen_pos[3], pos_stripe, pos_stride, pos_offset)
    # Tiles start at multiples of BLOCK_N (the slots before slot_lo hold keys no row sees: masked), so
    # a tile never straddles a page of PAGE_SIZE >= BLOCK_N slots.
    slot_lo = (slot_lo // BLOCK_N) * BLOCK_N
    # This split's share, in whole key tiles: every sequence spreads its own visible keys over all
    # splits, and a split with no share loops zero times and writes the empty partial.
    per_split = tl.cdiv(tl.cdiv(slot_hi - slot_lo, num_splits), BLOCK_N) * BLOCK_N
    lo = slot_lo + split * per_split
    hi = tl.minimum(lo + per_split, slot_hi)

    if PAGED:
        K = seq_base(K, 0, h_kv, 0, stride_kb, stride_kh, stride_ks)
        V = seq_base(V, 0, h_kv, 0, stride_vb, stride_vh, stride_vs)
        table = seq_base(BlockTable, b, 0, 0, stride_btb, 0, 0)
    else:
        K = seq_base(K, b, h_kv, 0, stride_kb, stride_kh, stride_ks)
        V = seq_base(V, b, h_kv, 0, stride_vb, stride_vh, stride_vs)

    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_DV], dtype=tl.float32)
    for start_n in range(lo, hi, BLOCK_N):
        cols = start_n + offs_n
        col_ok = cols < hi
        if PAGED and PAGE_SIZE >= BLOCK_N:
            # The tile lies in one page: one table entry, then rows as in a contiguous cache.
            page = tl.load(table + start_n // PAGE_SIZE).to(tl.int64)
            k_ptrs = tile_ptrs(K + page * stride_kb, key_cols, cols % PAGE_SIZE, stride_kd, stride_ks, WIDE)
            v_ptrs = tile_ptrs(V + page * stride_vb, cols % PAGE_SIZE, offs_dv, stride_vs, stride_vd, WIDE)
        elif PAGED:
            # Pages smaller than a tile: each column looks up its own page.
            page = tl.load(table + cols // PAGE_SIZE, mask=col_ok, other=0).to(tl.int64)
            k_ptrs = tile_ptrs(K + (page * stride_kb)[None, :], key_cols, cols % PAGE_SIZE, stride_kd, stride_ks,
                               WIDE)
            v_ptrs = tile_ptrs(V + (page * stride_vb)[:, None], cols % PAGE_SIZE, offs_dv, stride_vs, stride_vd,
                               WIDE)
        else:
            k_ptrs = tile_ptrs(K, key_cols, cols, stride_kd, stride_ks, WIDE)
            v_ptrs = tile_ptrs(V, cols, offs_dv, stride_vs, stride_vd, WIDE)
        # K is loaded as (columns, BLOCK_N), ready for q @ k^T.
        k = tl.load(k_ptrs, mask=key_cols_ok[:, None] & col_ok[None, :], other=0.0)
        if LATENT:
            # The value tile is the key tile's first HEAD_DIM_V columns: read once, used by both products.
            v = tl.load(v_ptrs, mask=col_ok[:, None] & dv_ok[None, :], other=0.0)
            qk = tl.dot(q_rope, k, tl.dot(q, tl.trans(v), input_precision=DOT_PRECISION),
                        input_precision=DOT_PRECISION)
        else:
            qk = tl.dot(q, k, input_precision=DOT_PRECISION)
        s = scores(qk, softmax_scale, softcap, SOFTCAP)[0]
        key_pos = _slot_position(cols, pos_stripe, pos_stride, pos_offset)
        seen = col_ok[None, :] & visible(q_pos[:, None], key_pos[None, :], window_left, window_right, LEFT, RIGHT)
        s = tl.where(seen, s, float("-inf"))
        p, alpha, m_i, l_i = online_softmax_step(s, m_i, l_i, 1.0)
        if not LATENT:
            v = tl.load(v_ptrs, mask=col_ok[:, None] & dv_ok[None, :], other=0.0)
        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=DOT_PRECISION)

    # An empty split (or rows with no visible key) gives out = 0, lse = -inf: the merge's identity.
    out, lse = finish_softmax(acc, l_i, m_i)
    if SINKS:
        # A sink is the partial (out 0, lse sink_h); split 0 alone folds it in, so it counts once.
        sink = tl.load(Sinks + h0 + head, mask=row_ok, other=float("-inf")).to(tl.float32)
        sink = tl.where(split == 0, sink, float("-inf"))
        out, lse = merge_partials(out, lse, tl.zeros([BLOCK_M, BLOCK_DV], dtype=tl.float32), sink)
    # (split, sequence, first head of the group) through seq_base's three int64 index/stride pairs.
    out_base = seq_base(Out, split, b, h0, stride_osplit, stride_ob, stride_oh)
    lse_base = seq_base(Lse, split, b, h0, stride_lsplit, stride_lb, stride_lh)
    tl.store(_pair_ptrs(out_base, tok, head, offs_dv, stride_os, stride_oh, stride_od, WIDE),
             out.to(Out.dtype.element_ty), mask=out_ok)
    tl.store(lse_base + offsets(head, stride_lh, WIDE) + offsets(tok, stride_ls, WIDE), lse, mask=row_ok)


@triton.jit
def _merge_splits_kernel(
    OutP, LseP, Out, Lse,
    stride_psplit, stride_pb, stride_ps, stride_ph, stride_pd,
    stride_lpsplit, stride_lpb, stride_lph, stride_lps,
    stride_ob, stride_os, stride_oh, stride_od,
    stride_lb, stride_lh, stride_ls,
    num_splits, seqlen, num_heads, HEAD_DIM: tl.constexpr, WIDE: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr,
):
    # Rows are (token, head) pairs of one sequence, so a decode step's few tokens still fill a tile.
    tile, b, _ = program_tile(seqlen * num_heads, 1, BLOCK_M)
    rows = tile * BLOCK_M + tl.arange(0, BLOCK_M)
    tok = rows // num_heads
    head = rows % num_heads
    offs_d = tl.arange(0, BLOCK_D)
    row_ok = rows < seqlen * num_heads
    tile_ok = row_ok[:, None] & (offs_d[None, :] < HEAD_DIM)
    # (split, sequence) through seq_base's int64 pair: no overflow however many splits.
    # Two passes (kernels/merge.py): the largest lse of each row, then the weighted sums.
    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    for split in range(0, num_splits):
        lse_s = tl.load(seq_base(LseP, split, b, 0, stride_lpsplit, stride_lpb, 0) + offsets(head, stride_lph, WIDE)
                        + offsets(tok, stride_lps, WIDE), mask=row_ok, other=float("-inf"))
        m_i = tl.maximum(m_i, empty_as_minus_inf(lse_s))
    acc = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    for split in range(0, num_splits):
        lse_s = tl.load(seq_base(LseP, split, b, 0, stride_lpsplit, stride_lpb, 0) + offsets(head, stride_lph, WIDE)
                        + offsets(tok, stride_lps, WIDE), mask=row_ok, other=float("-inf"))
        o_s = tl.load(_pair_ptrs(seq_base(OutP, split, b, 0, stride_psplit, stride_pb, 0), tok, head, offs_d,
                                 stride_ps, stride_ph, stride_pd, WIDE), mask=tile_ok, other=0.0).to(tl.float32)
        w_s = partial_weight(lse_s, m_i)
        acc += o_s * w_s[:, None]
        l_i += w_s
    lse, inv = finish_merge(m_i, l_i)
    o = acc * inv[:, None]
    tl.store(_pair_ptrs(seq_base(Out, b, 0, 0, stride_ob, 0, 0), tok, head, offs_d, stride_os, stride_oh, stride_od,
                        WIDE), o.to(Out.dtype.element_ty), mask=tile_ok)
    tl.store(seq_base(Lse, b, 0, 0, stride_lb, 0, 0) + offsets(head, stride_lh, WIDE) + offsets(tok, stride_ls, WIDE),
             lse, mask=row_ok)


def _merge_splits_into(out_parts, lse_parts, out, lse):
    num_splits, batch, seqlen, heads, head_dim = out_parts.shape
    if out.numel() == 0:
        return out, lse
    if num_splits == 0:  # nothing to fold: the empty state (out 0, lse -inf), as the kernel would leave it
        return out.zero_(), lse.fill_(float("-inf"))
    args = (out_parts, lse_parts, out, lse, *out_parts.stride(), *lse_parts.stride(), *out.stride(), *lse.stride(),
            num_splits, seqlen, heads)
    constants = {"HEAD_DIM": head_dim, "WIDE": needs_int64(out_parts[0], lse_parts[0], out, lse),
                 "BLOCK_D": block_d(head_dim)}
    launch(_merge_splits_kernel, grid_1d(seqlen * heads, batch), args, constants, out_parts)
    return out, lse


def _merge_splits_new(out_parts: torch.Tensor, lse_parts: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
    batch, seqlen, heads = out_parts.shape[1:4]
    out = torch.empty(out_parts.shape[1:], dtype=out_parts.dtype, device=out_parts.device)
    lse = torch.empty((batch, heads, seqlen), dtype=torch.float32, device=out_parts.device)
    return _merge_splits_into(out_parts, lse_parts, out, lse)


_merge_splits_op = torch.library.custom_op("cpattn::merge_splits", _merge_splits_new, mutates_args=())


@_merge_splits_op.register_fake
def _(out_parts, lse_parts):
    batch, seqlen, heads = out_parts.shape[1:4]
    return out_parts.new_empty(out_parts.shape[1:]), out_parts.new_empty((batch, heads, seqlen), dtype=torch.float32)


def _call(op, fn, *args):
    """The custom operator ``op`` while torch.compile traces, its function ``fn`` otherwise: eager calls
    skip the dispatcher, and a process that never compiles never imports torch._dynamo."""
    return op(*args) if torch.compiler.is_compiling() else fn(*args)


def _check_splits(out_parts, lse_parts, out, lse):
    where = "merge_splits"
    for name, t in (("out_parts", out_parts), ("lse_parts", lse_parts), ("out", out), ("lse", lse)):
        if t is not None and not isinstance(t, torch.Tensor):
            raise TypeError(f"{where}: {name} must be a torch.Tensor, got {type(t).__name__}")
    if out_parts.dim() != 5:
        raise ValueError(f"{where}: out_parts must be (splits, batch, seqlen, heads, headdim), got shape "
                         f"{tuple(out_parts.shape)}")
    num_splits, batch, seqlen, heads, _ = out_parts.shape
    if tuple(lse_parts.shape) != (num_splits, batch, heads, seqlen):
        raise ValueError(f"{where}: lse_parts must have shape {(num_splits, batch, heads, seqlen)}, "
                         f"got {tuple(lse_parts.shape)}")
    if out is not None and tuple(out.shape) != tuple(out_parts.shape[1:]):
        raise ValueError(f"{where}: out must have shape {tuple(out_parts.shape[1:])}, got {tuple(out.shape)}")
    if lse is not None and tuple(lse.shape) != (batch, heads, seqlen):
        raise ValueError(f"{where}: lse must have shape {(batch, heads, seqlen)}, got {tuple(lse.shape)}")
    for name, t in (("out_parts", out_parts), ("out", out)):
        if t is not None and not t.is_floating_point():
            raise TypeError(f"{where}: {name} must be a floating-point tensor, got {t.dtype}")
    for name, t in (("lse_parts", lse_parts), ("lse", lse)):
        if t is not None and t.dtype != torch.float32:
            raise TypeError(f"{where}: {name} must be float32, got {t.dtype}")
    devices = {t.device for t in (out_parts, lse_parts, out, lse) if t is not None}
    if len(devices) != 1:
        raise ValueError(f"{where}: all tensors must be on one device, got {sorted(map(str, devices))}")


def merge_splits(out_parts, lse_parts, out=None, lse=None):
    """Merge N partials stacked on dim 0: out_parts (N, B, S, H, D), lse_parts (N, B, H, S) fp32.

    Returns (out, lse): out (B, S, H, D) in ``out``'s dtype (default out_parts'),
    lse (B, H, S) float32. The fold is the LSE merge of kernels/merge.py, in order
    0..N-1, so equal inputs give equal bits; it stays exact to fp32 for any finite
    lse, and an lse of -inf or +inf is an empty partial. N = 0 gives the empty
    state (out 0, lse -inf). Serves both the split-KV reduction and the merges
    across ranks. Without ``out``/``lse`` it is a torch custom operator
    (torch.compile traces it).
    """
    _check_splits(out_parts, lse_parts, out, lse)
    if out is None and lse is None:
        return _call(_merge_splits_op, _merge_splits_new, out_parts, lse_parts)
    batch, seqlen, heads = out_parts.shape[1:4]
    if out is None:
        out = torch.empty(out_parts.shape[1:], dtype=out_parts.dtype, device=out_parts.device)
    if lse is None:
        lse = torch.empty((batch, heads, seqlen), dtype=torch.float32, device=out_parts.device)
    return _merge_splits_into(out_parts, lse_parts, out, lse)


def _num_splits(q, batch, heads_kv, q_tiles, max_keys):
    """Enough programs to fill the GPU, but at least ~256 keys per split (fewer on CPU).

    A function of shapes and bounds only, so a decode loop keeps one grid."""
    if q.device.type == "cpu":
        return 1  # the interpreter runs programs one after another: splitting only adds a merge
    sms = torch.cuda.get_device_properties(q.device).multi_processor_count
    want = triton.cdiv(2 * sms, batch * heads_kv * q_tiles)
    return max(1, min(want, triton.cdiv(max_keys, 256), 64))


def _decode(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, cache_seqlens: torch.Tensor,
               q_positions: torch.Tensor, block_table: Optional[torch.Tensor], sinks: Optional[torch.Tensor],
               softmax_scale: float, window_left: int, window_right: int, softcap: float,
               slot_positions: List[int], num_splits: int, out_dtype: torch.dtype) -> Tuple[torch.Tensor, torch.Tensor]:
    batch, seqlen_q, heads, head_dim = q.shape
    heads_kv, value_dim = k_cache.shape[2], v_cache.shape[-1]
    out = torch.empty((batch, seqlen_q, heads, value_dim), dtype=out_dtype, device=q.device)
    lse = torch.empty((batch, heads, seqlen_q), dtype=torch.float32, device=q.device)
    if q.numel() == 0:
        return out, lse
    paged = block_table is not None
    if num_splits == 1:
        out_p, lse_p = out.unsqueeze(0), lse.unsqueeze(0)
    else:
        out_p = torch.empty((num_splits, *out.shape), dtype=torch.float32, device=q.device)
        lse_p = torch.empty((num_splits, batch, heads, seqlen_q), dtype=torch.float32, device=q.device)
    table = block_table if paged else cache_seqlens  # an unused pointer when contiguous
    args = (q, k_cache, v_cache, out_p, lse_p, cache_seqlens, q_positions, table, q if sinks is None else sinks,
            *q.stride(), *k_cache.stride(), *v_cache.stride(), *out_p.stride(), *lse_p.stride(),
            *q_positions.stride(), table.stride(0),
            seqlen_q, heads_kv, heads // heads_kv, num_splits,
            *slot_positions, max(window_left, 0), max(window_right, 0), softmax_scale, softcap or 1.0)
    latent = is_leading_columns(v_cache, k_cache)  # one buffer: read each key tile once (module docstring)
    constants = {"HEAD_DIM": head_dim, "HEAD_DIM_V": value_dim, "LATENT": latent, "PAGED": paged,
                 "PAGE_SIZE": k_cache.shape[1] if paged else 1,
                 "LEFT": window_left >= 0, "RIGHT": window_right >= 0, "SOFTCAP": softcap > 0,
                 "SINKS": sinks is not None, "WIDE": needs_int64(q, k_cache, v_cache, out_p[0], lse_p[0]),
                 "DOT_PRECISION": dot_precision(q.dtype), "BLOCK_D": block_d(head_dim),
                 # BLOCK_DR: the latent form's tile of the key columns past the values (unused otherwise)
                 "BLOCK_DV": block_d(value_dim), "BLOCK_DR": block_d(head_dim - value_dim) if latent else 16}
    tiles = grid_1d(seqlen_q * (heads // heads_kv), batch * heads_kv)
    launch(_decode_kernel, lambda meta: (*tiles(meta), num_splits), args, constants, q)
    if num_splits > 1:
        _merge_splits_into(out_p, lse_p, out, lse)
    return out, lse


_decode_op = torch.library.custom_op("cpattn::decode_attention", _decode, mutates_args=())


@_decode_op.register_fake
def _(q, k_cache, v_cache, cache_seqlens, q_positions, block_table, sinks, softmax_scale, window_left,
      window_right, softcap, slot_positions, num_splits, out_dtype):
    batch, seqlen_q, heads, _ = q.shape
    return (q.new_empty((batch, seqlen_q, heads, v_cache.shape[-1]), dtype=out_dtype),
            q.new_empty((batch, heads, seqlen_q), dtype=torch.float32))


def is_leading_columns(v_cache, k_cache):
    """Whether ``v_cache`` is a view of ``k_cache``'s first columns and nothing else (the latent form of
    the module docstring: an MLA cache whose values are the leading columns of its keys)."""
    return (v_cache.shape[-1] < k_cache.shape[-1] and v_cache.shape[:-1] == k_cache.shape[:-1]
            and v_cache.stride() == k_cache.stride() and v_cache.dtype == k_cache.dtype
            and v_cache.device == k_cache.device and v_cache.data_ptr() == k_cache.data_ptr())


def _validate(q, k_cache, v_cache, cache_seqlens, q_start, q_positions, block_table, max_seqlen, slot_positions,
              sinks):
    where = "decode_attention"
    paged = block_table is not None
    if paged and isinstance(k_cache, torch.Tensor) and k_cache.dim() == 4 and k_cache.shape[0] == 0:
        raise ValueError(f"{where}: the page pool k_cache holds no pages")
    # The shared q/k/v checks; a paged pool is seen as one page per sequence (a broadcast view, no copy).
    def per_sequence(t):
        if paged and isinstance(t, torch.Tensor) and t.dim() == 4 and isinstance(q, torch.Tensor) and q.dim() == 4:
            return t[:1].expand(q.shape[0], -1, -1, -1)
        return t
    batch, seqlen_q, _, heads, _, _ = check_qkv(q, per_sequence(k_cache), per_sequence(v_cache), where,
                                                same_value_dim=False)
    if q.device.type == "cpu" and q.dtype == torch.bfloat16:
        raise TypeError(f"{where}: bfloat16 on CPU is not supported by Triton's interpreter; pass float32")
    if k_cache.shape[:-1] != v_cache.shape[:-1]:
        raise ValueError(f"{where}: k_cache and v_cache shapes differ (other than in the head dim): "
                         f"{tuple(k_cache.shape)} vs {tuple(v_cache.shape)}")
    check_int_tensor(cache_seqlens, "cache_seqlens", (batch,), q.device, where)
    if q_start is not None:
        check_int_tensor(q_start, "q_start", (batch,), q.device, where)
    if q_positions is not None:
        check_int_tensor(q_positions, "q_positions", (batch, seqlen_q), q.device, where)
    check_sinks(sinks, heads, q.device, where)
    stripe, stride, _ = slot_positions
    if stripe < 1 or stride < stripe:
        raise ValueError(f"{where}: slot_positions needs 1 <= stripe <= stride, got {slot_positions}")
    lens = cache_seqlens.cpu()
    if lens.numel() and int(lens.min()) < 0:
        raise ValueError(f"{where}: cache_seqlens must be >= 0, got {lens.tolist()}")
    if max_seqlen is not None and lens.numel() and int(lens.max()) > max_seqlen:
        raise ValueError(f"{where}: max_seqlen {max_seqlen} is below the longest cache length {int(lens.max())}")
    if not paged:
        if k_cache.shape[0] != batch:
            raise ValueError(f"{where}: contiguous cache has batch {k_cache.shape[0]} but q has {batch}")
        if lens.numel() and int(lens.max()) > k_cache.shape[1]:
            raise ValueError(f"{where}: cache_seqlens {lens.tolist()} exceed the cache capacity {k_cache.shape[1]}")
        return
    check_block_table(block_table, k_cache, batch, q.device, where, lengths=lens.tolist())


def decode_attention(q, k_cache, v_cache, cache_seqlens, q_start=None, block_table=None, softmax_scale=None,
                     causal=True, slot_positions=(1, 1, 0), num_splits=None, max_seqlen=None, validate=True,
                     out_dtype=None, window_size=(-1, -1), softcap=0.0, sinks=None, q_positions=None):
    """Attention of a few new query tokens per sequence over a (paged) KV cache.

    q (B, Sq, H, D); k_cache (B, capacity, Hkv, D), v_cache (B, capacity, Hkv, Dv),
    or with ``block_table`` (B, max_pages) int32 the paged pools (num_pages, page_size,
    Hkv, D or Dv), page_size a power of two >= 16. ``v_cache = k_cache[..., :Dv]``
    (a view, Dv < D) is the latent form (MLA): each key tile is read once and its
    first Dv columns serve as the value tile. cache_seqlens (B,) int32: valid
    slots per sequence. Query positions: ``q_positions`` (B, Sq) int32, or
    ``q_start`` (B,) int32 for token t at q_start[b] + t (default
    ``cache_seqlens - Sq``: the new tokens are the cache's last Sq).
    slot_positions = (stripe, stride, offset) maps slots to key positions
    (module docstring). H must be a multiple of Hkv (GQA).
    Visibility (kernels/mask.py): ``window_size=(left, right)`` as flash-attn
    (-1: unbounded), ``causal`` sets right = 0. ``softcap > 0`` caps the
    logits (``softcap * tanh(s / softcap)``); ``sinks`` (H,) float32 adds one
    value-less logit per head, once.

    Returns (out (B, Sq, H, Dv) in q's dtype or ``out_dtype`` (float32 keeps a
    partial exact for a later merge), lse (B, H, Sq) float32 natural log,
    -inf where a query sees no key). ``validate=False`` skips the host-side
    checks (they read cache_seqlens and block_table back from the device), so
    the call reads nothing back: CUDA-graph capturable and torch.compile
    friendly. ``num_splits`` defaults to a function of the shapes and of
    ``max_seqlen`` (a bound on cache_seqlens; default: the cache capacity), so a
    decode loop launches the same grid every step.
    """
    if validate:
        softmax_scale = check_scale(softmax_scale, "decode_attention")
        window_size = check_window(window_size, "decode_attention")
        softcap = check_softcap(softcap, "decode_attention")
    window_left, window_right = causal_window(causal, window_size)
    slot_positions = [int(x) for x in slot_positions]
    if validate:
        _validate(q, k_cache, v_cache, cache_seqlens, q_start, q_positions, block_table, max_seqlen, slot_positions,
                  sinks)
    if q_positions is None:
        if q_start is None:
            q_start = cache_seqlens - q.shape[1]
        q_positions = (q_start[:, None] + torch.arange(q.shape[1], device=q.device)).to(torch.int32)
    batch, seqlen_q, heads, head_dim = q.shape
    heads_kv = k_cache.shape[2]
    if softmax_scale is None:
        softmax_scale = 1.0 / math.sqrt(head_dim)
    if num_splits is None:
        max_keys = max_seqlen if max_seqlen is not None else \
            (block_table.shape[1] * k_cache.shape[1] if block_table is not None else k_cache.shape[1])
        if window_left >= 0:
            max_keys = min(max_keys, window_left + seqlen_q)
        row_tiles = triton.cdiv(seqlen_q * (heads // heads_kv), 16)  # an estimate: BLOCK_M is tuned
        num_splits = _num_splits(q, batch, heads_kv, row_tiles, max(1, max_keys))
    return _call(_decode_op, _decode, q, k_cache, v_cache, cache_seqlens, q_positions, block_table, sinks,
                 float(softmax_scale), window_left, window_right, float(softcap or 0.0), slot_positions,
                 max(1, int(num_splits)), out_dtype or q.dtype)
