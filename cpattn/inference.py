"""Context-parallel inference: chunked prefill and decode over a sequence-sharded KV cache.

Serving a long context runs out of KV-cache memory on one device. Here the
cache of every attention layer is sharded along the sequence over a process
group (``ShardedKVCache``, one per layer), and attention over it is computed
where the keys live.

* **Layout**: positions are dealt out in stripes of ``page_size`` (or
  ``stripe``) tokens round-robin over the ranks, so every rank holds ~L/P keys
  of every sequence at every length L (balanced decode work and memory).
* **Prefill** of a chunk of n tokens (each rank passes the same number of them,
  at indices ``token_index`` into the chunk): every rank all-gathers the
  chunk's k, v and stores the ones it owns. Then one of two exact strategies:
  - *pass-Q*: the chunk's queries are all-gathered too; every rank attends all n
    queries to its own shard (its share of the history and of the chunk), and
    the partials (out, lse) go back to the ranks that hold those queries
    (all-to-all) to be merged by their log-sum-exp. Moves O(chunk).
  - *pass-KV*: every rank keeps its queries; the shards travel round the ring
    (the transfer of step s+1 posted before step s's kernel) and each rank merges
    its partials locally. Moves O(history + chunk) of keys and values, but no
    queries and no outputs.
  ``strategy="auto"`` picks the one that moves fewer bytes (``prefill_bytes``):
  pass-KV when the new tokens are a large enough share of the context,
  new / (new + cached) above roughly Hkv / H (the key/value heads are fewer
  than the query heads, and pass-Q also returns fp32 outputs).
* **Decode**: the new token(s) and their keys and values are replicated on
  every rank; each rank stores the keys it owns, runs the split-KV kernel on its
  shard, and the partials are merged across ranks (``decode_merge_bytes``):
  with 2 ranks one all-gather of the packed fp32 (out, lse) and a fold in rank
  order; with more, an all-to-all hands each rank 1/P of the rows of every
  rank's partial, it folds them in rank order, and an all-gather returns the
  merged rows: 2 (P-1)/P copies of a partial per rank instead of P-1. Either
  way every rank ends with the same bits.
* **No host round trip in decode**: ``decode_step`` reads and writes only
  device state with fixed shapes and launches a fixed grid, so it can run
  under ``torch.compile(fullgraph=True)`` or be captured in a CUDA graph;
  ``decode`` adds the per-call checks, the page allocation (host bookkeeping,
  no device read) and the cross-rank agreement on the inputs.
* **Local attention**: ``window_size`` (flash-attn's (left, right); prefill and
  decode are causal, so only ``left`` matters), ``softcap`` and ``sinks`` as in
  cpattn's attention. A rank whose shard holds no key inside the window of any
  query launches no kernel in ``prefill``/``decode`` (its partial is the empty
  one); under ``decode_step`` its programs exit at once. A sink is folded in
  exactly once (rank 0's partial in pass-Q and decode, the local step in pass-KV).
* Errors: wrong shapes, dtypes, devices, head counts, overflow of the capacity
  or of the page pool raise ``ValueError``/``TypeError`` before anything is
  written, on every rank alike, so the cache is unchanged and no rank hangs.
  A failure later in ``prefill`` or ``decode`` (out of memory, a kernel error)
  takes faults.py's path: the rank at fault raises its error, the others
  ``PeerFailure`` naming it, within the cache's ``timeout``; the caches sharing
  that process group then refuse further collective calls. ``decode_step``
  has no such path (a graph holds no ``try``): there a failed peer surfaces as
  the collective's own timeout error.
"""
import math
from typing import NamedTuple, Optional

import torch
import torch.distributed as dist
import torch.distributed._functional_collectives as funcol

from cpattn.kernels import decode_attention, merge_splits

from .checks import check_kv, check_scale, check_seq_dim, check_sinks, check_softcap, check_window, positive_int
from .agreement import agree
from .ops import kernel_dtype
from .comm import gather_rows
from .faults import collective, fault_path, fault_point
from .kv_cache import ShardedKVCache, packed_tokens
from .latent import ValueLayout
from .layout import Layout
from .partials import empty_partial, stack_partial, unstack_partial
from cpattn.kernels import MaskSpec

STRATEGIES = ("auto", "pass-q", "pass-kv")


