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

from ._checks import check_kv, check_scale, check_sinks, check_softcap, check_window
from .agreement import agree
from ._ops import _kernel_dtype
from .faults import collective, fault_path, fault_point
from .kv_cache import ShardedKVCache
from .latent import ValueLayout
from .partials import empty_partial, stack_partial, unstack_partial
from .visibility import causal_window, visible_keys

STRATEGIES = ("auto", "pass-q", "pass-kv")


# ---- checks -------------------------------------------------------------------------------------------
def _check_q(cache, q, k, v, batch, where):
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
    if q.shape[1] == 0:
        raise ValueError(f"{where}: q, k, v hold no tokens")


class _Options:
    """The attention options of one call, checked: scale, window, softcap, sinks (no host read)."""

    def __init__(self, cache, q, softmax_scale, window_size, softcap, sinks, where):
        self.scale = check_scale(softmax_scale, where)
        self.window = causal_window(True, check_window(window_size, where))  # prefill and decode are causal
        self.softcap = check_softcap(softcap, where)
        self.sinks = check_sinks(sinks, q.shape[2], cache.device, where)


def _check_call(cache, q, k, v, batch_index, softmax_scale, window_size, softcap, sinks, where):
    """The checks prefill and decode share; returns (the sequences' ids, the options)."""
    ids = cache.sequence_ids(batch_index)
    _check_q(cache, q, k, v, len(ids), where)
    return ids, _Options(cache, q, softmax_scale, window_size, softcap, sinks, where)


class CacheCall(NamedTuple):
    """What must be the same on every rank in one ``prefill`` or ``decode`` (agreement.py): ranks with
    different windows, say, would merge partials of different attentions."""
    tokens: int  # this rank's tokens of the chunk (prefill), the new tokens (decode)
    heads: int
    strategy: Optional[str]  # prefill's, None for decode
    window_left: int
    softcap: float
    sinks_given: bool
    batch_index: tuple  # which sequences, in which order

    FIXES = {"heads": "pass q with the same number of heads on every rank",
             "sinks_given": "pass sinks on every rank or on none",
             "batch_index": "pass the same batch_index on every rank"}

    @classmethod
    def of(cls, q, strategy, options, ids):
        return cls(q.shape[1], q.shape[2], strategy, options.window[0], options.softcap, options.sinks is not None,
                   tuple(ids.tolist()))


def _agree(cache, where, check, hint, fixes):
    """``agreement.agree`` on a prefill or decode, on the cache's own process group (bounded by its
    timeout); every call, unless the cache was built with check_across_ranks=False."""
    return agree(where, check, comm=cache.comm if cache.check_across_ranks else None, hint=hint, fixes=fixes)


# ---- attention on this rank's shard ---------------------------------------------------------------------
def _sees_nothing(layout, rank, lens, first_pos, last_pos, window):
    """Host check: does ``rank`` hold no key that a query at positions [first_pos, last_pos] (host int64
    tensors per sequence) can see, for global lengths ``lens``? Then it may skip its kernel."""
    lo, hi = visible_keys(window, first_pos, last_pos, lens)
    return bool((layout.local_lengths(hi, rank) <= layout.local_lengths(torch.minimum(lo, hi), rank)).all())


def _attend(q, k, v, lens, q_positions, block_table, slot_positions, options, sinks):
    """Partial attention (out fp32, lse) of q at ``q_positions`` over one shard of keys (device tensors)."""
    dtype = _kernel_dtype(q)  # bf16 on CPU runs in fp32 (the interpreter has no bf16 matmul)
    return decode_attention(
        q.to(dtype), k.to(dtype), v.to(dtype), lens.to(torch.int32), q_positions=q_positions.to(torch.int32),
        block_table=block_table, softmax_scale=options.scale, causal=True, slot_positions=slot_positions,
        validate=False, out_dtype=torch.float32, window_size=options.window, softcap=options.softcap, sinks=sinks)


def _attend_local(cache, dev_ids, lens, q, q_positions, options, sinks):
    """Partial attention over this rank's own shard of sequences ``dev_ids`` of global lengths ``lens``
    (device tensors)."""
    k, v, table = cache.local_view(dev_ids)
    return _attend(q, k, v, cache.layout.local_lengths(lens, cache.rank), q_positions, table, cache.slot_positions,
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
        cache.layout, cache.rank, lens + n, lens, lens + n - 1, options.window)
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


