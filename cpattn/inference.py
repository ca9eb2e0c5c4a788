"""Context-parallel inference: chunked prefill and decode over a sequence-sharded KV cache.

Serving a long context runs out of KV-cache memory on one device. Here the
cache of every attention layer is sharded along the sequence over a process
group (``ShardedKVCache``, one per layer), and attention over it is computed
where the keys live: queries travel, keys and values stay put.

```python
import cpattn

# one cache per attention layer; page_size=None gives contiguous storage
cache = cpattn.ShardedKVCache(batch, capacity, num_kv_heads, head_dim, dtype=torch.float16,
                              device="cuda", group=None, page_size=64)

# prefill, one chunk of n tokens at a time; each rank passes its tokens of the chunk
cp = cpattn.ContextParallel(group=None, ring_impl="zigzag")   # or cpattn.split_chunk(x, cache)
index = cp.positions(n)                     # which tokens of the chunk this rank holds
x_local = cp.shard(x_chunk)                 # (B, n_local, ...)
pos = cache.positions(n, index)             # (B, n_local) global positions, for RoPE
out_local = cpattn.prefill(cache, q_local, k_local, v_local, token_index=index)   # (B, n_local, H, D)

# decode: the new token(s) of every sequence, the same on every rank
pos = cache.seqlens[:, None]                # position of the new token, for RoPE
out = cpattn.decode(cache, q, k, v)         # (B, n_new, H, D), the same on every rank
```

* **Layout**: positions are dealt out in stripes of ``page_size`` (or
  ``stripe``) tokens round-robin over the ranks, so every rank holds ~L/P keys
  of every sequence at every length L (balanced decode work and memory).
  ``cache.owner(pos)``, ``cache.local_slot(pos)``.
* **Prefill** of a chunk of n tokens (each rank passes the same number of them,
  at indices ``token_index`` into the chunk): every rank all-gathers the chunk's
  q, k, v, stores the keys and values it owns, and attends *all* n queries to
  its own shard, which now holds its share of the history and of the chunk,
  causal by global position (the chunk starts at each sequence's length). The
  partials (out, lse) go back to the ranks that own the queries (all-to-all)
  and are merged there by their log-sum-exp. A chunk therefore sees every
  earlier key, and chunked prefill equals one prefill. Why not the ring of
  ``cpattn.ContextParallel``: after the first chunk the history is in the
  cache, and a ring would move the whole cache past every rank for every
  chunk; moving the chunk's queries and outputs costs O(chunk), not O(context).
  The work is balanced whatever split of the chunk the ranks hold, because the
  keys are striped.
* **Decode**: the n_new query tokens (1, or more for speculative decoding) and
  their keys and values are replicated on every rank; each rank stores the new
  keys it owns, runs the split-KV decode kernel on its shard, and the partials
  are all-gathered and merged, so every rank returns the same output.
* Sequences may differ in length: ``batch_index`` restricts a call to some
  sequences (e.g. prefill prompts of different lengths one by one); decode
  then runs the whole batch, each sequence at its own length.
* Errors: wrong shapes, dtypes, devices, head counts, overflow of the capacity
  or of the page pool raise ``ValueError``/``TypeError`` before anything is
  written, on every rank alike (the checks use replicated state or a small
  all-gather of the shapes; ``check_across_ranks=False`` drops the latter), so
  the cache is unchanged and no rank hangs.
* Group size 1 (or no ``torch.distributed`` at all) is plain single-device
  paged decoding with no collectives.
"""

import torch
import torch.distributed as dist

from cpattn.kernels import decode_attention, merge_splits

from ._checks import check_scale
from .attention import _kernel_dtype
from .comm import agree_on_inputs
from .kv_cache import ShardedKVCache


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
    cache.check_kv(k, v, batch, where)
    if k.shape[1] != q.shape[1]:
        raise ValueError(f"{where}: q has {q.shape[1]} tokens but k, v have {k.shape[1]}")
    if q.shape[1] == 0:
        raise ValueError(f"{where}: q, k, v hold no tokens")