# ---- checks -------------------------------------------------------------------------------------------
def _check_q(cache, q, k, v, batch, where, allow_empty=False):
    if not isinstance(q, torch.Tensor):
        raise TypeError(f"{where}: q must be a torch.Tensor, got {type(q).__name__}")
    if q.dim() != 4:
        raise ValueError(f"{where}: q must be 4-D (batch, tokens, heads, head dim), got shape {tuple(q.shape)}")
    if q.dtype != cache.dtype:
        raise TypeError(f"{where}: q has dtype {q.dtype}, the cache holds {cache.dtype}")
    if q.device != cache.device:
        raise ValueError(f"{where}: q is on {q.device}, the cache on {cache.device}")
    if q.shape[0] != batch or q.shape[3] != cache.head_dim:
        raise ValueError(f"{where}: q must have shape (batch={batch}, tokens, heads, head_dim={cache.head_dim}), "
                         f"got {tuple(q.shape)}")
    if q.shape[2] % cache.num_kv_heads != 0:
        raise ValueError(f"{where}: query heads ({q.shape[2]}) must be a multiple of the cache's kv heads "
                         f"({cache.num_kv_heads})")
    check_kv(k, v, batch, cache.num_kv_heads, cache.head_dim, cache.dtype, cache.device, where, cache.v_head_dim,
             cache.latent)
    if k.shape[1] != q.shape[1]:
        raise ValueError(f"{where}: q has {q.shape[1]} tokens but k, v have {k.shape[1]}")
    if q.shape[1] == 0 and not allow_empty:
        raise ValueError(f"{where}: q, k, v hold no tokens")


class _Options:
    """The attention options of one call, checked: scale, mask, softcap, sinks (no host read)."""

    def __init__(self, cache, q, softmax_scale, window_size, softcap, sinks, where):
        self.scale = check_scale(softmax_scale, where)
        self.mask = MaskSpec(True, check_window(window_size, where))  # prefill and decode are causal
        self.softcap = check_softcap(softcap, where)
        self.sinks = check_sinks(sinks, q.shape[2], cache.device, where)


def _check_call(cache, q, k, v, batch_index, softmax_scale, window_size, softcap, sinks, where, packed=None):
    """The checks prefill and decode share; returns (the sequences' ids, the options). ``packed``: prefill's
    mode, None for decode (prefill: a rank may hold no token; a packed chunk is one row of q)."""
    ids = cache.sequence_ids(batch_index)
    _check_q(cache, q, k, v, 1 if packed else len(ids), where, allow_empty=packed is not None)
    return ids, _Options(cache, q, softmax_scale, window_size, softcap, sinks, where)


class CacheCall(NamedTuple):
    """What must be the same on every rank in one ``prefill`` or ``decode`` (agreement.py): ranks with
    different windows, say, would merge partials of different attentions."""
    tokens: Optional[int]  # the new tokens (decode), this rank's tokens of the chunk (prefill without
    #                        token_index); None: prefill with token_index, where ranks may hold different counts
    heads: int
    strategy: Optional[str]  # prefill's, None for decode
    window_left: int
    softcap: float
    sinks_given: bool
    batch_index: tuple  # which sequences, in which order
    packing: Optional[tuple]  # prefill's cu_seqlens

    FIXES = {"heads": "pass q with the same number of heads on every rank",
             "sinks_given": "pass sinks on every rank or on none",
             "batch_index": "pass the same batch_index on every rank",
             "packing": "pass the same cu_seqlens on every rank, or none"}

    @classmethod
    def of(cls, q, strategy, options, ids, count_tokens=True, packing=None):
        return cls(q.shape[1] if count_tokens else None, q.shape[2], strategy, options.mask.left, options.softcap,
                   options.sinks is not None, tuple(ids.tolist()), packing)


def _agree(cache, where, check, hint, fixes):
    """``agreement.agree`` on a prefill or decode, on the cache's own process group (bounded by its
    timeout); every call, unless the cache was built with check_across_ranks=False."""
    return agree(where, check, comm=cache.comm if cache.check_across_ranks else None, hint=hint, fixes=fixes)


# ---- attention on this rank's shard ---------------------------------------------------------------------
def _sees_nothing(layout, rank, lens, first_pos, last_pos, mask):
    """Host check: does ``rank`` hold no key that a query at positions [first_pos, last_pos] (host int64
    tensors per sequence) can see, for global lengths ``lens``? Then it may skip its kernel."""
    lo, hi = mask.visible_keys(first_pos, last_pos, lens)
    return bool((layout.local_lengths(hi, rank) <= layout.local_lengths(torch.minimum(lo, hi), rank)).all())


def _attend(q, k, v, lens, q_positions, block_table, slot_positions, options, sinks):
    """Partial attention (out fp32, lse) of q at ``q_positions`` over one shard of keys (device tensors)."""
    dtype = kernel_dtype(q)  # bf16 on CPU runs in fp32 (the interpreter has no bf16 matmul)
    return decode_attention(
        q.to(dtype), k.to(dtype), v.to(dtype), lens.to(torch.int32), q_positions=q_positions.to(torch.int32),
        block_table=block_table, softmax_scale=options.scale, causal=True, slot_positions=slot_positions,
        validate=False, out_dtype=torch.float32, window_size=options.mask.window, softcap=options.softcap, sinks=sinks)


