"""How a ShardedKVCache holds its values: rows of their own, or the keys' leading columns (MLA's latent cache).

Two layouts of one token's keys and values, per kv head:

* **separate**: a key of ``head_dim`` and a value of ``value_dim`` (by default
  ``head_dim``; another width, e.g. 192/128, for a model whose value head dim is
  its own), stored and read as two rows;
* **latent** (multi-head latent attention, DeepSeek V2/V3): ONE vector of
  ``head_dim`` per token (e.g. 512 latent + 64 rotary = 576) and a single kv head;
  the value is its first ``value_dim`` entries (e.g. 512). Nothing else is stored:
  the value is a view of the key rows, so the decode kernel sees ``v`` as the keys'
  leading columns and reads each key tile once for both products (kernels/decode.py).
  Per token the cache holds ``head_dim`` values instead of ``head_dim + value_dim``.

``ValueLayout`` is the one place that knows which of the two a cache uses: its
checks, the value view of the key rows, and the packed form in which a cache's keys
and values travel in one message (prefill's pass-KV ring, ``transfer_cache``).
"""
import torch

from .checks import MAX_HEAD_DIM, positive_int

# The latent decode kernel holds the value columns and the rotary columns in two tiles of their own
# (kernels/decode.py): each is bounded, not their sum. 512 is DeepSeek's latent width.
MAX_LATENT_VALUE_DIM = 512


class ValueLayout:
    """Keys of ``head_dim`` and values of ``value_dim``, stored apart or (``latent``) as the keys' first
    ``value_dim`` columns. Build it with ``ValueLayout.checked``."""

    def __init__(self, head_dim, value_dim, latent):
        self.head_dim, self.value_dim, self.latent = head_dim, value_dim, latent

    @classmethod
    def separate(cls, head_dim):
        """Keys and values of one head dim, stored apart: a cache's default."""
        return cls(head_dim, head_dim, False)

    @classmethod
    def checked(cls, num_kv_heads, head_dim, v_head_dim, latent, where):
        """The layout ShardedKVCache's arguments ask for, or a TypeError/ValueError naming the bad one.
        ``head_dim`` and ``num_kv_heads`` are positive ints already."""
        if not isinstance(latent, bool):
            raise TypeError(f"{where}: latent must be True or False, got {type(latent).__name__}")
        positive_int(v_head_dim, "v_head_dim", where, allow_none=True)
        if not latent:
            value_dim = head_dim if v_head_dim is None else v_head_dim
            for name, dim in (("head_dim", head_dim), ("v_head_dim", value_dim)):
                if dim > MAX_HEAD_DIM:
                    raise ValueError(f"{where}: {name} {dim} is above the supported maximum {MAX_HEAD_DIM}")
            return cls(head_dim, value_dim, False)
        if num_kv_heads != 1:
            raise ValueError(f"{where}: a latent cache holds one vector per token, num_kv_heads must be 1, "
                             f"got {num_kv_heads}")
        if v_head_dim is None:
            raise ValueError(f"{where}: latent=True needs v_head_dim, the width of the value part of the latent "
                             f"vector (its first v_head_dim entries), e.g. 512 of 576")
        if v_head_dim >= head_dim:
            raise ValueError(f"{where}: a latent cache's v_head_dim ({v_head_dim}) must be below head_dim "
                             f"({head_dim}): the value is the latent vector's first v_head_dim entries")
        if v_head_dim > MAX_LATENT_VALUE_DIM or head_dim - v_head_dim > MAX_HEAD_DIM:
            raise ValueError(f"{where}: a latent cache supports v_head_dim up to {MAX_LATENT_VALUE_DIM} and "
                             f"head_dim - v_head_dim up to {MAX_HEAD_DIM}, got head_dim {head_dim}, "
                             f"v_head_dim {v_head_dim}")
        return cls(head_dim, v_head_dim, True)

    @property
    def stored_dim(self):
        """Values stored per token and kv head: the key and the value, or the latent vector alone."""
        return self.head_dim if self.latent else self.head_dim + self.value_dim

    def values_of(self, keys):
        """The value columns of a latent cache's key rows ``keys`` (..., head_dim): a view, no copy."""
        return keys[..., :self.value_dim]

    def pack(self, k, v):
        """k (..., head_dim), v (..., value_dim) as one tensor (..., stored_dim): what one message carries.
        Latent: k itself (v is a view of it)."""
        return k if self.latent else torch.cat([k, v], dim=-1)

    def unpack(self, packed):
        """(k, v) views of a tensor ``pack`` made."""
        if self.latent:
            return packed, self.values_of(packed)
        return packed[..., :self.head_dim], packed[..., self.head_dim:]

    def bytes_per_token(self, num_kv_heads, elem_size):
        """Bytes of one token's keys and values: what the cache stores, and what attention over it reads."""
        return num_kv_heads * self.stored_dim * elem_size
