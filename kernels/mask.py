"""The one rule of visibility (DESIGN.md), as a tile mask and as loop bounds.

Every query row and key column has a global position. Key position k is visible
to query position q when
    q - window_left <= k <= q + window_right,
each side only when it is bounded (``LEFT`` / ``RIGHT`` constexpr flags; the
flash-attn window (-1, -1) bounds neither). Causal attention is the right bound
0, so one description covers causal, sliding windows and both at once. Documents
of packed input never meet: each is its own sequence (``tiles.seqlen_info``).

``visible`` masks a tile; ``visible_range`` turns the same rule into the block
ranges a kernel loops over, so blocks no row can see are never loaded and only
blocks on the boundary pay for a mask. The backward's dk/dv loop asks the
reverse question (which queries see a key block): q is visible to k when
k - window_right <= q <= k + window_left, the same rule with the bounds swapped.
"""
import triton
import triton.language as tl


@triton.jit
def visible(q_pos, k_pos, window_left, window_right, LEFT: tl.constexpr, RIGHT: tl.constexpr):
    """Whether key position ``k_pos`` is visible to query position ``q_pos`` (broadcasting)."""
    ok = (q_pos == q_pos) & (k_pos == k_pos)
    if LEFT:
        ok = ok & (k_pos >= q_pos - window_left)
    if RIGHT:
        ok = ok & (k_pos <= q_pos + window_right)
    return ok


@triton.jit
def visible_range(first_pos, last_pos, other_pos0, other_len, before, after,
                  BEFORE: tl.constexpr, AFTER: tl.constexpr, BLOCK: tl.constexpr):
    """Which indices j of the other axis (positions other_pos0 + j, 0 <= j < other_len) are
    visible to the rows at positions [first_pos, last_pos], where visible means
    p - before <= pos_j <= p + after (each side only when bounded).

    Returns block-aligned (lo, full_lo, full_hi, hi): blocks in [full_lo, full_hi) are
    visible to every row and lie inside the sequence, so they need no mask; blocks in
    [lo, full_lo) and [full_hi, hi) need one; nothing outside [lo, hi) is visible.
    Kernels walk them in two loops (``block_count``, ``block_start``).
    """
    lo = 0
    hi = other_len
    full_lo = 0
    full_hi = other_len
    if AFTER:
        hi = tl.minimum(tl.maximum(last_pos + after - other_pos0 + 1, 0), other_len)
        full_hi = tl.minimum(tl.maximum(first_pos + after - other_pos0 + 1, 0), other_len)
    if BEFORE:
        lo = tl.minimum(tl.maximum(first_pos - before - other_pos0, 0), hi)
        full_lo = tl.minimum(tl.maximum(last_pos - before - other_pos0, 0), hi)
    lo = (lo // BLOCK) * BLOCK
    full_lo = tl.minimum(tl.cdiv(full_lo, BLOCK) * BLOCK, hi)
    full_hi = tl.maximum((full_hi // BLOCK) * BLOCK, full_lo)
    return lo, full_lo, full_hi, hi


# A kernel walks the blocks of ``visible_range`` in two loops: the unmasked blocks, then
# the masked blocks of both edges as one range. Three loops (one per range) made ptxas
# spill registers where two do not (measured by kernels/aot.py, e.g. the forward at head
# dim 128 with a sliding window).
@triton.jit
def block_count(lo, full_lo, full_hi, hi, MASKED: tl.constexpr, BLOCK: tl.constexpr):
    """How many blocks the masked (``MASKED``) or the unmasked loop walks."""
    if MASKED:
        return tl.cdiv(full_lo - lo, BLOCK) + tl.cdiv(hi - full_hi, BLOCK)
    else:
        return tl.cdiv(full_hi - full_lo, BLOCK)


@triton.jit
def block_start(i, lo, full_lo, full_hi, MASKED: tl.constexpr, BLOCK: tl.constexpr):
    """First index of the i-th block of that loop."""
    if MASKED:
        before = tl.cdiv(full_lo - lo, BLOCK)
        return tl.where(i < before, lo + i * BLOCK, full_hi + (i - before) * BLOCK)
    else:
        return full_lo + i * BLOCK