def _attend_local(cache, dev_ids, lens, q, q_positions, options, sinks):
    """Partial attention over this rank's own shard of sequences ``dev_ids`` of global lengths ``lens``
    (device tensors)."""
    k, v, table = cache.local_view(dev_ids)
    return _attend(q, k, v, cache.layout.local_lengths(lens, cache.rank), q_positions, table, cache.layout.slot_positions(cache.rank),
                   options, sinks)


# ---- the decode merge across ranks ------------------------------------------------------------------------
# Functional collectives: torch.compile traces them; wait_tensor hands the kernels a plain tensor.
def _all_gather(x, group):
    return funcol.wait_tensor(funcol.all_gather_single(x, 0, group))


def _all_to_all(x, group):
    return funcol.wait_tensor(funcol.all_to_all_single(x, None, None, group))


def decode_merge_bytes(world, rows, head_dim):
    """Bytes each rank sends (and receives) to merge one decode step's partials across ``world`` ranks:
    ``rows`` = batch x new tokens x query heads, each an fp32 (out, lse) of head_dim + 1 values.

    World 2: an all-gather of the whole partial. More: an all-to-all of 1/P of the rows to
    each rank and an all-gather of the merged rows, 2 (P-1)/P copies instead of P-1."""
    row_bytes = (head_dim + 1) * 4
    if world == 1:
        return 0
    if world == 2:
        return rows * row_bytes
    return 2 * (world - 1) * math.ceil(rows / world) * row_bytes


def _merge_across_ranks(out, lse, group, world):
    """Exact LSE merge of every rank's partial (out fp32 (B, n, H, D), lse (B, H, n)); the same bits on
    every rank. Functional collectives: traceable by torch.compile, capturable on CUDA."""
    batch, n, heads, head_dim = out.shape
    stacked = stack_partial(out, lse)
    if world == 2:
        every = _all_gather(stacked.unsqueeze(0), group)  # (world, B, n, H, D + 1), in rank order
        return merge_splits(*unstack_partial(every))
    rows = stacked.reshape(-1, head_dim + 1)
    per = math.ceil(rows.shape[0] / world)
    rows = torch.nn.functional.pad(rows, (0, 0, 0, per * world - rows.shape[0]))
    # Rank j receives every rank's partial of rows [j * per, (j + 1) * per), stacked in rank order.
    mine = _all_to_all(rows, group).view(world, 1, per, 1, head_dim + 1)
    out_mine, lse_mine = merge_splits(*unstack_partial(mine))
    merged = _all_gather(stack_partial(out_mine, lse_mine).reshape(per, head_dim + 1), group)
    return unstack_partial(merged[: batch * n * heads].view(batch, n, heads, head_dim + 1))


def _decode_local(cache, dev_ids, q, k, v, options, attend=True):
    """Store the new tokens and attend this rank's shard (or, without ``attend``, contribute the empty
    partial): device state only, fixed shapes, no host read; the lengths do not change. Returns this
    rank's partial (out, lse)."""
    lens = cache.seqlens_device[dev_ids]
    positions = lens[:, None] + torch.arange(q.shape[1], device=cache.device)
    cache.store(dev_ids, positions, k, v)
    if attend:
        return _attend_local(cache, dev_ids, lens + q.shape[1], q, positions, options,
                             options.sinks if cache.rank == 0 else None)
    return empty_partial(q, cache.v_head_dim)


def decode(cache: ShardedKVCache, q, k, v, batch_index=None, softmax_scale=None, return_lse=False,
           window_size=(-1, -1), softcap=0.0, sinks=None):
    """Attention of new tokens over the whole sharded cache; stores their k, v.

    q (B, n_new, H, D), k, v (B, n_new, Hkv, D), the same on every rank, for
    sequences ``batch_index`` (default all). New token t of sequence b sits at
    position ``cache.seqlens[b] + t`` and sees every key up to its own position
    (within ``window_size[0]`` tokens back when that is >= 0). ``softcap``,
    ``sinks`` (H,) float32: as in cpattn's attention. Returns out (B, n_new, H, D)
    in q's dtype, identical on every rank (and with ``return_lse`` also lse
    (B, H, n_new) float32). Collective. Checks its inputs (across ranks with
    ``cache.check_across_ranks``) and takes pages as needed, from host state only.
    """
    where = "decode"
    state = {}

    def check():
        ids, options = _check_call(cache, q, k, v, batch_index, softmax_scale, window_size, softcap, sinks, where)
        cache.check_room(ids, q.shape[1], where)
        state.update(ids=ids, options=options)
        return CacheCall.of(q, None, options, ids)

    _agree(cache, where, check, q, {"tokens": "pass the same new tokens on every rank"})
    ids, options, n = state["ids"], state["options"], q.shape[1]
    cache.make_room(ids, n, where)
    lens = cache.seqlens_of(ids)
    # A rank holding no key the new tokens can see (a sliding window) launches no kernel.
    attend = (options.sinks is not None and cache.rank == 0) or not _sees_nothing(
        cache.layout, cache.rank, lens + n, lens, lens + n - 1, options.mask)
    comm = cache.comm
    with fault_path(comm, where):
        out, lse = _decode_local(cache, cache.device_ids(ids), q, k, v, options, attend)
        fault_point("decode")
        if comm is not None:
            with collective("decode merge"):
                out, lse = _merge_across_ranks(out, lse, comm.group, cache.world_size)
    cache.advance(ids, n)
    out = out.to(q.dtype)
    return (out, lse) if return_lse else out


