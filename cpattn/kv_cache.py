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

The lengths (``seqlens``) are replicated host state: every rank applies the
same appends, so every rank knows every rank's share without communication.
"""
import torch
import torch.distributed as dist

from ._checks import MAX_HEAD_DIM, SUPPORTED_DTYPES, positive_int

DEFAULT_STRIPE = 16


def _is_power_of_two(n):
    return n > 0 and (n & (n - 1)) == 0


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
    """

    def __init__(self, batch, capacity, num_kv_heads, head_dim, dtype=torch.float32, device=None, group=None,
                 page_size=None, stripe=None, num_pages=None, check_across_ranks=True):
        where = "ShardedKVCache"
        self.batch = positive_int(batch, "batch", where)
        self.capacity = positive_int(capacity, "capacity", where)
        self.num_kv_heads = positive_int(num_kv_heads, "num_kv_heads", where)
        self.head_dim = positive_int(head_dim, "head_dim", where)
        if dtype not in SUPPORTED_DTYPES:
            raise TypeError(f"{where}: dtype must be float16, bfloat16 or float32, got {dtype}")
        if head_dim > MAX_HEAD_DIM:
            raise ValueError(f"{where}: head_dim {head_dim} is above the supported maximum {MAX_HEAD_DIM}")
        self.dtype = dtype
        self.device = torch.device(device if device is not None else "cpu")
        self.group = group
        self.check_across_ranks = bool(check_across_ranks)
        if dist.is_available() and dist.is_initialized():
            self.world_size, self.rank = dist.get_world_size(group), dist.get_rank(group)
        elif group is not None:
            raise ValueError(f"{where}: a process group was given but torch.distributed is not initialised")
        else:
            self.world_size, self.rank = 1, 0
        self.paged = page_size is not None
        if self.paged:
            positive_int(page_size, "page_size", where)
            if page_size < 16 or not _is_power_of_two(page_size):
                raise ValueError(f"{where}: page_size must be a power of two >= 16, got {page_size}")
            if stripe is not None and stripe != page_size:
                raise ValueError(f"{where}: a paged cache's stripe is its page size ({page_size}), got stripe={stripe}")
            stripe = page_size
        self.page_size = page_size
        self.stripe = positive_int(stripe if stripe is not None else DEFAULT_STRIPE, "stripe", where)
        span = self.stripe * self.world_size
        # Slots per rank and sequence: the stripes this rank owns below capacity (rounded up).
        self.local_capacity = -(-self.capacity // span) * self.stripe
        shape = (self.num_kv_heads, self.head_dim)
        if self.paged:
            self.max_pages = self.local_capacity // self.page_size
            self.num_pages = (self.batch * self.max_pages if num_pages is None
                              else positive_int(num_pages, "num_pages", where))
            self.k = torch.zeros((self.num_pages, self.page_size, *shape), dtype=dtype, device=self.device)
            self.v = torch.zeros_like(self.k)
            self._table = torch.zeros((self.batch, self.max_pages), dtype=torch.int32)  # host copy
            self.block_table = self._table.to(self.device)
            self._pages_held = [0] * self.batch
            self._free = list(range(self.num_pages))
        else:
            if num_pages is not None:
                raise ValueError(f"{where}: num_pages needs page_size (a paged cache)")
            self.k = torch.zeros((self.batch, self.local_capacity, *shape), dtype=dtype, device=self.device)
            self.v = torch.zeros_like(self.k)
            self.block_table = None
        self.seqlens = torch.zeros(self.batch, dtype=torch.int64)  # global lengths, host, same on every rank

    # ---- layout -------------------------------------------------------------------------------------
    def owner(self, positions):
        """Rank that holds each global position (int or tensor)."""
        return (positions // self.stripe) % self.world_size

    def local_slot(self, positions):
        """Slot of each global position in its owner's shard."""
        return (positions // (self.stripe * self.world_size)) * self.stripe + positions % self.stripe

    def local_lengths(self, seqlens=None, rank=None):
        """Number of slots ``rank`` (default: this rank) holds for global lengths ``seqlens`` (int64 tensor)."""
        seqlens = self.seqlens if seqlens is None else seqlens
        rank = self.rank if rank is None else rank
        span = self.stripe * self.world_size
        full, rest = seqlens // span, seqlens % span
        # Of the last, incomplete round of stripes this rank holds what lies past rank * stripe.
        return full * self.stripe + (rest - rank * self.stripe).clamp(0, self.stripe)

    @property
    def slot_positions(self):
        """(stripe, stride, offset) for the decode kernel: slot j holds the key at
        offset + (j // stripe) * stride + j % stripe."""
        return (self.stripe, self.stripe * self.world_size, self.rank * self.stripe)

    def positions(self, num_tokens, token_index=None, batch_index=None):
        """Global positions (len(batch), len(token_index)) of the next ``num_tokens``-token chunk's tokens
        ``token_index`` (default all) for the sequences ``batch_index`` (default all): for RoPE."""
        rows = self._rows(batch_index)
        idx = torch.arange(num_tokens) if token_index is None else torch.as_tensor(token_index, dtype=torch.int64).cpu()
        return self.seqlens[rows][:, None] + idx[None, :]

    # ---- writing -------------------------------------------------------------------------------------
    def _rows(self, batch_index):
        if batch_index is None:
            return torch.arange(self.batch)
        rows = torch.as_tensor(batch_index, dtype=torch.int64).reshape(-1).cpu()
        if rows.numel() == 0 or int(rows.min()) < 0 or int(rows.max()) >= self.batch or rows.unique().numel() != rows.numel():
            raise ValueError(f"ShardedKVCache: batch_index must be distinct sequence ids in [0, {self.batch}), "
                             f"got {rows.tolist()}")
        return rows

    def check_room(self, rows, num_new, where):
        """Raise (changing nothing) unless ``num_new`` tokens fit in every sequence of ``rows``.

        The check depends only on replicated state, so every rank reaches the same verdict."""
        new_lens = self.seqlens[rows] + num_new
        if int(new_lens.max()) > self.capacity:
            b = int(rows[int(torch.argmax(new_lens))])
            raise ValueError(f"{where}: cache overflow: sequence {b} holds {int(self.seqlens[b])} tokens, "
                             f"adding {num_new} exceeds the capacity {self.capacity}; the cache is unchanged")
        if self.paged:
            lens = self.seqlens.clone()
            lens[rows] = new_lens
            for r in range(self.world_size):
                need = int((-(-self.local_lengths(lens, r) // self.page_size)).sum())
                if need > self.num_pages:
                    raise ValueError(f"{where}: out of pages: rank {r} would need {need} pages of "
                                     f"{self.page_size} tokens, its pool has {self.num_pages}; the cache is unchanged")

    def _write(self, rows, k, v):
        """Store this rank's share of new tokens k, v (len(rows), n, Hkv, D) at each sequence's end.

        The index arithmetic runs on the host (it is tiny); the copy is one indexed write per tensor."""
        n = k.shape[1]
        pos = self.seqlens[rows][:, None] + torch.arange(n)[None, :]    # (len(rows), n) global positions
        seq, tok = (self.owner(pos) == self.rank).nonzero(as_tuple=True)  # the new tokens this rank owns
        if seq.numel() == 0:
            return
        slots = self.local_slot(pos[seq, tok])
        batch_ids = rows[seq]
        if self.paged:
            needed = torch.zeros(self.batch, dtype=torch.int64).scatter_reduce(
                0, batch_ids, slots // self.page_size + 1, reduce="amax")
            grown = False
            for b in needed.nonzero().squeeze(1).tolist():
                while self._pages_held[b] < int(needed[b]):
                    self._table[b, self._pages_held[b]] = self._free.pop()
                    self._pages_held[b] += 1
                    grown = True
            if grown:
                self.block_table.copy_(self._table)
            dest = (self._table[batch_ids, slots // self.page_size].long(), slots % self.page_size)
        else:
            dest = (batch_ids, slots)
        dest = tuple(d.to(self.device) for d in dest)
        src = (seq.to(k.device), tok.to(k.device))
        self.k[dest] = k[src]
        self.v[dest] = v[src]

    def append(self, k, v, batch_index=None):
        """Append new tokens k, v (len(batch), n, Hkv, D), the same on every rank, to sequences
        ``batch_index`` (default all): each rank keeps the tokens it owns. No communication."""
        rows = self._rows(batch_index)
        self.check_kv(k, v, len(rows), "ShardedKVCache.append")
        self.check_room(rows, k.shape[1], "ShardedKVCache.append")
        self._write(rows, k, v)
        self.seqlens[rows] += k.shape[1]

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
        for b in rows.tolist():
            if self.paged:
                self._free.extend(self._table[b, : self._pages_held[b]].tolist())
                self._table[b].zero_()
                self._pages_held[b] = 0
            self.seqlens[b] = 0
        if self.paged:
            self.block_table.copy_(self._table)

    # ---- reading -------------------------------------------------------------------------------------
    def local_view(self, rows):
        """(k, v, block_table) of this rank's shard for sequences ``rows``, as the decode kernel takes them."""
        if self.paged:
            table = self.block_table if len(rows) == self.batch and torch.equal(rows, torch.arange(self.batch)) \
                else self.block_table[rows.to(self.device)]
            return self.k, self.v, table
        if len(rows) == self.batch and torch.equal(rows, torch.arange(self.batch)):
            return self.k, self.v, None
        index = rows.to(self.device)
        return self.k[index], self.v[index], None

    def gather(self):
        """The whole unsharded cache on every rank: k, v (batch, max(seqlens), Hkv, D), zero past each
        sequence's length. A collective; meant for checks and debugging, not for the hot path."""
        if self.paged:
            slots = torch.arange(self.local_capacity)
            page = self._table[:, slots // self.page_size].to(self.device)
            off = (slots % self.page_size).to(self.device)
            k_local, v_local = self.k[page, off[None, :]], self.v[page, off[None, :]]
        else:
            k_local, v_local = self.k, self.v
        mine = torch.arange(self.local_capacity)[None, :] < self.local_lengths()[:, None]
        k_local = torch.where(mine.to(self.device)[..., None, None], k_local, 0).contiguous()
        v_local = torch.where(mine.to(self.device)[..., None, None], v_local, 0).contiguous()
        if self.world_size > 1:
            ks = [torch.empty_like(k_local) for _ in range(self.world_size)]
            vs = [torch.empty_like(v_local) for _ in range(self.world_size)]
            dist.all_gather(ks, k_local, group=self.group)
            dist.all_gather(vs, v_local, group=self.group)
        else:
            ks, vs = [k_local], [v_local]
        length = int(self.seqlens.max()) if self.batch else 0
        pos = torch.arange(length)
        owner, slot = self.owner(pos), self.local_slot(pos)
        k_full = torch.stack(ks)[owner.to(self.device), :, slot.to(self.device)].transpose(0, 1)
        v_full = torch.stack(vs)[owner.to(self.device), :, slot.to(self.device)].transpose(0, 1)
        return k_full.contiguous(), v_full.contiguous()
