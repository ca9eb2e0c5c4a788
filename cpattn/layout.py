"""Which tokens of a sequence each rank holds: the one place for shard order.

A context-parallel mesh of P = ring_degree x ulysses_degree ranks, with mesh
rank = ring_index * ulysses_degree + ulysses_index (Ulysses ranks adjacent in
mesh order; ``mesh.py`` maps group ranks to mesh ranks).

* The sequence is cut into chunks whose lengths differ by at most one (the
  first ``seq_len % num_chunks`` chunks hold one token more), so any length
  can be laid out, with no padding and no dropped token. ``ring``: R chunks,
  ring rank r holds chunk r. ``zigzag``: 2R chunks, ring rank r holds chunks r
  and 2R-1-r, so under a causal mask every ring rank has (nearly) the same
  amount of work (an early chunk with little history and a late one with a lot).
* A ring rank's piece (its chunks, in that order) is split into U contiguous
  parts, again of lengths differing by at most one, one per Ulysses rank, so
  that the Ulysses all-to-all (which concatenates the parts in Ulysses order)
  gives every rank of the ring rank exactly its piece back.

* Packed documents (``packing``: the global cu_seqlens as a tuple, 0 first, the
  sequence length last): ``dispatch.py`` chooses which token ranges each ring
  rank holds, the same for ring and zigzag, so that every ring rank holds its
  share of the tokens (within one) and of the attention work (causal, within the
  window the shards are cut for, ``window_left``): documents that fit stay whole
  on one rank, long ones are split zigzag-wise over all. Attention inside each
  document is still exact: the ring planner only pairs tokens of one document.

Ranks may therefore hold different token counts (``local_lengths``).
Everything else (shard, gather, RoPE positions, the global positions the ring
hands to the kernels) derives from ``ring_chunks`` and ``positions`` here.

* ``StripeLayout``: the layout of the inference KV cache (kv_cache.py), which
  grows a token at a time: positions dealt out round-robin in stripes.
"""
from dataclasses import dataclass

import functools

import torch

RING_IMPLS = ("ring", "zigzag")


def split_lengths(total, parts):
    """``total`` cut into ``parts`` lengths differing by at most one, the longer ones first."""
    base, extra = divmod(total, parts)
    return [base + (i < extra) for i in range(parts)]


def doc_positions(packing):
    """Each token's position inside its own document (LongTensor), for ``packing`` (the cu_seqlens as a tuple)."""
    cu = torch.tensor(packing, dtype=torch.int64)
    lengths = cu[1:] - cu[:-1]
    return torch.arange(packing[-1]) - torch.repeat_interleave(cu[:-1], lengths)


@dataclass(frozen=True)
class Layout:
    ring_degree: int
    ulysses_degree: int
    ring_impl: str

    def __post_init__(self):
        if self.ring_impl not in RING_IMPLS:
            raise ValueError(f"ring_impl must be one of {RING_IMPLS}, got {self.ring_impl!r}")
        for name in ("ring_degree", "ulysses_degree"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be a positive int, got {value!r}")

    @property
    def world_size(self):
        return self.ring_degree * self.ulysses_degree

    @property
    def num_chunks(self):
        # With one ring rank zigzag and ring coincide: the piece is the whole sequence.
        zigzag = self.ring_impl == "zigzag" and self.ring_degree > 1
        return 2 * self.ring_degree if zigzag else self.ring_degree

    def ring_chunk_ids(self, ring_index):
        if self.num_chunks == self.ring_degree:
            return (ring_index,)
        return (ring_index, 2 * self.ring_degree - 1 - ring_index)

    @staticmethod
    def check_seq_len(seq_len, where):
        """Raise ValueError unless ``seq_len`` is a valid full sequence length (any positive int)."""
        if isinstance(seq_len, bool) or not isinstance(seq_len, int) or seq_len < 1:
            raise ValueError(f"{where}: sequence length must be a positive int, got {seq_len!r}")

    def full_length(self, local_len, seq_len, rank, where, packing=None, window_left=-1):
        """The full sequence length (``seq_len``, or local_len x P when None), checked against the
        ``local_len`` tokens mesh rank ``rank`` holds; raises ValueError."""
        if seq_len is None:
            seq_len = local_len * self.world_size
        self.check_seq_len(seq_len, where)
        expected = self.local_lengths(seq_len, packing, window_left)[rank]
        if local_len != expected:
            raise ValueError(f"{where}: this rank holds {local_len} tokens, but its shard of a {seq_len}-token "
                             f"sequence has {expected} (with uneven lengths pass the full length as seq_len=)")
        return seq_len

    @functools.lru_cache(maxsize=256)
    def chunk_bounds(self, seq_len):
        """The num_chunks + 1 cut points of a sequence without documents: equal token counts (differing by
        at most one)."""
        lengths = split_lengths(seq_len, self.num_chunks)
        return tuple(sum(lengths[:c]) for c in range(self.num_chunks + 1))

    def ring_chunks(self, ring_index, seq_len, packing=None, window_left=-1):
        """[(global start, length)] of the token ranges in ring rank ``ring_index``'s piece of a ``seq_len``
        sequence, in local order: its chunks (one may be empty when the sequence is shorter than 2R), or
        with ``packing`` the ranges the dispatch gives it for shards cut for ``window_left``."""
        if packing is not None:
            from .dispatch import cut_window, dispatch  # dispatch.py builds on this module
            return list(dispatch(packing, self.ring_degree, cut_window(packing, window_left))[ring_index])
        bounds = self.chunk_bounds(seq_len)
        return [(bounds[c], bounds[c + 1] - bounds[c]) for c in self.ring_chunk_ids(ring_index)]

    def piece_length(self, ring_index, seq_len, packing=None, window_left=-1):
        return sum(length for _, length in self.ring_chunks(ring_index, seq_len, packing, window_left))

    def ulysses_parts(self, ring_index, seq_len, packing=None, window_left=-1):
        """Lengths of the Ulysses ranks' parts of ring rank ``ring_index``'s piece, in Ulysses order."""
        return split_lengths(self.piece_length(ring_index, seq_len, packing, window_left), self.ulysses_degree)

    def local_lengths(self, seq_len, packing=None, window_left=-1):
        """Tokens each mesh rank holds, in mesh order."""
        return [n for r in range(self.ring_degree) for n in self.ulysses_parts(r, seq_len, packing, window_left)]

    def positions(self, seq_len, rank, packing=None, window_left=-1):
        """Global positions (LongTensor) of the tokens mesh rank ``rank`` holds, in local order."""
        self.check_seq_len(seq_len, "positions")
        ring_index, ulysses_index = divmod(rank, self.ulysses_degree)
        piece = torch.cat([torch.arange(start, start + length, dtype=torch.int64)
                           for start, length in self.ring_chunks(ring_index, seq_len, packing, window_left)]
                          or [torch.empty(0, dtype=torch.int64)])
        parts = self.ulysses_parts(ring_index, seq_len, packing, window_left)
        first = sum(parts[:ulysses_index])
        return piece[first:first + parts[ulysses_index]]

    def order(self, seq_len, ranks=None, packing=None, window_left=-1):
        """Global positions of the tokens of mesh ranks ``ranks`` (default all, in mesh order), rank after rank."""
        ranks = range(self.world_size) if ranks is None else ranks
        return torch.cat([self.positions(seq_len, rank, packing, window_left) for rank in ranks])


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