# ---- prefill ----------------------------------------------------------------------------------------------
def split_chunk(x, cache, seq_dim=1):
    """This rank's contiguous piece of a full chunk ``x`` and its token indices, for ``prefill``.

    The chunk length must be a multiple of the group size."""
    n = x.shape[seq_dim]
    if n % cache.world_size:
        raise ValueError(f"split_chunk: chunk length {n} is not a multiple of the group size {cache.world_size}")
    per = n // cache.world_size
    return x.narrow(seq_dim, cache.rank * per, per), torch.arange(cache.rank * per, (cache.rank + 1) * per)


def prefill_bytes(strategy, world, new_tokens, cached_tokens, heads, kv_heads, head_dim, elem_size, values=None):
    """Bytes each rank receives in one prefill of ``new_tokens`` (summed over the sequences) after
    ``cached_tokens`` already in the cache, by ``strategy`` ("pass-q" or "pass-kv"); an estimate that
    ignores the token indices and the padding of uneven shards. ``values``: the cache's
    ``latent.ValueLayout`` (default: values of ``head_dim``), which sets the key/value and output widths.

    Both all-gather the chunk's keys and values (each rank stores the ones it owns). pass-Q also
    all-gathers the queries and all-to-alls the fp32 partials back; pass-KV sends every rank's shard
    of keys and values (history and chunk) round the ring."""
    share = (world - 1) / world
    values = values or ValueLayout(head_dim, head_dim, False)
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


def _gather_chunk(cache, tensors, every_index, n):
    """All ranks' tokens of the chunk (``every_index``: each rank's token indices) as full (B, n, ...)
    tensors in chunk order."""
    order = torch.cat(every_index)
    fulls = []
    for t in tensors:
        if t is None:  # a latent cache's v: its values are the keys' first columns
            fulls.append(None)
            continue
        parts = [t]
        if cache.world_size > 1:
            parts = [torch.empty_like(t) for _ in range(cache.world_size)]
            with collective("prefill all-gather of the chunk"):
                dist.all_gather(parts, t.contiguous(), group=cache.comm.group)
        full = torch.empty((t.shape[0], n, *t.shape[2:]), dtype=t.dtype, device=t.device)
        full[:, order] = torch.cat(parts, dim=1)
        fulls.append(full)
    return fulls


def _prefill_pass_q(cache, ids, dev_ids, q, every_index, start, options):
    """Every rank attends the whole chunk's queries to its shard; partials go back to their owners."""
    world, n = cache.world_size, q.shape[1] * cache.world_size
    (q_full,) = _gather_chunk(cache, [q], every_index, n)
    positions = start[:, None] + torch.arange(n)
    lens = cache.seqlens_of(ids)
    sinks = options.sinks if cache.rank == 0 else None
    if sinks is None and _sees_nothing(cache.layout, cache.rank, lens, start, start + n - 1, options.window):
        out_all, lse_all = empty_partial(q_full, cache.v_head_dim)
    else:
        out_all, lse_all = _attend_local(cache, dev_ids, cache.seqlens_device[dev_ids], q_full,
                                         positions.to(cache.device), options, sinks)
    if world == 1:
        return out_all
    # Rank r receives every rank's partial for the queries it holds, then merges them.
    stacked = stack_partial(out_all, lse_all)
    send = torch.stack([stacked[:, idx.to(cache.device)] for idx in every_index])
    recv = torch.empty_like(send)
    fault_point("prefill")
    with collective("prefill all-to-all of the partials"):
        dist.all_to_all_single(recv, send, group=cache.comm.group)
    out, _ = merge_splits(*unstack_partial(recv))
    return out


def _ring_exchange(cache, send, recv):
    """Post: ``send`` to the next rank of the cache's group, the previous rank's into ``recv``.

    (The pass-KV ring's own two P2P ops: comm.RingComm belongs to ContextParallel's communicators.)"""
    group, world = cache.comm.group, cache.world_size
    peer = lambda r: dist.get_global_rank(group, r)  # noqa: E731
    with collective("prefill ring exchange"):
        return dist.batch_isend_irecv([dist.P2POp(dist.isend, send, peer((cache.rank + 1) % world), group),
                                       dist.P2POp(dist.irecv, recv, peer((cache.rank - 1) % world), group)])


