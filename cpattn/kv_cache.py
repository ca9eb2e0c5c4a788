"""A KV cache sharded along the sequence over the ranks of a process group.

Ownership is page-interleaved: global positions are cut into stripes of
``stripe`` consecutive tokens (the page size when the cache is paged) and
stripe i belongs to rank ``i % world_size``:

    stripe i = pos // stripe,  owner = i % P,  local slot = (i // P) * stripe + pos % stripe

Why not contiguous blocks (rank r owns [r * capacity / P, (r + 1) * capacity / P))?
With blocks, a sequence shorter than capacity / P lives entirely on rank 0: its
decode steps run on one rank while the others wait, and rank 0's memory bounds
the batch. Interleaved stripes give every rank within one stripe of L / P keys
of every sequence, at every length L, so decode work and memory stay balanced
as sequences grow, and each new token still goes to exactly one rank. A rank's
slots map back to positions by the affine rule above, which is what the decode
kernel's ``slot_positions`` expresses; for a paged cache a stripe is exactly one
local page.

State lives in two places:
  * on the device: the keys and values, ``seqlens_device`` and the block table.
    A decode step reads and writes only these, with fixed shapes, so it needs no
    host round trip (``cpattn.decode_step``: CUDA graphs, torch.compile);
  * on the host: ``seqlens`` (replicated: every rank applies the same appends,
    so every rank knows every rank's share without communication), the page
    allocator, and ``limit``: how far each sequence may grow before the host
    must allocate again. The checks and the page allocation use only this host
    state, so they never wait for the device either. After ``decode_step`` the
    host copy of the lengths is refreshed from the device on its next use.

Every write goes through ``_store``: a fixed number of rows per call, the tokens
this rank does not own (or that lie past ``limit``) redirected to one spare row
at the end of the storage, which nobody reads.
"""
import torch
import torch.distributed as dist

from cpattn.kernels.tiles import is_power_of_two

from ._checks import MAX_HEAD_DIM, SUPPORTED_DTYPES, check_timeout, positive_int
from .comm import DEFAULT_TIMEOUT, Communicator, check_agreement, gather_rows
from .faults import collective

DEFAULT_STRIPE = 16


