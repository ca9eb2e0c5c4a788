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

Every write goes through ``store``: a fixed number of rows per call, the tokens
this rank does not own (or that lie past ``limit``) redirected to one spare row
at the end of the storage, which nobody reads. The layout is ``layout.StripeLayout``,
the page pool ``pages.PagePool``.

inference.py and transfer.py work on a cache through its public methods: the
sequences a call names (``sequence_ids``, ``device_ids``), their host lengths
(``seqlens_of``), room for new tokens (``make_room``), writes (``store``) and
lengths that grow (``advance``, ``advance_on_device``).
"""
import torch
import torch.distributed as dist

from cpattn.kernels.tiles import is_power_of_two

from .checks import SUPPORTED_DTYPES, check_kv, check_timeout, positive_int, sequence_ids
from .agreement import agree
from .comm import DEFAULT_TIMEOUT, Communicator
from .faults import collective, fault_path
from .layout import StripeLayout
from .kv_bookkeeping import Bookkeeping
from .kv_storage import KVStorage
from .latent import ValueLayout

DEFAULT_STRIPE = 16


class ShardedKVCache:
    """Keys and values of one attention layer, sharded along the sequence over ``group`` (one cache per layer;
    ``cpattn.inference`` runs attention on it). Arguments, storage (contiguous stripes or pages), the value
    layouts (``v_head_dim``, MLA's ``latent``) and the failure rules: docs/inference.md and DESIGN.md.

    Collective over ``group`` (every rank constructs it with the same arguments): the caches share cpattn's
    own process group over its ranks, whose ``timeout`` bounds how long a rank waits for a failed or missing
    peer; ``close()`` (or ``with``) gives it back. ``check_across_ranks`` (default True): every prefill/decode
    call first all-gathers a few ints, so bad input on one rank raises on all of them.
    """

    def __init__(self, batch, capacity, num_kv_heads, head_dim, dtype=torch.float32, device=None, group=None,
                 page_size=None, stripe=None, num_pages=None, check_across_ranks=True, timeout=DEFAULT_TIMEOUT,
                 v_head_dim=None, latent=False):
        where = "ShardedKVCache"
        self.group = group
        if dist.is_available() and dist.is_initialized():
            self.world_size, self.rank = dist.get_world_size(group), dist.get_rank(group)
        elif group is not None:
            raise ValueError(f"{where}: a process group was given but torch.distributed is not initialised")
        else:
            self.world_size, self.rank = 1, 0

        def check():
            self._build(batch, capacity, num_kv_heads, head_dim, dtype, device, page_size, stripe, num_pages, where,
                        v_head_dim, latent)
            self.check_across_ranks = bool(check_across_ranks)
            return check_timeout(timeout, where)
        # Collective: the ranks learn whether all of them accepted their arguments (so that none waits below
        # for one that raised), then share cpattn's own process group over these ranks, with ``timeout``:
        # prefill, decode and gather run on it, and a failure in one of them makes every rank raise within
        # the timeout (faults.py) instead of hanging.
        parent = (group or dist.group.WORLD) if self.world_size > 1 else None
        timeout = agree(where, check, group=parent)
        self._comm = None if parent is None else Communicator(parent, timeout, owner=where)

    def _build(self, batch, capacity, num_kv_heads, head_dim, dtype, device, page_size, stripe, num_pages, where,
               v_head_dim=None, latent=False):
        """Check the arguments and allocate the storage (local)."""
        (self.batch, self.capacity, self.num_kv_heads, self.head_dim, self.dtype, self.device, self.page_size,
         self.stripe, self.num_pages) = _checked_arguments(batch, capacity, num_kv_heads, head_dim, dtype, device,
                                                           page_size, stripe, num_pages, where)
        self.values = ValueLayout.checked(self.num_kv_heads, self.head_dim, v_head_dim, latent, where)
        self.v_head_dim, self.latent = self.values.value_dim, self.values.latent
        self.paged = page_size is not None
        self.layout = StripeLayout(self.stripe, self.world_size)
        # Slots per rank and sequence: the stripes this rank owns below capacity (rounded up).
        self.local_capacity = -(-self.capacity // (self.stripe * self.world_size)) * self.stripe
        shape, self.max_pages = (self.batch, self.local_capacity), None
        if self.paged:
            self.max_pages = self.local_capacity // self.page_size
            self.num_pages = self.num_pages or self.batch * self.max_pages  # default: every sequence at capacity
            shape = (self.num_pages, self.page_size)
        self._book = Bookkeeping(self.batch, self.capacity, self.layout, self.rank, self.device, self.page_size,
                                 self.max_pages, self.num_pages)
        self._storage = KVStorage(shape, self.num_kv_heads, self.head_dim, dtype, self.device, self.block_table,
                                  self.values)
        self.k, self.v = self._storage.k, self._storage.v
        self._all_ids = torch.arange(self.batch, device=self.device)

    seqlens_device = property(lambda self: self._book.device_copy, doc="Global lengths on the device (int64).")
    limit_device = property(lambda self: self._book.limit_device, doc="``limit`` on the device (int64).")
    block_table = property(lambda self: self._book.block_table, doc="Pages of each sequence (device int32), or None.")
    limit = property(lambda self: self._book.limit, doc="How far each sequence may grow before more pages are "
                                                        "taken (host int64 copy; the capacity when not paged).")

    # ---- communication --------------------------------------------------------------------------------
    @property
    def comm(self):
        """The ``comm.Communicator`` that prefill, decode and gather use (None for one rank): raises
        PeerFailure if an earlier call failed on some rank (then this cache can no longer communicate)."""
        if self._comm is not None:
            self._comm.check("ShardedKVCache")
        return self._comm

    @property
    def process_group(self):
        """The process group of ``comm`` (None for one rank), without its failure check, which reads host
        state: what ``decode_step``, a step a graph may capture, merges on."""
        return None if self._comm is None else self._comm.group

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

    def local_lengths(self, seqlens=None, rank=None):
        """Number of slots ``rank`` (default: this rank) holds for global lengths ``seqlens`` (int64 tensor)."""
        return self.layout.local_lengths(self.seqlens if seqlens is None else seqlens,
                                         self.rank if rank is None else rank)

    # ---- the host copy of the lengths -----------------------------------------------------------------
    @property
    def seqlens(self):
        """Global length of every sequence (host int64 copy, the same on every rank)."""
        return self._book.host().clone()

    def seqlens_of(self, ids):
        """Global lengths of sequences ``ids`` (host int64, from ``sequence_ids``): a copy."""
        return self._book.host()[ids]

    def positions(self, num_tokens=None, token_index=None, batch_index=None, cu_seqlens=None):
        """Global positions of the next chunk's tokens ``token_index`` (default all) for the sequences
        ``batch_index`` (default all), for RoPE; each sequence continues at its own length. A chunk of
        ``num_tokens`` for every sequence: (len(batch), len(token_index)); a packed chunk (``cu_seqlens``,
        as ``prefill`` takes it): (1, len(token_index))."""
        return chunk_positions(self.seqlens_of(self.sequence_ids(batch_index)), num_tokens, token_index, cu_seqlens)

    def sequence_ids(self, batch_index=None):
        """Host int64 tensor of the sequences ``batch_index`` names (default all): distinct ids in [0, batch)."""
        return sequence_ids(batch_index, self.batch, "ShardedKVCache")

    def device_ids(self, ids=None):
        """Sequences ``ids`` (host, from ``sequence_ids``; None: all) as a device tensor."""
        if ids is None or (len(ids) == self.batch and torch.equal(ids, torch.arange(self.batch))):
            return self._all_ids
        return ids.to(self.device)

    # ---- room for new tokens --------------------------------------------------------------------------
    def check_room(self, ids, num_new, where):
        """Raise (changing nothing) unless ``num_new`` more tokens (int or per sequence) fit in sequences ``ids``.
        The check reads only replicated host state, so every rank reaches the same verdict."""
        self._book.check_room(ids, num_new, where)

    def make_room(self, ids, num_new, where):
        """Make room for ``num_new`` more tokens (int or per sequence) in sequences ``ids``: check, take pages."""
        self._book.make_room(ids, num_new, where)

    def reserve(self, num_tokens, batch_index=None):
        """Make room for ``num_tokens`` more tokens in sequences ``batch_index`` (default all) ahead of time.

        ``cpattn.decode_step`` checks and allocates nothing (so that it can be captured
        in a CUDA graph): reserve before running it, e.g. the most tokens a request may
        generate. Raises (changing nothing) on capacity or page-pool overflow."""
        self.make_room(self.sequence_ids(batch_index), int(num_tokens), "ShardedKVCache.reserve")

    @property
    def free_pages(self):
        """Pages left in this rank's pool (None when not paged)."""
        return self._book.pages.free_pages if self.paged else None

    # ---- writing -------------------------------------------------------------------------------------
    def store(self, dev_ids, positions, k, v):
        """Write k, v (R, n, Hkv, D or Dv; latent: v None) at global positions (R, n) of sequences ``dev_ids``
        (R,), all device tensors; the lengths do not change (``advance``).

        Each rank keeps the tokens it owns below the limit; the rest go to the spare row.
        Fixed shapes and no host read: the same ops every decode step."""
        keep = (self.owner(positions) == self.rank) & (positions < self.limit_device[dev_ids][:, None])
        slots = self.layout.local_slot(positions).clamp(max=self.local_capacity - 1)
        self._storage.write(dev_ids, slots, keep, k, v)

    def advance(self, ids, num_new):
        """Sequences ``ids`` (host) grew by ``num_new`` tokens (int or per sequence): both copies of the lengths."""
        self._book.advance(ids, self.device_ids(ids), num_new)

    def advance_on_device(self, num_new):
        """Every sequence grew by ``num_new`` tokens, on the device only (no host work a graph could not
        hold); the host copy is read back on its next use."""
        self._book.advance_on_device(num_new)

    def append(self, k, v, batch_index=None):
        """Append new tokens k, v (len(batch), n, Hkv, D or Dv; latent: v None), the same on every rank, to sequences
        ``batch_index`` (default all): each rank keeps the tokens it owns. No communication."""
        ids = self.sequence_ids(batch_index)
        check_kv(k, v, len(ids), self.num_kv_heads, self.head_dim, self.dtype, self.device, "ShardedKVCache.append",
                 self.v_head_dim, self.latent)
        self.make_room(ids, k.shape[1], "ShardedKVCache.append")
        dev_ids = self.device_ids(ids)
        self.store(dev_ids, self.seqlens_device[dev_ids][:, None] + torch.arange(k.shape[1], device=self.device),
                   k, v)
        self.advance(ids, k.shape[1])

    def reset(self, batch_index=None):
        """Empty sequences ``batch_index`` (default all), returning their pages to the pool."""
        ids = self.sequence_ids(batch_index)
        self._book.reset(ids, self.device_ids(ids))

    def rewind(self, num_tokens, batch_index=None):
        """Forget the last ``num_tokens`` tokens of sequences ``batch_index`` (default all), e.g. the
        rejected draft tokens of speculative decoding. Their pages stay reserved."""
        ids = self.sequence_ids(batch_index)
        self._book.rewind(ids, self.device_ids(ids), int(num_tokens), "ShardedKVCache.rewind")

    # ---- reading -------------------------------------------------------------------------------------
    def local_view(self, dev_ids):
        """(k, v, block_table) of this rank's shard for sequences ``dev_ids`` (device int64), as the decode
        kernel takes them."""
        return self._storage.view(dev_ids, dev_ids is self._all_ids)

    def read(self, dev_ids, slots):
        """k, v (len(dev_ids), n, Hkv, D) at this rank's slots ``slots`` ((n,) or (len(dev_ids), n)) of
        sequences ``dev_ids`` (device int64), contiguous; slots past a sequence's local length hold junk."""
        return self._storage.read(dev_ids, slots)

    def gather(self):
        """The whole unsharded cache on every rank: k, v (batch, max(seqlens), Hkv, D), zero past each
        sequence's length. A collective; meant for checks and debugging, not for the hot path."""
        return _gather_everything(self)

def chunk_positions(lens, num_tokens, token_index, cu_seqlens, where="ShardedKVCache.positions"):
    """``ShardedKVCache.positions`` for sequences of cached lengths ``lens`` (host int64)."""
    if cu_seqlens is not None:
        cu = torch.as_tensor(cu_seqlens, dtype=torch.int64).cpu().reshape(-1)
        if cu.numel() != len(lens) + 1 or (num_tokens is not None and int(cu[-1]) != num_tokens):
            raise ValueError(f"{where}: cu_seqlens must hold {len(lens) + 1} offsets ending at the chunk's "
                             f"length, got {cu.tolist()}")
        num_tokens = int(cu[-1])
    elif num_tokens is None:
        raise ValueError(f"{where}: pass num_tokens (the chunk's length) or cu_seqlens")
    idx = torch.arange(num_tokens) if token_index is None else torch.as_tensor(token_index, dtype=torch.int64).cpu()
    if cu_seqlens is None:
        return lens[:, None] + idx.reshape(-1)[None, :]
    seq, offset = packed_tokens(cu, idx.reshape(-1))
    return (lens[seq] + offset)[None, :]


def packed_tokens(cu_seqlens, tokens):
    """(sequence, offset) of tokens ``tokens`` (host int64) of a packed chunk whose m sequences start at
    ``cu_seqlens`` (host int64, (m + 1,)): the sequence each token belongs to (0..m-1) and its place among
    that sequence's tokens of the chunk."""
    seq = torch.searchsorted(cu_seqlens[1:], tokens, right=True)
    return seq, tokens - cu_seqlens[seq]


def _checked_arguments(batch, capacity, num_kv_heads, head_dim, dtype, device, page_size, stripe, num_pages, where):
    """ShardedKVCache's arguments checked (TypeError/ValueError): batch, capacity, num_kv_heads, head_dim,
    dtype, device (resolved), page_size, stripe (the page size when paged), num_pages (None: the default)."""
    positive_int(batch, "batch", where)
    positive_int(capacity, "capacity", where)
    positive_int(num_kv_heads, "num_kv_heads", where)
    positive_int(head_dim, "head_dim", where)
    if dtype not in SUPPORTED_DTYPES:
        raise TypeError(f"{where}: dtype must be float16, bfloat16 or float32, got {dtype}")
    # "cuda" names the current GPU: resolve it to "cuda:<index>", the device its tensors report.
    device = torch.empty(0, device=device if device is not None else "cpu").device
    if page_size is not None:
        positive_int(page_size, "page_size", where)
        if page_size < 16 or not is_power_of_two(page_size):
            raise ValueError(f"{where}: page_size must be a power of two >= 16, got {page_size}")
        if stripe is not None and stripe != page_size:
            raise ValueError(f"{where}: a paged cache's stripe is its page size ({page_size}), got stripe={stripe}")
        stripe = page_size
        positive_int(num_pages, "num_pages", where, allow_none=True)
    elif num_pages is not None:
        raise ValueError(f"{where}: num_pages needs page_size (a paged cache)")
    stripe = positive_int(stripe if stripe is not None else DEFAULT_STRIPE, "stripe", where)
    return batch, capacity, num_kv_heads, head_dim, dtype, device, page_size, stripe, num_pages


def _gather_everything(cache):
    """``ShardedKVCache.gather``: every rank's slots, zero past their sequences, all-gathered and put in
    position order."""
    k_local, v_local = cache.read(cache.device_ids(), torch.arange(cache.local_capacity, device=cache.device))
    mine = torch.arange(cache.local_capacity)[None, :] < cache.local_lengths()[:, None]
    mine = mine.to(cache.device)[..., None, None]
    k_local = torch.where(mine, k_local, 0).contiguous()
    v_local = torch.where(mine, v_local, 0).contiguous()
    ks, vs = [k_local], [v_local]
    if cache.world_size > 1:
        ks = [torch.empty_like(k_local) for _ in range(cache.world_size)]
        vs = [torch.empty_like(v_local) for _ in range(cache.world_size)]
        comm = cache.comm
        with fault_path(comm, "ShardedKVCache.gather"), collective("ShardedKVCache.gather all-gather"):
            comm.wait([dist.all_gather(ks, k_local, group=comm.group, async_op=True),
                       dist.all_gather(vs, v_local, group=comm.group, async_op=True)], k_local.is_cpu)
    seqlens = cache.seqlens
    pos = torch.arange(int(seqlens.max()) if cache.batch else 0)
    owner, slot = cache.owner(pos).to(cache.device), cache.layout.local_slot(pos).to(cache.device)
    k_full = torch.stack(ks)[owner, :, slot].transpose(0, 1)
    v_full = torch.stack(vs)[owner, :, slot].transpose(0, 1)
    return k_full.contiguous(), v_full.contiguous()
