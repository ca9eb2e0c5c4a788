"""What each ring rank holds and does for a packing: tokens, attention work and bytes sent (a report).

``context_parallel_work`` compares the packed-document dispatch (dispatch.py, what
``ContextParallel.shard(..., cu_seqlens=)`` does) with three cuts that ignore it:
equal-token chunks, contiguous ("contiguous", ring rank r the r-th of R) or zigzag
("zigzag", chunks r and 2R-1-r of 2R), and the cut cpattn used before the dispatch
("work": 2R zigzag chunks of equal causal work, whatever their token counts). The
transfers are those of ``ring_forward``: at every step but the last each rank sends
the k and v rows of its piece that later steps read (``ring.travelling_rows``),
padded to the longest such span (messages have one shape), and the plan stops
after the last step any rank needs (``ring.ring_plan``).
"""
import bisect
import itertools
from typing import NamedTuple

from .dispatch import cut_window
from .layout import Layout
from .ring import plan_step
from cpattn.kernels.mask import MaskSpec, span_work

SCHEMES = ("dispatch", "work", "zigzag", "contiguous")


class RankLoads(NamedTuple):
    """Per ring rank, in ring order: tokens held, visible (query, key) pairs, bytes sent per forward call."""
    tokens: list
    work: list
    bytes_sent: list
    steps: int  # ring steps of a forward call (1: no transfer at all)


def _packing(cu_seqlens):
    values = cu_seqlens.tolist() if hasattr(cu_seqlens, "tolist") else cu_seqlens
    packing = tuple(int(n) for n in values)
    if len(packing) < 2 or packing[0] != 0 or any(b < a for a, b in zip(packing, packing[1:])) or packing[-1] < 1:
        raise ValueError(f"context_parallel_work: cu_seqlens must start at 0, not decrease and end past 0, "
                         f"got {packing}")
    return packing


def _work_cut(packing, ring_degree):
    """The pieces of the equal-causal-work cut: 2R chunks, cut where the causal work before reaches c/2R of
    the total (it knew no window)."""
    prefix = [0]
    for a, b in zip(packing, packing[1:]):
        for n in range(b - a):
            prefix.append(prefix[-1] + n + 1)
    chunks = 2 * ring_degree
    cuts = [0, *(bisect.bisect_left(prefix, (c * prefix[-1] + chunks - 1) // chunks) for c in range(1, chunks)),
            packing[-1]]
    return [[(cuts[c], cuts[c + 1] - cuts[c]) for c in (r, chunks - 1 - r)] for r in range(ring_degree)]


def _pieces(packing, ring_degree, left, scheme):
    seq_len = packing[-1]
    if scheme == "work":
        return _work_cut(packing, ring_degree)
    layout = Layout(ring_degree, 1, "ring" if scheme == "contiguous" else "zigzag")
    if scheme == "dispatch":
        return [layout.ring_chunks(r, seq_len, packing, left) for r in range(ring_degree)]
    return [layout.ring_chunks(r, seq_len) for r in range(ring_degree)]


def _work(ranges, packing, left):
    """Visible pairs of the queries in ``ranges``, document by document."""
    total = 0
    for start, length in ranges:
        position, end = start, start + length
        while position < end:
            doc = bisect.bisect_right(packing, position) - 1
            stop = min(end, packing[doc + 1])
            total += span_work(position - packing[doc], stop - packing[doc], left)
            position = stop
    return total


def context_parallel_work(cu_seqlens, ring_degree, window_size=(-1, -1), scheme="dispatch", kv_bytes_per_token=1):
    """``RankLoads`` of causal attention over packed documents ``cu_seqlens`` (a tensor or ints, from 0,
    non-decreasing) on ``ring_degree`` ring ranks, with shards cut by ``scheme`` (see the module
    docstring; "dispatch" is what ``ContextParallel.shard`` does) for ``window_size`` (flash-attn's;
    the work counts the left side). ``kv_bytes_per_token``: bytes of one token's k and v (all kv heads;
    the default 1 counts tokens). Ulysses ranks of a ring rank share its tokens and work."""
    packing = _packing(cu_seqlens)
    if isinstance(ring_degree, bool) or not isinstance(ring_degree, int) or ring_degree < 1:
        raise ValueError(f"context_parallel_work: ring_degree must be a positive int, got {ring_degree!r}")
    if scheme not in SCHEMES:
        raise ValueError(f"context_parallel_work: scheme must be one of {SCHEMES}, got {scheme!r}")
    mask = MaskSpec(True, window_size)
    left = cut_window(packing, mask.left)
    pieces = _pieces(packing, ring_degree, left, scheme)
    steps, travelling = 1, [None] * ring_degree  # the rows of each piece some later step reads (ring.travelling_rows)
    for r, step in itertools.product(range(ring_degree), range(1, ring_degree)):
        source = (r - step) % ring_degree
        calls = plan_step(pieces[r], pieces[source], mask, packing)
        if calls:
            steps = max(steps, step + 1)
            rows = [(c.k_lo, c.k_hi) for c in calls] + ([travelling[source]] if travelling[source] else [])
            travelling[source] = (min(lo for lo, _ in rows), max(hi for _, hi in rows))
    tokens = [sum(length for _, length in ranges) for ranges in pieces]
    sent = (steps - 1) * max((hi - lo for lo, hi in filter(None, travelling)), default=0) * kv_bytes_per_token
    return RankLoads(tokens, [_work(ranges, packing, left) for ranges in pieces], [sent] * ring_degree, steps)