def decode_step(cache: ShardedKVCache, q, k, v, softmax_scale=None, return_lse=False, window_size=(-1, -1),
                softcap=0.0, sinks=None):
    """``decode`` of every sequence of the cache, with no host round trip: for CUDA graphs and torch.compile.

    Reads and writes device state only (the lengths, block table and keys live there),
    with fixed shapes and a fixed kernel grid; checks only what needs no device data
    (shapes, dtypes, options) and does not agree with the other ranks first. It
    allocates nothing: call ``cache.reserve(n)`` beforehand for the tokens the steps
    will add (a step past the reservation stores nothing, and the next read of
    ``cache.seqlens`` raises). Collective, like ``decode``.
    """
    where = "decode_step"
    _check_q(cache, q, k, v, cache.batch, where)
    options = _Options(cache, q, softmax_scale, window_size, softcap, sinks, where)
    out, lse = _decode_local(cache, cache.device_ids(), q, k, v, options)
    group = cache.process_group  # no failure check here (it reads host state a graph cannot hold)
    if group is not None:
        out, lse = _merge_across_ranks(out, lse, group, cache.world_size)
    cache.advance_on_device(q.shape[1])  # the host copy of the lengths is refreshed on its next use
    out = out.to(q.dtype)
    return (out, lse) if return_lse else out


# ---- splitting a chunk over the ranks ---------------------------------------------------------------------
SPLIT_ORDERS = ("contiguous", "zigzag")


def _split_index(n, world, rank, order):
    """Token indices rank ``rank`` holds of an n-token chunk split over ``world`` ranks: "contiguous" pieces
    whose lengths differ by at most one (the longer ones first), or "zigzag" (2 x world such pieces, rank r
    holding pieces r and 2 world - 1 - r, so that every rank's queries have about the same causal work).
    The split of ``layout.Layout``: the tokens ``ContextParallel(ring_impl="ring" or "zigzag")`` gives a rank."""
    return Layout(world, 1, "ring" if order == "contiguous" else "zigzag").positions(n, rank)


def _check_split(x, seq_dim, order, where):
    check_seq_dim(x, seq_dim, where)
    if order not in SPLIT_ORDERS:
        raise ValueError(f"{where}: order must be one of {SPLIT_ORDERS}, got {order!r}")


def split_chunk(x, cache, seq_dim=1, order="contiguous"):
    """This rank's piece of a full chunk ``x`` (any length) and its token indices, for ``prefill``.

    ``order``: "contiguous" (rank r holds the r-th of P pieces whose lengths differ by at most
    one: a view of ``x``) or "zigzag" (pieces r and 2P-1-r of 2P: balanced causal work for
    pass-KV). A rank holds an empty piece when the chunk is shorter than the split has pieces."""
    where = "split_chunk"
    _check_split(x, seq_dim, order, where)
    n = x.shape[seq_dim]
    if n == 0:
        raise ValueError(f"{where}: the chunk holds no tokens")
    index = _split_index(n, cache.world_size, cache.rank, order)
    if order == "contiguous":
        return x.narrow(seq_dim, int(index[0]) if len(index) else 0, len(index)), index
    return x.index_select(seq_dim, index.to(x.device)), index


class GatherCall(NamedTuple):
    """What must be the same on every rank in one ``gather_chunk``."""
    chunk_len: int
    order: str
    shape: tuple  # the piece's shape, None at seq_dim
    dtype: str

    FIXES = {"shape": "gather every rank's split_chunk piece of one tensor"}


