"""Where a ShardedKVCache keeps this rank's keys and values: the device memory of its shard.

Slots (sequence b, local slot j) map to rows of one flat (rows + 1, Hkv, D)
tensor per k and v: contiguous storage holds row b * local_capacity + j; paged
storage holds page table[b, j // page_size], row j % page_size of it. Writes
move a fixed number of rows per call: the tokens the caller does not keep go to
one spare row past the end, which nobody reads, so a decode step is the same
ops every time (CUDA graphs, torch.compile).
"""
import torch


class KVStorage:
    """This rank's keys and values: ``k``, ``v`` of shape (batch, local_capacity, Hkv, D), or paged
    (num_pages, page_size, Hkv, D) read through ``block_table`` (device, (batch, max_pages) int32)."""

    def __init__(self, shape, num_kv_heads, head_dim, dtype, device, block_table=None):
        num_rows = shape[0] * shape[1]
        self.local_capacity = None if block_table is not None else shape[1]
        self.page_size = shape[1] if block_table is not None else None
        self.block_table = block_table
        self._k_rows = torch.zeros((num_rows + 1, num_kv_heads, head_dim), dtype=dtype, device=device)
        self._v_rows = torch.zeros_like(self._k_rows)
        self._spare = num_rows  # the row past the end: where the writes nobody keeps go
        self.k = self._k_rows[:num_rows].view(*shape, num_kv_heads, head_dim)
        self.v = self._v_rows[:num_rows].view(*shape, num_kv_heads, head_dim)

    def _flat_rows(self, dev_ids, slots):
        """Row of the flat storage holding slots ``slots`` (R, n) of sequences ``dev_ids`` (R,), device tensors."""
        if self.block_table is not None:
            page = self.block_table[dev_ids[:, None], slots // self.page_size].long()
            return page * self.page_size + slots % self.page_size
        return dev_ids[:, None] * self.local_capacity + slots

    def write(self, dev_ids, slots, keep, k, v):
        """Write k, v (R, n, Hkv, D) at slots (R, n) of sequences ``dev_ids`` (R,) where ``keep`` (R, n)
        holds; the rest go to the spare row. Device tensors, no host read."""
        index = torch.where(keep, self._flat_rows(dev_ids, slots), self._spare).reshape(-1)
        self._k_rows.index_copy_(0, index, k.reshape(-1, *self._k_rows.shape[1:]))
        self._v_rows.index_copy_(0, index, v.reshape(-1, *self._v_rows.shape[1:]))

    def read(self, dev_ids, slots):
        """k, v (len(dev_ids), n, Hkv, D) at slots ``slots`` ((n,) or (len(dev_ids), n)) of sequences
        ``dev_ids`` (device int64), contiguous."""
        slots = slots.expand(len(dev_ids), -1)
        index = self._flat_rows(dev_ids, slots).reshape(-1)
        shape = (*slots.shape, *self._k_rows.shape[1:])
        return self._k_rows[index].view(shape), self._v_rows[index].view(shape)

    def view(self, dev_ids, every_sequence):
        """(k, v, block_table) of sequences ``dev_ids`` as the decode kernel takes them; ``every_sequence``:
        ``dev_ids`` are all of them, in order (no copy, no gather)."""
        if self.block_table is not None:
            return self.k, self.v, self.block_table if every_sequence else self.block_table[dev_ids]
        if every_sequence:
            return self.k, self.v, None
        return self.k[dev_ids], self.v[dev_ids], None