class StripeLayout:
    """Which rank holds each position, at which slot, for ``world_size`` ranks and stripes of ``stripe`` tokens.

    Pure arithmetic on ints or tensors (host or device); ``ShardedKVCache`` and the
    cache transfer (which needs the layout of another group) share it."""

    def __init__(self, stripe, world_size):
        self.stripe, self.world_size = stripe, world_size

    def owner(self, positions):
        return (positions // self.stripe) % self.world_size

    def local_slot(self, positions):
        return (positions // (self.stripe * self.world_size)) * self.stripe + positions % self.stripe

    def local_lengths(self, seqlens, rank):
        """Slots ``rank`` holds of sequences with global lengths ``seqlens`` (int64 tensor)."""
        span = self.stripe * self.world_size
        full, rest = seqlens // span, seqlens % span
        # Of the last, incomplete round of stripes this rank holds what lies past rank * stripe.
        return full * self.stripe + (rest - rank * self.stripe).clamp(0, self.stripe)

    def slot_positions(self, rank):
        """(stripe, stride, offset): slot j of ``rank`` holds position offset + (j // stripe) * stride + j % stripe."""
        return (self.stripe, self.stripe * self.world_size, rank * self.stripe)

    def positions_of(self, rank, num_slots):
        """Global positions of ``rank``'s first ``num_slots`` slots (host int64)."""
        stripe, stride, offset = self.slot_positions(rank)
        j = torch.arange(num_slots)
        return offset + (j // stripe) * stride + j % stripe


class ShardedKVCache:
    """Keys and values of one attention layer, sharded along the sequence over ``group``.

    batch sequences of up to ``capacity`` tokens, ``num_kv_heads`` heads of
    ``head_dim``. ``page_size`` (a power of two >= 16) selects paged storage
    (a pool of pages per rank and a block table, pages taken on demand; the
    pool holds ``num_pages`` pages, by default enough for every sequence at
    full capacity); without it each rank stores a contiguous
    (batch, local_capacity, kv heads, head dim) shard with ownership stripes of
    ``stripe`` tokens (default 16). ``group=None`` is the default group, or a
    single process when torch.distributed is not initialised. With
    ``check_across_ranks`` (default) every prefill/decode call first
    all-gathers a few ints so that bad input on one rank raises on all of them
    instead of hanging the others; False saves that collective.
    Use one cache per attention layer; ``cpattn.inference`` runs attention on it.
    Collective over ``group`` (every rank constructs it with the same arguments):
    the caches share cpattn's own process group over its ranks, whose ``timeout``
    (seconds) bounds how long a rank waits for a failed or missing peer; ``close()``
    (or ``with``) gives it back. After a failure in a call, the cache raises
    ``PeerFailure`` at its next collective call (its contents stay readable locally).
    """

    def __init__(self, batch, capacity, num_kv_heads, head_dim, dtype=torch.float32, device=None, group=None,
                 page_size=None, stripe=None, num_pages=None, check_across_ranks=True, timeout=DEFAULT_TIMEOUT):
        where = "ShardedKVCache"
        self.group = group
        if dist.is_available() and dist.is_initialized():
            self.world_size, self.rank = dist.get_world_size(group), dist.get_rank(group)
        elif group is not None:
            raise ValueError(f"{where}: a process group was given but torch.distributed is not initialised")
        else:
            self.world_size, self.rank = 1, 0
        error = None
        try:
            self._build(batch, capacity, num_kv_heads, head_dim, dtype, device, page_size, stripe, num_pages, where)
            self.check_across_ranks = bool(check_across_ranks)
            timeout = check_timeout(timeout, where)
        except (TypeError, ValueError) as exc:
            error = exc
        self._comm = None
        if self.world_size > 1:
            # Collective: the ranks learn whether all of them accepted their arguments (so that none
            # waits below for one that raised), then share cpattn's own process group over these ranks,
            # with ``timeout``: prefill, decode and gather run on it, and a failure in one of them makes
            # every rank raise within the timeout (faults.py) instead of hanging.
            parent = group or dist.group.WORLD
            check_agreement(gather_rows(parent, [int(error is not None)]), error, where, ())
            self._comm = Communicator(parent, timeout, owner=where)
        elif error is not None:
            raise error

    def _build(self, batch, capacity, num_kv_heads, head_dim, dtype, device, page_size, stripe, num_pages, where):
        """Check the arguments and allocate the storage (local)."""
        self.batch = positive_int(batch, "batch", where)
        self.capacity = positive_int(capacity, "capacity", where)
        self.num_kv_heads = positive_int(num_kv_heads, "num_kv_heads", where)
        self.head_dim = positive_int(head_dim, "head_dim", where)
        if dtype not in SUPPORTED_DTYPES:
            raise TypeError(f"{where}: dtype must be float16, bfloat16 or float32, got {dtype}")
        if head_dim > MAX_HEAD_DIM:
            raise ValueError(f"{where}: head_dim {head_dim} is above the supported maximum {MAX_HEAD_DIM}")
        self.dtype = dtype
        # "cuda" names the current GPU: resolve it to "cuda:<index>", the device its tensors report.
        self.device = torch.empty(0, device=device if device is not None else "cpu").device
        self.paged = page_size is not None
        if self.paged:
            positive_int(page_size, "page_size", where)
            if page_size < 16 or not is_power_of_two(page_size):
                raise ValueError(f"{where}: page_size must be a power of two >= 16, got {page_size}")
            if stripe is not None and stripe != page_size:
                raise ValueError(f"{where}: a paged cache's stripe is its page size ({page_size}), got stripe={stripe}")
            stripe = page_size
        elif num_pages is not None:
            raise ValueError(f"{where}: num_pages needs page_size (a paged cache)")
        self.page_size = page_size
        self.stripe = positive_int(stripe if stripe is not None else DEFAULT_STRIPE, "stripe", where)
        self.layout = StripeLayout(self.stripe, self.world_size)
        # Slots per rank and sequence: the stripes this rank owns below capacity (rounded up).
        self.local_capacity = -(-self.capacity // (self.stripe * self.world_size)) * self.stripe
        if self.paged:
            self.max_pages = self.local_capacity // self.page_size
            self.num_pages = (self.batch * self.max_pages if num_pages is None
                              else positive_int(num_pages, "num_pages", where))
            shape = (self.num_pages, self.page_size)
            self._table = torch.zeros((self.batch, self.max_pages), dtype=torch.int32)  # host copy
            self.block_table = self._table.to(self.device)
            self._pages_held = [0] * self.batch
            self._free = list(range(self.num_pages))
        else:
            shape = (self.batch, self.local_capacity)
            self.block_table = None
        num_rows = shape[0] * shape[1]
        self._k_rows = torch.zeros((num_rows + 1, self.num_kv_heads, self.head_dim), dtype=dtype, device=self.device)
        self._v_rows = torch.zeros_like(self._k_rows)
        self._spare = num_rows  # the row past the end: where writes of tokens this rank does not own go
        self.k = self._k_rows[:num_rows].view(*shape, self.num_kv_heads, self.head_dim)
        self.v = self._v_rows[:num_rows].view(*shape, self.num_kv_heads, self.head_dim)
        self.seqlens_device = torch.zeros(self.batch, dtype=torch.int64, device=self.device)
        self._seqlens = torch.zeros(self.batch, dtype=torch.int64)  # host copy
        self._seqlens_stale = False  # set by decode_step, which advances only the device copy
        # Positions below limit[b] may be written: the capacity, or for a paged cache the pages reserved.
        self._limit = torch.full((self.batch,), 0 if self.paged else self.capacity, dtype=torch.int64)
        self.limit_device = self._limit.to(self.device)
        self._all_rows = torch.arange(self.batch, device=self.device)

    # ---- communication --------------------------------------------------------------------------------
    @property
    def comm(self):
        """The ``comm.Communicator`` that prefill, decode and gather use (None for one rank): raises
        PeerFailure if an earlier call failed on some rank (then this cache can no longer communicate)."""
        if self._comm is not None:
            self._comm.check("ShardedKVCache")
        return self._comm

    def close(self):
        """Give back the process group shared with other caches (destroyed with its last user). Local."""
        if self._comm is not None:
            self._comm.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    # ---- layout -------------------------------------------------------------------------------------
    def owner(self, positions):
        """Rank that holds each global position (int or tensor)."""
        return self.layout.owner(positions)

    def local_slot(self, positions):
        """Slot of each global position in its owner's shard."""
        return self.layout.local_slot(positions)

    def local_lengths(self, seqlens=None, rank=None):
        """Number of slots ``rank`` (default: this rank) holds for global lengths ``seqlens`` (int64 tensor)."""
        return self.layout.local_lengths(self.seqlens if seqlens is None else seqlens,
                                         self.rank if rank is None else rank)

    @property
    def slot_positions(self):
        """(stripe, stride, offset) for the decode kernel: slot j holds the key at
        offset + (j // stripe) * stride + j % stripe."""
        return self.layout.slot_positions(self.rank)

    @property
    def seqlens(self):
        """Global length of every sequence (host int64 copy, the same on every rank)."""
        return self._host_seqlens().clone()

    def _host_seqlens(self):
        if self._seqlens_stale:
            # decode_step advanced the device copy only; one read back here, never per step.
            self._seqlens = self.seqlens_device.cpu()
            self._seqlens_stale = False
            past = (self._seqlens > self._limit).nonzero().flatten().tolist()
            if past:
                raise RuntimeError(f"ShardedKVCache: sequences {past} were decoded past their reserved length "
                                   f"{self._limit[past].tolist()} (call cache.reserve before decode_step): the "
                                   "tokens past it were not stored and the outputs that needed them are invalid")
        return self._seqlens

    def positions(self, num_tokens, token_index=None, batch_index=None):
        """Global positions (len(batch), len(token_index)) of the next ``num_tokens``-token chunk's tokens
        ``token_index`` (default all) for the sequences ``batch_index`` (default all): for RoPE."""
        rows = self._rows(batch_index)
        idx = torch.arange(num_tokens) if token_index is None else torch.as_tensor(token_index, dtype=torch.int64).cpu()
        return self._host_seqlens()[rows][:, None] + idx[None, :]

    # ---- host bookkeeping ----------------------------------------------------------------------------
    def _rows(self, batch_index):
        """Host int64 tensor of the sequences ``batch_index`` names (default all)."""
        if batch_index is None:
            return torch.arange(self.batch)
        rows = torch.as_tensor(batch_index, dtype=torch.int64).reshape(-1).cpu()
        if rows.numel() == 0 or int(rows.min()) < 0 or int(rows.max()) >= self.batch or \
                rows.unique().numel() != rows.numel():
            raise ValueError(f"ShardedKVCache: batch_index must be distinct sequence ids in [0, {self.batch}), "
                             f"got {rows.tolist()}")
        return rows

    def _device_rows(self, rows):
        return self._all_rows if len(rows) == self.batch and torch.equal(rows, torch.arange(self.batch)) \
            else rows.to(self.device)

    def check_room(self, rows, num_new, where):
        """Raise (changing nothing) unless ``num_new`` more tokens fit in every sequence of ``rows``.

        The check depends only on replicated host state, so every rank reaches the same verdict."""
        new_lens = self._host_seqlens()[rows] + num_new
        if int(new_lens.max()) > self.capacity:
            b = int(rows[int(torch.argmax(new_lens))])
            raise ValueError(f"{where}: cache overflow: sequence {b} holds {int(self._seqlens[b])} tokens, "
                             f"adding {num_new} exceeds the capacity {self.capacity}; the cache is unchanged")
        if self.paged:
            target = self._limit.clone()
            target[rows] = torch.maximum(target[rows], new_lens)
            for r in range(self.world_size):
                need = int((-(-self.layout.local_lengths(target, r) // self.page_size)).sum())
                if need > self.num_pages:
                    raise ValueError(f"{where}: out of pages: rank {r} would need {need} pages of "
                                     f"{self.page_size} tokens, its pool has {self.num_pages}; the cache is unchanged")

    def _reserve(self, rows, num_new, where):
        """Make room for ``num_new`` more tokens in sequences ``rows`` (host int64): check, then take pages.

        Host work only; the device block table and limit are updated only when they change."""
        self.check_room(rows, num_new, where)
        if not self.paged:
            return
        target = self._seqlens[rows] + num_new
        grown = (target > self._limit[rows]).nonzero().flatten().tolist()
        if not grown:
            return
        for i in grown:
            b = int(rows[i])
            need = -(-int(self.layout.local_lengths(target[i], self.rank)) // self.page_size)
            while self._pages_held[b] < need:
                self._table[b, self._pages_held[b]] = self._free.pop()
                self._pages_held[b] += 1
            self._limit[b] = target[i]
        self.block_table.copy_(self._table)
        self.limit_device.copy_(self._limit)

    def reserve(self, num_tokens, batch_index=None):
        """Make room for ``num_tokens`` more tokens in sequences ``batch_index`` (default all) ahead of time.

        ``cpattn.decode_step`` checks and allocates nothing (so that it can be captured
        in a CUDA graph): reserve before running it, e.g. the most tokens a request may
        generate. Raises (changing nothing) on capacity or page-pool overflow."""
        self._reserve(self._rows(batch_index), int(num_tokens), "ShardedKVCache.reserve")

    # ---- writing -------------------------------------------------------------------------------------
    def _flat_rows(self, rows, slots):
        """Row of the flat storage holding slots ``slots`` (R, n) of sequences ``rows`` (R,), device tensors."""
        if self.paged:
            page = self.block_table[rows[:, None], slots // self.page_size].long()
            return page * self.page_size + slots % self.page_size
        return rows[:, None] * self.local_capacity + slots

    def _store(self, rows, positions, k, v):
        """Write k, v (R, n, Hkv, D) at global positions (R, n) of sequences ``rows`` (R,), all device tensors.

        Each rank keeps the tokens it owns below the limit; the rest go to the spare row.
        Fixed shapes and no host read: the same ops every decode step."""
        keep = (self.owner(positions) == self.rank) & (positions < self.limit_device[rows][:, None])
        slots = self.local_slot(positions).clamp(max=self.local_capacity - 1)
        index = torch.where(keep, self._flat_rows(rows, slots), self._spare).reshape(-1)
        self._k_rows.index_copy_(0, index, k.reshape(-1, self.num_kv_heads, self.head_dim))
        self._v_rows.index_copy_(0, index, v.reshape(-1, self.num_kv_heads, self.head_dim))

    def _advance(self, rows, num_new):
        """Sequences ``rows`` (host) grew by ``num_new`` tokens: both copies of the lengths."""
        self._host_seqlens()[rows] += num_new
        self.seqlens_device[self._device_rows(rows)] += num_new

    def append(self, k, v, batch_index=None):
        """Append new tokens k, v (len(batch), n, Hkv, D), the same on every rank, to sequences
        ``batch_index`` (default all): each rank keeps the tokens it owns. No communication."""
        rows = self._rows(batch_index)
        self.check_kv(k, v, len(rows), "ShardedKVCache.append")
        self._reserve(rows, k.shape[1], "ShardedKVCache.append")
        dev_rows = self._device_rows(rows)
        positions = self.seqlens_device[dev_rows][:, None] + torch.arange(k.shape[1], device=self.device)
        self._store(dev_rows, positions, k, v)
        self._advance(rows, k.shape[1])

    def check_kv(self, k, v, batch, where):
        for name, t in (("k", k), ("v", v)):
            if not isinstance(t, torch.Tensor):
                raise TypeError(f"{where}: {name} must be a torch.Tensor, got {type(t).__name__}")
            if t.dim() != 4:
                raise ValueError(f"{where}: {name} must be 4-D (batch, tokens, kv heads, head dim), "
                                 f"got shape {tuple(t.shape)}")
            if t.dtype != self.dtype:
                raise TypeError(f"{where}: {name} has dtype {t.dtype}, the cache holds {self.dtype}")
            if t.device != self.device:
                raise ValueError(f"{where}: {name} is on {t.device}, the cache on {self.device}")
            want = (batch, k.shape[1], self.num_kv_heads, self.head_dim)
            if tuple(t.shape) != want:
                raise ValueError(f"{where}: {name} must have shape (batch={batch}, tokens, "
                                 f"kv_heads={self.num_kv_heads}, head_dim={self.head_dim}), got {tuple(t.shape)}")

    def reset(self, batch_index=None):
        """Empty sequences ``batch_index`` (default all), returning their pages to the pool."""
        rows = self._rows(batch_index)
        self._host_seqlens()[rows] = 0
        self.seqlens_device[self._device_rows(rows)] = 0
        if self.paged:
            for b in rows.tolist():
                self._free.extend(self._table[b, : self._pages_held[b]].tolist())
                self._table[b].zero_()
                self._pages_held[b] = 0
            self._limit[rows] = 0
            self.block_table.copy_(self._table)
            self.limit_device.copy_(self._limit)

    def rewind(self, num_tokens, batch_index=None):
        """Forget the last ``num_tokens`` tokens of sequences ``batch_index`` (default all), e.g. the
        rejected draft tokens of speculative decoding. Their pages stay reserved."""
        rows = self._rows(batch_index)
        num_tokens = int(num_tokens)
        lens = self._host_seqlens()[rows]
        if num_tokens < 0 or int(lens.min()) < num_tokens:
            raise ValueError(f"ShardedKVCache.rewind: cannot remove {num_tokens} tokens from sequences of lengths "
                             f"{lens.tolist()}")
        self._advance(rows, -num_tokens)

    # ---- reading -------------------------------------------------------------------------------------
    def local_view(self, dev_rows):
        """(k, v, block_table) of this rank's shard for sequences ``dev_rows`` (device int64), as the decode
        kernel takes them."""
        if self.paged:
            return self.k, self.v, self.block_table if dev_rows is self._all_rows else self.block_table[dev_rows]
        if dev_rows is self._all_rows:
            return self.k, self.v, None
        return self.k[dev_rows], self.v[dev_rows], None

    def read(self, rows, slots):
        """k, v (len(rows), n, Hkv, D) at this rank's slots ``slots`` ((n,) or (len(rows), n)) of sequences
        ``rows`` (device int64), contiguous; slots past a sequence's local length hold junk."""
        slots = slots.expand(len(rows), -1)
        index = self._flat_rows(rows, slots).reshape(-1)
        shape = (*slots.shape, self.num_kv_heads, self.head_dim)
        return self._k_rows[index].view(shape), self._v_rows[index].view(shape)

    def gather(self):
        """The whole unsharded cache on every rank: k, v (batch, max(seqlens), Hkv, D), zero past each
        sequence's length. A collective; meant for checks and debugging, not for the hot path."""
        k_local, v_local = self.read(self._all_rows, torch.arange(self.local_capacity, device=self.device))
        mine = torch.arange(self.local_capacity)[None, :] < self.local_lengths()[:, None]
        mine = mine.to(self.device)[..., None, None]
        k_local = torch.where(mine, k_local, 0).contiguous()
        v_local = torch.where(mine, v_local, 0).contiguous()
        if self.world_size > 1:
            ks = [torch.empty_like(k_local) for _ in range(self.world_size)]
            vs = [torch.empty_like(v_local) for _ in range(self.world_size)]
            comm = self.comm
            with collective("ShardedKVCache.gather all-gather"):
                comm.wait([dist.all_gather(ks, k_local, group=comm.group, async_op=True),
                           dist.all_gather(vs, v_local, group=comm.group, async_op=True)], k_local.is_cpu)
        else:
            ks, vs = [k_local], [v_local]
        length = int(self._host_seqlens().max()) if self.batch else 0
        pos = torch.arange(length)
        owner, slot = self.owner(pos).to(self.device), self.local_slot(pos).to(self.device)
        k_full = torch.stack(ks)[owner, :, slot].transpose(0, 1)
        v_full = torch.stack(vs)[owner, :, slot].transpose(0, 1)
        return k_full.contiguous(), v_full.contiguous()