def gather_chunk(x, cache, chunk_len, seq_dim=1, order="contiguous"):
    """The whole chunk on every rank from every rank's ``split_chunk`` piece ``x``: the inverse of
    ``split_chunk(chunk, cache, seq_dim, order)`` for a chunk of ``chunk_len`` tokens, e.g. to read the
    hidden state of a prompt's last token, or to give every rank the whole output of a prefill.
    Collective over the cache's group (one all-gather, after the agreement)."""
    where = "gather_chunk"

    def check():
        _check_split(x, seq_dim, order, where)
        positive_int(chunk_len, "chunk_len", where)
        expected = len(_split_index(chunk_len, cache.world_size, cache.rank, order))
        if x.shape[seq_dim] != expected:
            raise ValueError(f"{where}: this rank's piece of a {chunk_len}-token chunk split {order} has {expected} "
                             f"tokens (dimension {seq_dim}), got shape {tuple(x.shape)}")
        shape = list(x.shape)
        shape[seq_dim] = None
        return GatherCall(chunk_len, order, tuple(shape), str(x.dtype))

    _agree(cache, where, check, x, {})
    if cache.world_size == 1:
        return x
    every_index = [_split_index(chunk_len, cache.world_size, r, order) for r in range(cache.world_size)]
    with fault_path(cache.comm, where):
        (full,) = _gather_chunk(cache, [x.movedim(seq_dim, 0)[None]], every_index, chunk_len)
    return full[0].movedim(0, seq_dim)


def _gather_chunk(cache, tensors, every_index, n):
    """All ranks' tokens of a chunk (dimension 1; ``every_index``: each rank's token indices, any sizes)
    as full (batch, n, ...) tensors in chunk order. Every rank's piece travels padded to the largest."""
    order = torch.cat(every_index).to(tensors[0].device)
    counts = [len(index) for index in every_index]
    fulls = []
    for t in tensors:
        if t is None:  # a latent cache's v: its values are the keys' first columns
            fulls.append(None)
            continue
        pieces = t
        if cache.world_size > 1:
            padded = torch.nn.functional.pad(t, (0, 0) * (t.dim() - 2) + (0, max(counts) - t.shape[1])).contiguous()
            parts = [torch.empty_like(padded) for _ in range(cache.world_size)]
            with collective("prefill all-gather of the chunk"):
                dist.all_gather(parts, padded, group=cache.comm.group)
            pieces = torch.cat([part[:, :count] for part, count in zip(parts, counts)], dim=1)
        full = torch.empty((t.shape[0], n, *t.shape[2:]), dtype=t.dtype, device=t.device)
        full[:, order] = pieces
        fulls.append(full)
    return fulls


# ---- prefill ----------------------------------------------------------------------------------------------
def prefill_bytes(strategy, world, new_tokens, cached_tokens, heads, kv_heads, head_dim, elem_size, values=None):
    """Bytes each rank receives in one prefill of ``new_tokens`` (summed over the sequences) after
    ``cached_tokens`` already in the cache, by ``strategy`` ("pass-q" or "pass-kv"); an estimate that
    ignores the token indices and the padding of uneven shards. ``values``: the cache's
    ``latent.ValueLayout`` (default: values of ``head_dim``), which sets the key/value and output widths.

    Both all-gather the chunk's keys and values (each rank stores the ones it owns). pass-Q also
    all-gathers the queries and all-to-alls the fp32 partials back; pass-KV sends every rank's shard
    of keys and values (history and chunk) round the ring."""
    share = (world - 1) / world
    values = values or ValueLayout.separate(head_dim)
    kv = values.bytes_per_token(kv_heads, elem_size)  # bytes of one token's keys and values
    moved = share * new_tokens * kv
    if strategy == "pass-q":
        return moved + share * new_tokens * heads * (head_dim * elem_size + (values.value_dim + 1) * 4)
    if strategy == "pass-kv":
        return moved + share * (new_tokens + cached_tokens) * kv
    raise ValueError(f"prefill_bytes: strategy must be 'pass-q' or 'pass-kv', got {strategy!r}")


def choose_prefill_strategy(world, new_tokens, cached_tokens, heads, kv_heads, head_dim, elem_size, values=None):
    """"pass-kv" when it moves fewer bytes than "pass-q" (``prefill_bytes``), else "pass-q".

    With the shared term removed: pass-KV wins when
    (new + cached) * 2 * Hkv * D * e < new * H * (D * e + 4 * (D + 1)), e the element size,
    i.e. new / (new + cached) > 2 Hkv D e / (H (D e + 4 (D + 1))), about Hkv / H for fp32 and
    2/3 Hkv / H for 16-bit caches. A single rank moves nothing: pass-q (one kernel call)."""
    if world == 1:
        return "pass-q"
    args = (world, new_tokens, cached_tokens, heads, kv_heads, head_dim, elem_size, values)
    return "pass-kv" if prefill_bytes("pass-kv", *args) < prefill_bytes("pass-q", *args) else "pass-q"


class PackedChunk(NamedTuple):
    """The tokens of one prefill as a packed chunk: ``cu`` (host int64, (m + 1,)) cuts it into the new
    tokens of m sequences, sequence i continuing at its cached length ``start[i]`` (host int64)."""
    cu: torch.Tensor
    start: torch.Tensor

    @property
    def size(self):
        return int(self.cu[-1])

    def positions(self, tokens):
        """(sequence, global position) of the chunk's tokens ``tokens`` (host int64)."""
        seq, offset = packed_tokens(self.cu, tokens)
        return seq, self.start[seq] + offset