def _agree(cache, check, values, where, hint):
    """Run the local ``check``, then make every rank reach the same verdict.

    A rank whose inputs are bad would raise before a collective its peers are
    already waiting in, and they would hang. So the ranks exchange whether their
    check passed and ``values()``, a few ints that must match (shapes, sequences),
    through ``comm.agree_on_inputs``, and all raise together.
    """
    error, signature = None, [0] * _num_values(cache)
    try:
        check()
        signature = values()
    except (TypeError, ValueError) as exc:
        error = exc
    if cache.world_size == 1 or not cache.check_across_ranks:
        if error is not None:
            raise error
        return
    field_names = ["tokens", "heads", "default token_index"] + [f"order of sequence {b}" for b in range(cache.batch)]
    agree_on_inputs(cache.group, signature, error, where, field_names, hint)


def _num_values(cache):
    return 3 + cache.batch


def _call_values(n_tokens, heads, flag, rows, batch):
    """Fixed-length summary of a call: tokens, heads, a flag, and which sequences in which order."""
    order = [0] * batch
    for i, b in enumerate(rows.tolist()):
        order[b] = i + 1
    return [n_tokens, heads, flag] + order


def _pack(out, lse):
    """(out (B, n, H, D) fp32, lse (B, H, n)) -> one (B, n, H, D + 1) tensor: one collective instead of two."""
    return torch.cat([out, lse.transpose(1, 2).unsqueeze(-1)], dim=-1)


def _unpack(packed):
    """(..., B, n, H, D + 1) -> out (..., B, n, H, D), lse (..., B, H, n): the inverse of ``_pack``."""
    return packed[..., :-1], packed[..., -1].transpose(-1, -2)


def _attend_shard(cache, rows, q, q_start, softmax_scale):
    """Partial attention of q (len(rows), n, H, D) at positions q_start[b] + t over this rank's shard.

    Returns (out fp32, lse), the empty partial (0, -inf) where the shard holds no visible key."""
    k, v, table = cache.local_view(rows)
    dtype = _kernel_dtype(q)  # bf16 on CPU runs in fp32 (the interpreter has no bf16 matmul)
    lens = cache.local_lengths(cache.seqlens[rows])
    return decode_attention(
        q.to(dtype), k.to(dtype), v.to(dtype),
        lens.to(torch.int32).to(cache.device), q_start=q_start.to(torch.int32).to(cache.device),
        block_table=table, softmax_scale=softmax_scale, causal=True, slot_positions=cache.slot_positions,
        max_seqlen=int(lens.max()), validate=False, out_dtype=torch.float32)


def split_chunk(x, cache, seq_dim=1):
    """This rank's contiguous piece of a full chunk ``x`` and its token indices, for ``prefill``.

    The chunk length must be a multiple of the group size."""
    n = x.shape[seq_dim]
    if n % cache.world_size:
        raise ValueError(f"split_chunk: chunk length {n} is not a multiple of the group size {cache.world_size}")
    per = n // cache.world_size
    return x.narrow(seq_dim, cache.rank * per, per), torch.arange(cache.rank * per, (cache.rank + 1) * per)


