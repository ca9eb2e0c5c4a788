"""The bookkeeping of a ShardedKVCache: its sequences' lengths, how far each may grow before the host
must allocate (the limit), and the pages behind the limits.

Each length lives twice: on the host (``seqlens``, replicated: every rank applies
the same appends, so every rank knows every rank's share without communication)
and on the device (``seqlens_device``, what the kernels and ``decode_step`` read
and write). So does the limit: positions below ``limit[b]`` may be written, the
capacity, or for a paged cache the positions the pages taken so far cover. The
checks and the page allocation read only the host copies, so they never wait
for the device; after ``advance_on_device`` (``decode_step``) the host copy of
the lengths is read back on its next use.
"""
import torch

from .pages import PagePool, check_pages, pages_needed


class Bookkeeping:
    """Lengths and limits of ``batch`` sequences of up to ``capacity`` tokens, laid out over ranks by
    ``layout`` (a ``StripeLayout``); with ``page_size`` the pages behind the limits come from this rank's
    pool of ``num_pages`` pages (``max_pages`` per sequence), listed in ``block_table`` (device)."""

    def __init__(self, batch, capacity, layout, rank, device, page_size=None, max_pages=None, num_pages=None):
        self.capacity, self.layout, self.rank = capacity, layout, rank
        self.page_size, self.num_pages = page_size, num_pages
        self.device = torch.device(device)
        self._host = torch.zeros(batch, dtype=torch.int64)
        self.device_copy = torch.zeros(batch, dtype=torch.int64, device=device)
        self._stale = False  # set by advance_on_device, which leaves the host copy behind
        self._limit = torch.full((batch,), capacity if page_size is None else 0, dtype=torch.int64)
        self.limit_device = self._limit.to(device)
        self.pages = None if page_size is None else PagePool(batch, max_pages, num_pages)
        self.block_table = None if page_size is None else self.pages.table.to(device)

    def host(self):
        """The host copy of every length (the tensor itself: callers index it)."""
        if self._stale:
            # decode_step advanced the device copy only; one read back here, never per step.
            self._host = self.device_copy.cpu()
            self._stale = False
            past = (self._host > self._limit).nonzero().flatten().tolist()
            if past:
                raise RuntimeError(f"ShardedKVCache: sequences {past} were decoded past their reserved length "
                                   f"{self._limit[past].tolist()} (call cache.reserve before decode_step): the "
                                   "tokens past it were not stored and the outputs that needed them are invalid")
        return self._host

    @property
    def limit(self):
        """How far each sequence may grow before more pages are taken (host int64 copy)."""
        return self._limit.clone()

    def check_room(self, ids, num_new, where):
        """Raise (changing nothing) unless ``num_new`` more tokens (an int, or one count per sequence: host
        int64) fit in every sequence of ``ids`` (host).

        The check depends only on replicated host state, so every rank reaches the same verdict."""
        new_lens = self.host()[ids] + num_new
        if int(new_lens.max()) > self.capacity:
            i = int(torch.argmax(new_lens))
            b, adding = int(ids[i]), int(new_lens[i] - self._host[ids[i]])
            raise ValueError(f"{where}: cache overflow: sequence {b} holds {int(self._host[b])} tokens, "
                             f"adding {adding} exceeds the capacity {self.capacity}; the cache is unchanged")
        if self.pages is not None:
            target = self._limit.clone()
            target[ids] = torch.maximum(target[ids], new_lens)
            check_pages(self.layout, self.page_size, self.num_pages, target, where)

    def make_room(self, ids, num_new, where):
        """Make room for ``num_new`` more tokens (an int, or one count per sequence) in sequences ``ids`` (host
        int64): check, then take pages.

        Host work only; the device block table and limit are updated only when they change."""
        self.check_room(ids, num_new, where)
        if self.pages is None:
            return
        target = self._host[ids] + num_new
        grown = (target > self._limit[ids]).nonzero().flatten().tolist()
        for i in grown:
            b = int(ids[i])
            self.pages.hold(b, pages_needed(self.layout, self.page_size, target[i], self.rank))
            self._limit[b] = target[i]
        if grown:
            self._limits_to_device()

    def advance(self, ids, dev_ids, num_new):
        """Sequences ``ids`` (host; ``dev_ids`` the same on the device) grew by ``num_new`` tokens (an int, or
        one count per sequence: host int64): both copies."""
        self.host()[ids] += num_new
        self.device_copy[dev_ids] += num_new.to(self.device) if isinstance(num_new, torch.Tensor) else num_new

    def rewind(self, ids, dev_ids, num_tokens, where):
        """Sequences ``ids`` lose their last ``num_tokens`` tokens (their pages stay reserved)."""
        lens = self.host()[ids]
        if num_tokens < 0 or int(lens.min()) < num_tokens:
            raise ValueError(f"{where}: cannot remove {num_tokens} tokens from sequences of lengths {lens.tolist()}")
        self.advance(ids, dev_ids, -num_tokens)

    def advance_on_device(self, num_new):
        """Every sequence grew by ``num_new`` tokens, on the device only (no host work a graph could not
        hold); the host copy is read back on its next use."""
        self.device_copy += num_new
        self._stale = True

    def reset(self, ids, dev_ids):
        """Sequences ``ids`` are empty again; their pages go back to the pool."""
        self.host()[ids] = 0
        self.device_copy[dev_ids] = 0
        if self.pages is not None:
            for b in ids.tolist():
                self.pages.release(b)
            self._limit[ids] = 0
            self._limits_to_device()

    def _limits_to_device(self):
        self.block_table.copy_(self.pages.table)
        self.limit_device.copy_(self._limit)