def _prefill_pass_kv(cache, ids, dev_ids, q, token_index, start, options):
    """Every rank keeps its queries; the ranks' shards of keys and values travel round the ring."""
    world, rank = cache.world_size, cache.rank
    lens = cache.seqlens_of(ids)
    q_pos_host = start[:, None] + token_index.cpu()[None, :]
    q_positions = q_pos_host.to(cache.device)
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
        if sinks is not None or not _sees_nothing(cache.layout, src, lens, q_pos_host.min(1).values,
                                                  q_pos_host.max(1).values, options.window):
            src_lens = cache.layout.local_lengths(lens, src).to(cache.device)
            partials.append(_attend(q, *cache.values.unpack(shard), src_lens, q_positions, None,
                                    cache.layout.slot_positions(src), options, sinks))
        if step + 1 < world:
            with collective("prefill ring exchange"):
                cache.comm.wait(pending, shard.is_cpu)
            shard = incoming
    if not partials:
        return empty_partial(q, cache.v_head_dim)[0]
    out, _ = merge_splits(torch.stack([p[0] for p in partials]), torch.stack([p[1] for p in partials]))
    return out


def prefill(cache: ShardedKVCache, q, k, v, token_index=None, batch_index=None, softmax_scale=None,
            strategy="auto", window_size=(-1, -1), softcap=0.0, sinks=None):
    """Causal attention of a prompt chunk's local tokens over everything before them; stores the chunk's k, v.

    q (B, n_local, H, D), k, v (B, n_local, Hkv, D): this rank's n_local tokens of
    the next chunk of n = n_local * group size tokens, at indices ``token_index``
    (n_local distinct ints in [0, n); default: rank r holds [r * n_local, (r + 1) * n_local),
    as ``split_chunk`` gives) for sequences ``batch_index`` (default all; B = their
    number). Token i of the chunk sits at position ``cache.seqlens[b] + i``: a chunk
    after a cached prefix (a prefix hit) sees the prefix. ``strategy``: "pass-q",
    "pass-kv" or "auto" (module docstring; both exact). ``window_size``, ``softcap``,
    ``sinks``: as in ``decode``.
    Returns out (B, n_local, H, D) in q's dtype, for this rank's tokens.
    Collective: every rank of the cache's group must call it with the same n_local.
    """
    where = "prefill"
    world = cache.world_size
    state = {}

    def check():
        ids, options = _check_call(cache, q, k, v, batch_index, softmax_scale, window_size, softcap, sinks, where)
        if strategy not in STRATEGIES:
            raise ValueError(f"{where}: strategy must be one of {STRATEGIES}, got {strategy!r}")
        n_local = q.shape[1]
        index = torch.arange(cache.rank * n_local, (cache.rank + 1) * n_local) if token_index is None \
            else torch.as_tensor(token_index).reshape(-1)
        if index.dtype not in (torch.int32, torch.int64) or index.numel() != n_local:
            raise TypeError(f"{where}: token_index must hold {n_local} integers (one per local token), "
                            f"got {index.dtype} of {index.numel()}")
        cache.check_room(ids, n_local * world, where)
        state.update(ids=ids, options=options, index=index.to(torch.int64).to(cache.device))
        return CacheCall.of(q, strategy, options, ids)

    _agree(cache, where, check, q, {"tokens": "every rank must pass the same number of the chunk's tokens "
                                              "(split_chunk splits a chunk)"})
    ids, options, token_index = state["ids"], state["options"], state["index"]
    n = q.shape[1] * world

    every_index = [token_index]
    if world > 1:
        every_index = [torch.empty_like(token_index) for _ in range(world)]
        comm = cache.comm
        with fault_path(comm, where), collective("prefill all-gather of token_index"):
            dist.all_gather(every_index, token_index, group=comm.group)
    if not torch.equal(torch.cat(every_index).sort().values.cpu(), torch.arange(n)):
        raise ValueError(f"{where}: the ranks' token_index must together be a permutation of range({n}), "
                         f"got {[t.tolist() for t in every_index]}")

    start = cache.seqlens_of(ids)
    if strategy == "auto":
        strategy = choose_prefill_strategy(world, len(ids) * n, int(start.sum()), q.shape[2], cache.num_kv_heads,
                                           cache.head_dim, q.element_size(), cache.values)
    with fault_path(cache.comm if world > 1 else None, where):
        k_full, v_full = _gather_chunk(cache, [k, v], every_index, n)
        cache.make_room(ids, n, where)
        dev_ids = cache.device_ids(ids)
        cache.store(dev_ids, (start[:, None] + torch.arange(n)).to(cache.device), k_full, v_full)
        cache.advance(ids, n)
        if strategy == "pass-q":
            out = _prefill_pass_q(cache, ids, dev_ids, q, every_index, start, options)
        else:
            out = _prefill_pass_kv(cache, ids, dev_ids, q, token_index, start, options)
    return out.to(q.dtype)