def prefill(cache: ShardedKVCache, q, k, v, token_index=None, batch_index=None, softmax_scale=None):
    """Causal attention of a prompt chunk's local tokens over everything before them; stores the chunk's k, v.

    q (B, n_local, H, D), k, v (B, n_local, Hkv, D): this rank's n_local tokens of
    the next chunk of n = n_local * group size tokens, at indices ``token_index``
    (n_local distinct ints in [0, n); default: rank r holds [r * n_local, (r + 1) * n_local),
    as ``split_chunk`` gives) for sequences ``batch_index`` (default all; B = their
    number). Token i of the chunk sits at position ``cache.seqlens[b] + i``.
    Returns out (B, n_local, H, D) in q's dtype, for this rank's tokens.
    Collective: every rank of the cache's group must call it with the same n_local.
    """
    where = "prefill"
    world = cache.world_size
    state = {}

    def check():
        rows = state["rows"] = cache._rows(batch_index)
        _check_q(cache, q, k, v, len(rows), where)
        state["scale"] = check_scale(softmax_scale, where)
        n_local = q.shape[1]
        index = torch.arange(cache.rank * n_local, (cache.rank + 1) * n_local) if token_index is None \
            else torch.as_tensor(token_index).reshape(-1)
        if index.dtype not in (torch.int32, torch.int64) or index.numel() != n_local:
            raise TypeError(f"{where}: token_index must hold {n_local} integers (one per local token), "
                            f"got {index.dtype} of {index.numel()}")
        state["index"] = index.to(torch.int64).to(cache.device)
        cache.check_room(rows, n_local * world, where)

    _agree(cache, check, lambda: _call_values(q.shape[1], q.shape[2], token_index is None, state["rows"],
                                              cache.batch), where, q)
    rows, softmax_scale, token_index = state["rows"], state["scale"], state["index"]
    n = q.shape[1] * world

    if world > 1:
        every_index = [torch.empty_like(token_index) for _ in range(world)]
        dist.all_gather(every_index, token_index, group=cache.group)
        order = torch.cat(every_index)
        if not torch.equal(order.sort().values.cpu(), torch.arange(n)):
            raise ValueError(f"{where}: the ranks' token_index must together be a permutation of range({n}), "
                             f"got {[t.tolist() for t in every_index]}")
        chunk = []
        for t in (q, k, v):
            parts = [torch.empty_like(t) for _ in range(world)]
            dist.all_gather(parts, t.contiguous(), group=cache.group)
            full = torch.empty((t.shape[0], n, *t.shape[2:]), dtype=t.dtype, device=t.device)
            full[:, order] = torch.cat(parts, dim=1)
            chunk.append(full)
        q_full, k_full, v_full = chunk
    else:
        if not torch.equal(token_index.sort().values.cpu(), torch.arange(n)):
            raise ValueError(f"{where}: token_index must be a permutation of range({n}), got {token_index.tolist()}")
        order = token_index
        q_full, k_full, v_full = (torch.empty_like(t) for t in (q, k, v))
        q_full[:, order], k_full[:, order], v_full[:, order] = q, k, v

    q_start = cache.seqlens[rows].clone()
    cache._write(rows, k_full, v_full)
    cache.seqlens[rows] += n
    out_all, lse_all = _attend_shard(cache, rows, q_full, q_start, softmax_scale)
    if world == 1:
        return out_all.to(q.dtype)
    # Rank r receives every rank's partial for the queries it holds, then merges them.
    packed = _pack(out_all, lse_all)
    send = torch.stack([packed[:, idx] for idx in every_index])
    recv = torch.empty_like(send)
    dist.all_to_all_single(recv, send, group=cache.group)
    out, _ = merge_splits(*_unpack(recv), out=torch.empty(q.shape, dtype=torch.float32, device=q.device))
    return out.to(q.dtype)


def decode(cache: ShardedKVCache, q, k, v, batch_index=None, softmax_scale=None, return_lse=False):
    """Attention of new tokens over the whole sharded cache; stores their k, v.

    q (B, n_new, H, D), k, v (B, n_new, Hkv, D), the same on every rank, for
    sequences ``batch_index`` (default all). New token t of sequence b sits at
    position ``cache.seqlens[b] + t`` and sees every key up to its own position.
    Returns out (B, n_new, H, D) in q's dtype, identical on every rank (and with
    ``return_lse`` also lse (B, H, n_new) float32). Collective.
    """
    where = "decode"
    state = {}

    def check():
        rows = state["rows"] = cache._rows(batch_index)
        _check_q(cache, q, k, v, len(rows), where)
        state["scale"] = check_scale(softmax_scale, where)
        cache.check_room(rows, q.shape[1], where)

    _agree(cache, check, lambda: _call_values(q.shape[1], q.shape[2], 0, state["rows"], cache.batch), where, q)
    rows, softmax_scale = state["rows"], state["scale"]
    q_start = cache.seqlens[rows].clone()
    cache._write(rows, k, v)
    cache.seqlens[rows] += q.shape[1]
    out, lse = _attend_shard(cache, rows, q, q_start, softmax_scale)
    if cache.world_size > 1:
        packed = _pack(out, lse)
        every = [torch.empty_like(packed) for _ in range(cache.world_size)]
        dist.all_gather(every, packed, group=cache.group)
        # Every rank folds the same partials in the same order: bitwise the same result everywhere.
        out, lse = merge_splits(*_unpack(torch.stack(every)))
    out = out.to(q.dtype)
    return (out, lse) if return_lse else out
