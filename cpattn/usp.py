"""USP: Ulysses inside each Ulysses group, ring across the ring group.

Pure ring (ulysses_degree 1) and pure Ulysses (ring_degree 1) are the two
degenerate meshes of the same path: an axis of one rank does no communication.
After the Ulysses all-to-all every rank holds its ring rank's whole piece (the
shard order in ``layout.py`` makes it so) for a subset of heads, and the ring
runs over that piece with the global positions ``Layout.ring_chunks`` gives.
"""
from .ring import RingAttentionFunction
from .ulysses import head_to_seq, kv_heads_for_ranks, seq_to_head


def usp_attention(q, k, v, layout, ring_index, ring_comm, ulysses_comm, causal, softmax_scale):
    """Attention of local shards (flash layout) over the mesh; differentiable in q, k, v.

    ``ring_comm``: a ``RingComm`` or None (ring degree 1); ``ulysses_comm``: a
    process group or None (Ulysses degree 1). Inputs are assumed validated.
    """
    if ulysses_comm is not None:
        k = kv_heads_for_ranks(k, layout.ulysses_degree)
        v = kv_heads_for_ranks(v, layout.ulysses_degree)
        q, k, v = (seq_to_head(t, ulysses_comm) for t in (q, k, v))
    out = RingAttentionFunction.apply(q, k, v, layout, ring_index, ring_comm, causal, softmax_scale)
    if ulysses_comm is not None:
        out = head_to_seq(out, ulysses_comm)
    return out
