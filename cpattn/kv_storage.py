"""Where a ShardedKVCache keeps this rank's keys and values: the device memory of its shard.

Slots (sequence b, local slot j) map to rows of one flat (rows + 1, Hkv, D)
tensor per k and v: contiguous storage holds row b * local_capacity + j; paged
storage holds page table[b, j // page_size], row j % page_size of it. Writes
move a fixed number of rows per call: the tokens the caller does not keep go to
one spare row past the end, which nobody reads, so a decode step is the same
ops every time (CUDA graphs, torch.compile). A latent cache (latent.py) has no
value rows: its values are a view of the key rows' first columns.
"""
import torch

from .latent import ValueLayout


class KVStorage:
    """This rank's keys and values: ``k``, ``v`` of shape (batch, local_capacity, Hkv, D or Dv), or paged
    (num_pages, page_size, Hkv, D or Dv) read through ``block_table`` (device, (batch, max_pages) int32).
    ``values`` (a latent.ValueLayout; default: values of ``head_dim``) says how the values are held."""

    def __init__(self, shape, num_kv_heads, head_dim, dtype, device, block_table=None, values=None):
        num_rows = shape[0] * shape[1]
        self.local_capacity = None if block_table is not None else shape[1]
        self.page_size = shape[1] if block_table is not None else None
        self.block_table = block_table
        self.values = values or ValueLayout.separate(head_dim)
        self._k_rows = torch.zeros((num_rows + 1, num_kv_heads, head_dim), dtype=dtype, device=device)
        if self.values.latent:
            self._v_rows = self.values.values_of(self._k_rows)  # a view: written with the keys
        else:
            self._v_rows = torch.zeros((num_rows + 1, num_kv_heads, self.values.value_dim), dtype=dtype,
                                       device=device)
        self._spare = num_rows  # the row past the end: where the writes nobody keeps go
        self.k = self._k_rows[:num_rows].view(*shape, num_kv_heads, head_dim)
        self.v = self.values.values_of(self.k) if self.values.latent else \
            self._v_rows[:num_rows].view(*shape, num_kv_heads, self.values.value_dim)

    def _flat_rows(self, dev_ids, slots):
        """Row of the flat storage holding slots ``slots`` (R, n) of sequences ``dev_ids`` (R,), device tensors."""
        if self.block_table is not None:
            page = self.block_table[dev_ids[:, None], slots // self.page_size].long()
            return page * self.page_size + slots % self.page_size
        return dev_ids[:, None] * self.local_capacity + slots

    def write(self, dev_ids, slots, keep, k, v):
        """Write k, v (R, n, Hkv, D or Dv) at slots (R, n) of sequences ``dev_ids`` (R,) where ``keep``
        (R, n) holds; the rest go to the spare row. Device tensors, no host read. A latent cache takes
        v = None: its values are the keys' first columns."""
        index = torch.where(keep, self._flat_rows(dev_ids, slots), self._spare).reshape(-1)
        self._k_rows.index_copy_(0, index, k.reshape(-1, *self._k_rows.shape[1:]))
        if not self.values.latent:
            self._v_rows.index_copy_(0, index, v.reshape(-1, *self._v_rows.shape[1:]))

    def read(self, dev_ids, slots):
        """k, v (len(dev_ids), n, Hkv, D or Dv) at slots ``slots`` ((n,) or (len(dev_ids), n)) of sequences
        ``dev_ids`` (device int64), contiguous (latent: v a view of k)."""
        slots = slots.expand(len(dev_ids), -1)
        index = self._flat_rows(dev_ids, slots).reshape(-1)
        k = self._k_rows[index].view(*slots.shape, *self._k_rows.shape[1:])
        if self.values.latent:
            return k, self.values.values_of(k)  # one gather: the values are the keys' first columns
        return k, self._v_rows[index].view(*slots.shape, *self._v_rows.shape[1:])

    def view(self, dev_ids, every_sequence):
        """(k, v, block_table) of sequences ``dev_ids`` as the decode kernel takes them; ``every_sequence``:
        ``dev_ids`` are all of them, in order (no copy, no gather)."""
        if self.block_table is not None:
            return self.k, self.v, self.block_table if every_sequence else self.block_table[dev_ids]
        if every_sequence:
            return self.k, self.v, None
        k = self.k[dev_ids]
        # Latent: the values stay a view of the gathered keys, so the kernel still reads each key once.
        return k, self.values.values_of(k) if self.values.latent else self.v[dev_ids], None
