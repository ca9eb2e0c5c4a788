"""Which tokens of a sequence each rank holds: the one place for shard order.

A context-parallel mesh of P = ring_degree x ulysses_degree ranks, with mesh
rank = ring_index * ulysses_degree + ulysses_index (Ulysses ranks adjacent in
mesh order; ``mesh.py`` maps group ranks to mesh ranks).

* The sequence is cut into chunks of equal length. ``ring``: R chunks, ring
  rank r holds chunk r. ``zigzag``: 2R chunks, ring rank r holds chunks r and
  2R-1-r, so under a causal mask every ring rank has the same amount of work
  (an early chunk with little history and a late one with a lot).
* A ring rank's piece (its chunks, in that order) is split into U equal
  contiguous parts, one per Ulysses rank, so that the Ulysses all-to-all
  (which concatenates the parts in Ulysses order) gives every rank of the ring
  rank exactly its piece back.

Everything else (shard, gather, RoPE positions, the global positions the ring
hands to the kernels) derives from ``ring_chunks`` and ``positions`` here.
"""
from dataclasses import dataclass

import torch

RING_IMPLS = ("ring", "zigzag")


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

    def check_seq_len(self, seq_len, where):
        """Raise ValueError unless a full sequence of ``seq_len`` tokens can be laid out."""
        if isinstance(seq_len, bool) or not isinstance(seq_len, int) or seq_len < 1:
            raise ValueError(f"{where}: sequence length must be a positive int, got {seq_len!r}")
        if seq_len % self.world_size:
            raise ValueError(f"{where}: sequence length {seq_len} is not divisible by the context-parallel "
                             f"size {self.world_size} (ring {self.ring_degree} x ulysses {self.ulysses_degree})")
        if seq_len % self.num_chunks:
            raise ValueError(f"{where}: sequence length {seq_len} is not divisible by 2 x ring degree = "
                             f"{self.num_chunks}, which zigzag sharding needs")

    def ring_chunks(self, ring_index, piece_len):
        """[(global start, length)] of the chunks in ring rank ``ring_index``'s piece, in local order.

        ``piece_len`` is the length of one ring rank's piece (seq_len // ring_degree).
        """
        chunk_len = piece_len * self.ring_degree // self.num_chunks
        return [(c * chunk_len, chunk_len) for c in self.ring_chunk_ids(ring_index)]

    def positions(self, seq_len, rank):
        """Global positions (LongTensor) of the tokens mesh rank ``rank`` holds, in local order."""
        self.check_seq_len(seq_len, "positions")
        ring_index, ulysses_index = divmod(rank, self.ulysses_degree)
        piece = torch.cat([torch.arange(start, start + length)
                           for start, length in self.ring_chunks(ring_index, seq_len // self.ring_degree)])
        part_len = seq_len // self.world_size
        return piece[ulysses_index * part_len:(ulysses_index + 1) * part_len]

    def order(self, seq_len, ranks=None):
        """Global positions of the tokens of mesh ranks ``ranks`` (default all, in mesh order), rank after rank."""
        ranks = range(self.world_size) if ranks is None else ranks
        return torch.cat([self.positions(seq_len, rank) for rank in ranks])