class QueryRows:
    """Some tokens of a packed chunk laid out as the decode kernel takes queries: sequence i's tokens in
    row i of an (m, width) grid, any order; a padding slot sits at position -1, where a causal query sees
    no key (a tile of padding loads nothing)."""

    def __init__(self, chunk, tokens, device):
        seq, pos = chunk.positions(tokens)
        num_seqs = len(chunk.start)
        counts = torch.bincount(seq, minlength=num_seqs)
        # Each token's slot in its sequence's row: its rank among that sequence's tokens.
        order = torch.argsort(seq, stable=True)
        slot = torch.empty_like(seq)
        slot[order] = torch.arange(len(seq)) - (counts.cumsum(0) - counts)[seq[order]]
        self.width = max(int(counts.max()) if num_seqs else 0, 1)
        self.positions = torch.full((num_seqs, self.width), -1, dtype=torch.int64)
        self.positions[seq, slot] = pos
        self._has_rows = counts > 0
        self._seq, self._slot = seq.to(device), slot.to(device)

    def pad(self, x):
        """(tokens, ...) -> (m, width, ...), zeros in the padding."""
        grid = x.new_zeros((len(self._has_rows), self.width, *x.shape[1:]))
        grid[self._seq, self._slot] = x
        return grid

    def unpad(self, grid):
        """(m, width, ...) -> (tokens, ...), in the order of ``tokens``."""
        return grid[self._seq, self._slot]

    def sees_nothing(self, layout, rank, lens, mask):
        """Host check: does ``rank`` hold no key any of these queries sees (sequences of global lengths
        ``lens``)? Then it may skip its kernel."""
        real = self.positions >= 0
        first = torch.where(real, self.positions, torch.iinfo(torch.int64).max).min(1).values
        last = self.positions.max(1).values
        has = self._has_rows
        return _sees_nothing(layout, rank, lens[has], first[has], last[has], mask)


def _prefill_pass_q(cache, ids, dev_ids, q, every_index, chunk, options):
    """Every rank attends the whole chunk's queries to its shard; partials go back to their owners."""
    world, mine = cache.world_size, every_index[cache.rank]
    (q_full,) = _gather_chunk(cache, [q], every_index, chunk.size)
    rows = QueryRows(chunk, torch.arange(chunk.size), cache.device)
    sinks = options.sinks if cache.rank == 0 else None
    if sinks is None and rows.sees_nothing(cache.layout, cache.rank, cache.seqlens_of(ids), options.mask):
        out, lse = empty_partial(q_full, cache.v_head_dim)
        partials = stack_partial(out, lse)[0]
    else:
        out, lse = _attend_local(cache, dev_ids, cache.seqlens_device[dev_ids], rows.pad(q_full[0]),
                                 rows.positions.to(cache.device), options, sinks)
        partials = rows.unpad(stack_partial(out, lse))  # (n, H, Dv + 1), in chunk order
    if world == 1:
        return partials[None, mine.to(cache.device), :, :-1]
    # Rank r receives every rank's partial of the queries it holds, then merges them.
    send = torch.cat([partials[index.to(cache.device)] for index in every_index])
    recv = partials.new_empty((world * len(mine), *partials.shape[1:]))
    fault_point("prefill")
    with collective("prefill all-to-all of the partials"):
        dist.all_to_all_single(recv, send, output_split_sizes=[len(mine)] * world,
                               input_split_sizes=[len(index) for index in every_index], group=cache.comm.group)
    if len(mine) == 0:
        return recv.new_zeros((1, 0, *recv.shape[1:-1], recv.shape[-1] - 1))
    out, _ = merge_splits(*unstack_partial(recv.view(world, 1, len(mine), *recv.shape[1:])))
    return out


def _ring_exchange(cache, send, recv):
    """Post: ``send`` to the next rank of the cache's group, the previous rank's into ``recv``.

    (The pass-KV ring's own two P2P ops: comm.RingComm belongs to ContextParallel's communicators.)"""
    group, world = cache.comm.group, cache.world_size
    peer = lambda r: dist.get_global_rank(group, r)  # noqa: E731
    with collective("prefill ring exchange"):
        return dist.batch_isend_irecv([dist.P2POp(dist.isend, send, peer((cache.rank + 1) % world), group),
                                       dist.P2POp(dist.irecv, recv, peer((cache.rank - 1) % world), group)])


