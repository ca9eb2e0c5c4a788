"""The pages of a paged ShardedKVCache: how many a rank needs, and which of its pool each sequence holds.

A paged cache keeps each rank's slots of a sequence in pages of ``page_size``
slots, taken from that rank's pool of ``num_pages`` pages as the sequence grows;
row b of the block table lists sequence b's pages in order (page j holds its
slots [j * page_size, (j + 1) * page_size)). The pool and the table live on the
host (the cache copies the table to the device for the kernels), so taking pages
never waits for the device.
"""
import torch


def pages_needed(layout, page_size, lengths, rank):
    """Pages ``rank`` needs for sequences of global lengths ``lengths`` (int64 tensor) under ``layout``
    (a ``StripeLayout``): each sequence's slots on that rank, rounded up to whole pages."""
    return int((-(-layout.local_lengths(lengths, rank) // page_size)).sum())


def check_pages(layout, page_size, num_pages, lengths, where, rank_name="rank"):
    """Raise ValueError unless every rank's pool of ``num_pages`` pages holds sequences of ``lengths``."""
    for rank in range(layout.world_size):
        need = pages_needed(layout, page_size, lengths, rank)
        if need > num_pages:
            raise ValueError(f"{where}: out of pages: {rank_name} {rank} would need {need} pages of {page_size} "
                             f"tokens, its pool has {num_pages}; the cache is unchanged")


class PagePool:
    """This rank's pool of ``num_pages`` pages and the host block table, (batch, max_pages) int32."""

    def __init__(self, batch, max_pages, num_pages):
        self.table = torch.zeros((batch, max_pages), dtype=torch.int32)
        self._held = [0] * batch  # pages sequence b holds: the first entries of table[b]
        self._free = list(range(num_pages))

    @property
    def free_pages(self):
        return len(self._free)

    def hold(self, b, pages):
        """Give sequence ``b`` pages from the pool until it holds ``pages`` (the caller checked they exist)."""
        while self._held[b] < pages:
            self.table[b, self._held[b]] = self._free.pop()
            self._held[b] += 1

    def release(self, b):
        """Return sequence ``b``'s pages to the pool."""
        self._free.extend(self.table[b, :self._held[b]].tolist())
        self.table[b].zero_()
        self._held[b] = 0
