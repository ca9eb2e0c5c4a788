"""The one rule of visibility (DESIGN.md), both halves: the jit half the kernels run
(a tile mask and loop bounds) and, below it, the host half (``MaskSpec`` and the
position-range questions planners ask). Key position k is visible to query
position q when q - window_left <= k <= q + window_right, each side only when it is
bounded (``LEFT`` / ``RIGHT`` constexpr flags; the flash-attn window (-1, -1)
bounds neither). Causal attention is the right bound 0 (``causal_window``), so one
description covers causal, sliding windows and both at once. Documents of packed
input never meet: each is its own sequence (``tiles.seqlen_info``).

``visible`` masks a tile; ``visible_range`` turns the same rule into the block
ranges a kernel loops over, so blocks no row can see are never loaded and only
blocks on the boundary pay for a mask. The backward's dk/dv loop asks the
reverse question (which queries see a key block): q is visible to k when
k - window_right <= q <= k + window_left, the same rule with the bounds swapped.
"""
import torch
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
# spill registers where two do not (measured by bench/aot.py, e.g. the forward at head
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


# ---------------------------------------------------------------- the host half
# The same rule, asked on the host: by the public entry points (which build a MaskSpec),
# the ring planner (which chunk pairs see each other) and the inference code (which cache
# slots a chunk can see). It sits beside the jit half so that the two cannot drift apart.

def causal_window(causal, window_size):
    """The (left, right) window a call attends with: ``window_size`` (-1 unbounded) with
    causal as the right bound 0 (a right bound already below 0 stays)."""
    left, right = (int(w) for w in window_size)
    if causal:
        right = 0 if right < 0 else min(right, 0)
    return left, right


def window_sees(window, q_first, q_last, k_first, k_last):
    """The rule on position ranges: (whether some query in [q_first, q_last] sees some key
    in [k_first, k_last], whether every query sees every key) under ``window`` = (left,
    right), -1 unbounded."""
    left, right = window
    some = (right < 0 or k_first <= q_last + right) and (left < 0 or k_last >= q_first - left)
    every = (right < 0 or k_last <= q_first + right) and (left < 0 or k_first >= q_last - left)
    return some, some and every


def visible_keys(window, q_first, q_last, num_keys):
    """[lo, hi): the keys among positions [0, num_keys) that some query in [q_first, q_last]
    sees under ``window`` (int64 tensors, one range per sequence); empty where lo >= hi."""
    left, right = window
    hi = num_keys if right < 0 else torch.minimum(q_last + right + 1, num_keys)
    lo = torch.zeros_like(q_first) if left < 0 else (q_first - left).clamp(min=0)
    return lo, hi


class MaskSpec:
    """The one description of which keys a query sees, as the kernels take it.

    q_start, k_start: global positions of the first query row and key column (ints), or,
        with ``cu_seqlens_q``/``cu_seqlens_k`` (packed documents, int32 (N + 1,)),
        int32 tensors (N,) of each document's first query / key position.
    causal: keys after the query are invisible (``causal_window``).
    window_size: (left, right) as flash-attn, -1 = unbounded on that side.
    """

    def __init__(self, causal=False, window_size=(-1, -1), q_start=0, k_start=0,
                 cu_seqlens_q=None, cu_seqlens_k=None, max_seqlen_q=None, max_seqlen_k=None):
        self.left, self.right = causal_window(causal, window_size)
        self.q_start, self.k_start = q_start, k_start
        self.cu_seqlens_q, self.cu_seqlens_k = cu_seqlens_q, cu_seqlens_k
        self.max_seqlen_q, self.max_seqlen_k = max_seqlen_q, max_seqlen_k

    @property
    def window(self):
        return self.left, self.right

    @property
    def varlen(self):
        return self.cu_seqlens_q is not None

    def num_seqs(self, batch):
        return self.cu_seqlens_q.numel() - 1 if self.varlen else batch

    def lengths(self, seqlen_q, seqlen_k):
        """(longest query sequence, longest key sequence)."""
        if self.varlen:
            return self.max_seqlen_q, self.max_seqlen_k
        return seqlen_q, seqlen_k

    def kernel_args(self, like):
        """(CuSeqlensQ, CuSeqlensK, PosQ, PosK, q_start, k_start, window_left, window_right)."""
        if self.varlen:
            return (self.cu_seqlens_q, self.cu_seqlens_k, self.q_start, self.k_start, 0, 0,
                    max(self.left, 0), max(self.right, 0))
        return like, like, like, like, int(self.q_start), int(self.k_start), max(self.left, 0), max(self.right, 0)

    def constants(self):
        """The constexprs of the rule: packed documents, and which sides of the window are bounded."""
        return {"VARLEN": self.varlen, "LEFT": self.left >= 0, "RIGHT": self.right >= 0}


# ---- counting visible pairs (host): the work model of the packed-document dispatch -------------------
def prefix_work(n, left=-1):
    """Visible (query, key) pairs among the first ``n`` tokens of a document under a causal mask with a
    window of ``left`` tokens back (-1: unbounded): each query sees at most left + 1 keys. The work
    model of cpattn's packed-document dispatch (cpattn/dispatch.py) and its report."""
    if left < 0 or n <= left + 1:
        return n * (n + 1) // 2
    return (left + 1) * (left + 2) // 2 + (n - left - 1) * (left + 1)


def span_work(a, b, left=-1):
    """Visible pairs of the queries at document positions [a, b) (``prefix_work``)."""
    return prefix_work(b, left) - prefix_work(a, left)