def _prefill_pass_kv(cache, ids, dev_ids, q, mine, chunk, options):
    """Every rank keeps its queries; the ranks' shards of keys and values travel round the ring."""
    world, rank = cache.world_size, cache.rank
    lens = cache.seqlens_of(ids)
    rows = QueryRows(chunk, mine.cpu(), cache.device)
    q_rows, q_positions = rows.pad(q[0]), rows.positions.to(cache.device)
    # Each rank's shard, padded to the largest share (rank 0 holds the most), so buffers match in size.
    num_slots = int(cache.layout.local_lengths(lens.max(), 0))
    # Keys and values travel as one tensor (a latent cache's keys alone: its values are their first columns).
    shard = cache.values.pack(*cache.read(dev_ids, torch.arange(num_slots, device=cache.device)))
    partials = []
    for step in range(world):
        src = (rank - step) % world
        if step + 1 < world:
            incoming = torch.empty_like(shard)
            pending = _ring_exchange(cache, shard, incoming)  # the next shard travels while this one is used
        fault_point("prefill", step)
        sinks = options.sinks if step == 0 else None  # the sink joins the local partial, once
        if len(mine) and (sinks is not None or not rows.sees_nothing(cache.layout, src, lens, options.mask)):
            src_lens = cache.layout.local_lengths(lens, src).to(cache.device)
            partials.append(_attend(q_rows, *cache.values.unpack(shard), src_lens, q_positions, None,
                                    cache.layout.slot_positions(src), options, sinks))
        if step + 1 < world:
            with collective("prefill ring exchange"):
                cache.comm.wait(pending, shard.is_cpu)
            shard = incoming
    if not partials:
        return empty_partial(q, cache.v_head_dim)[0]
    out, _ = merge_splits(torch.stack([p[0] for p in partials]), torch.stack([p[1] for p in partials]))
    return rows.unpad(out)[None]


def _every_index(cache, token_index, q, where):
    """Every rank's token indices, in rank order (device int64): this rank's ``token_index``, exchanged
    (the ranks' counts first, then the indices, padded to the largest count)."""
    if cache.world_size == 1:
        return [token_index]
    comm = cache.comm
    with fault_path(comm, where), collective("prefill all-gather of token_index"):
        counts = [row[0] for row in gather_rows(comm.group, [len(token_index)], q, comm)]
        padded = torch.nn.functional.pad(token_index, (0, max(counts) - len(token_index)))
        parts = [torch.empty_like(padded) for _ in counts]
        dist.all_gather(parts, padded, group=comm.group)
    return [part[:count] for part, count in zip(parts, counts)]


def _check_packing(cu_seqlens, num_seqs, q, where):
    """Prefill's ``cu_seqlens``: the packing over ``num_seqs`` sequences, as a tuple of ints."""
    if not isinstance(cu_seqlens, torch.Tensor) or cu_seqlens.dim() != 1 or \
            cu_seqlens.dtype not in (torch.int32, torch.int64):
        raise TypeError(f"{where}: cu_seqlens must be a 1-D int32 tensor, got "
                        f"{getattr(cu_seqlens, 'dtype', type(cu_seqlens).__name__)}")
    packing = tuple(cu_seqlens.tolist())
    if len(packing) != num_seqs + 1 or packing[0] != 0 or any(b < a for a, b in zip(packing, packing[1:])):
        raise ValueError(f"{where}: cu_seqlens must hold len(batch_index) + 1 = {num_seqs + 1} offsets from 0, "
                         f"not decreasing, got {list(packing)}")
    if q.shape[0] != 1:
        raise ValueError(f"{where}: with cu_seqlens, q, k, v hold one packed row: (1, tokens, heads, head_dim), "
                         f"got {tuple(q.shape)}")
    return packing


def prefill(cache: ShardedKVCache, q, k, v, token_index=None, batch_index=None, softmax_scale=None,
            strategy="auto", window_size=(-1, -1), softcap=0.0, sinks=None, cu_seqlens=None):
    """Causal attention of a prompt chunk's local tokens over everything before them; stores the chunk's k, v.

    Each rank passes its own tokens of the chunk, ``token_index`` saying which (distinct ints; together
    the ranks' indices are a permutation of the chunk; default: rank r holds the r-th of P equal
    contiguous pieces, so every rank must pass the same number of tokens). Any chunk length, any split:
    a rank may hold no token (empty tensors and an empty ``token_index``); the ranks learn the chunk's
    length from each other.

    * One chunk of n tokens for every sequence of ``batch_index`` (default all; B = their number):
      q (B, n_local, H, D), k (B, n_local, Hkv, D), v (B, n_local, Hkv, Dv) (None for a latent cache);
      token i of the chunk sits at position
      ``cache.seqlens[b] + i``.
    * A packed chunk (``cu_seqlens``, int32 (len(batch_index) + 1,), the same on every rank): the new
      tokens of the sequences of ``batch_index``, of different lengths, one after another: sequence i
      has tokens [cu_seqlens[i], cu_seqlens[i + 1]) of the chunk (possibly none) and continues at its
      own cached length. q (1, n_local, H, D), k, v (1, n_local, Hkv, D or Dv); ``token_index`` indexes the
      packed chunk (``cache.positions(token_index=..., batch_index=..., cu_seqlens=...)``: their positions).

    A chunk after a cached prefix (a prefix hit) sees the prefix. ``strategy``: "pass-q", "pass-kv"
    or "auto" (module docstring; both exact; "auto" decides on the whole chunk's tokens and the
    cached tokens of its sequences). ``window_size``, ``softcap``, ``sinks``: as in ``decode``.
    Returns out (B or 1, n_local, H, Dv), Dv the cache's ``v_head_dim``, in q's dtype, for this rank's
    tokens. Collective.
    """
    where = "prefill"
    world = cache.world_size
    state = {}

    def check():
        ids, options = _check_call(cache, q, k, v, batch_index, softmax_scale, window_size, softcap, sinks, where,
                                   packed=cu_seqlens is not None)
        if strategy not in STRATEGIES:
            raise ValueError(f"{where}: strategy must be one of {STRATEGIES}, got {strategy!r}")
        packing = None if cu_seqlens is None else _check_packing(cu_seqlens, len(ids), q, where)
        n_local = q.shape[1]
        if token_index is None:
            index = torch.arange(cache.rank * n_local, (cache.rank + 1) * n_local)
            if n_local == 0:
                raise ValueError(f"{where}: q, k, v hold no tokens (pass token_index when a rank holds none of the "
                                 "chunk)")
        else:
            index = torch.as_tensor(token_index).reshape(-1)
        if index.dtype not in (torch.int32, torch.int64) or index.numel() != n_local:
            raise TypeError(f"{where}: token_index must hold {n_local} integers (one per local token), "
                            f"got {index.dtype} of {index.numel()}")
        state.update(ids=ids, options=options, index=index.to(torch.int64).to(cache.device), packing=packing)
        return CacheCall.of(q, strategy, options, ids, token_index is None, packing)

    _agree(cache, where, check, q, {"tokens": "every rank must pass the same number of the chunk's tokens, or "
                                              "token_index on every rank (split_chunk gives both)"})
    ids, options, packing = state["ids"], state["options"], state["packing"]
    out_shape, out_dtype = (*q.shape[:-1], cache.v_head_dim), q.dtype  # out has the values' head dim
    if token_index is None:  # every rank the same count: no exchange needed
        n_local = q.shape[1]
        every_index = [torch.arange(r * n_local, (r + 1) * n_local, device=cache.device) for r in range(world)]
    else:
        every_index = _every_index(cache, state["index"], q, where)
    n = sum(len(index) for index in every_index)
    # Every rank has every rank's indices now: the checks below reach the same verdict everywhere.
    if n == 0 or (packing is not None and n != packing[-1]) or \
            not torch.equal(torch.cat(every_index).sort().values.cpu(), torch.arange(n)):
        raise ValueError(f"{where}: the ranks' token_index must together be a permutation of range(n), n the "
                         f"chunk's length{'' if packing is None else f' (cu_seqlens[-1] = {packing[-1]})'}, got "
                         f"{[index.tolist() for index in every_index]}")

    if packing is None:  # one chunk for every sequence: the packing of B chunks of n, sequence after sequence
        batch = len(ids)
        packing = tuple(range(0, (batch + 1) * n, n))
        offsets = torch.arange(batch, device=cache.device)[:, None] * n
        every_index = [(offsets + index[None]).reshape(-1) for index in every_index]
        q, k, v = (None if t is None else t.reshape(1, -1, *t.shape[2:]) for t in (q, k, v))  # latent: v None
    cu = torch.tensor(packing)
    cache.check_room(ids, cu.diff(), where)
    chunk = PackedChunk(cu, cache.seqlens_of(ids))
    if strategy == "auto":
        strategy = choose_prefill_strategy(world, chunk.size, int(chunk.start.sum()), q.shape[2], cache.num_kv_heads,
                                           cache.head_dim, q.element_size(), cache.values)
    with fault_path(cache.comm if world > 1 else None, where):
        k_full, v_full = _gather_chunk(cache, [k, v], every_index, chunk.size)
        cache.make_room(ids, cu.diff(), where)
        dev_ids = cache.device_ids(ids)
        seq, positions = chunk.positions(torch.arange(chunk.size))
        cache.store(dev_ids[seq.to(cache.device)], positions[:, None].to(cache.device), k_full[0, :, None],
                    None if v_full is None else v_full[0, :, None])
        cache.advance(ids, cu.diff())
        if strategy == "pass-q":
            out = _prefill_pass_q(cache, ids, dev_ids, q, every_index, chunk, options)
        else:
            out = _prefill_pass_kv(cache, ids, dev_ids, q, every_index[cache.rank], chunk, options)
    return out.reshape(out_shape).to(out_dtype)
