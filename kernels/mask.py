"""The one rule of visibility (DESIGN.md), both halves: the jit half the kernels run (a tile mask
and loop bounds) and, below it, the host half (``MaskSpec``, the one description of a mask from a
public call down to the kernel, and the position-range questions planners ask of it). Key position
k is visible to query position q when q - window_left <= k <= q + window_right, each side only when
it is bounded (``LEFT`` / ``RIGHT`` constexpr flags; the flash-attn window (-1, -1) bounds neither).
Causal attention is the right bound 0 (``causal_window``), so one description covers causal, sliding
windows and both at once. Documents of packed input never meet: each is its own sequence.

``visible`` masks a tile; ``visible_range`` turns the same rule into the block ranges a kernel loops
over, so blocks no row can see are never loaded and only blocks on the boundary pay for a mask. The
backward's dk/dv loop asks the reverse question (which queries see a key block): q is visible to k
when k - window_right <= q <= k + window_left, the same rule with the bounds swapped.
"""
import functools

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


class MaskSpec:
    """The one description of which keys a query sees, from a public call down to the kernels.

    window: (left, right) after ``causal_window``, -1 unbounded: built from ``causal`` and
        ``window_size`` (flash-attn's (left, right)).
    q_start, k_start: positions of the first query row and key column (ints), or, with
        ``cu_seqlens_q``/``cu_seqlens_k`` (packed documents, (N + 1,) bounds), each
        document's first query / key position (N,).
    Document fields are int32 tensors on the kernels' device, or tuples of ints: the host
    form, which planners build and hash, and which ``on(device)`` turns into tensors.

    A public call makes one MaskSpec for its whole attention (a context-parallel call: at
    global positions); planners cut it into the MaskSpecs of their kernel calls (``at``,
    ``sees``) and the kernels read it (``kernel_args``, ``constants``). Equal descriptions
    compare and hash equal (tensors by identity), so plans can be cached by mask.
    """

    def __init__(self, causal=False, window_size=(-1, -1), q_start=0, k_start=0,
                 cu_seqlens_q=None, cu_seqlens_k=None, max_seqlen_q=None, max_seqlen_k=None):
        self.left, self.right = causal_window(causal, window_size)
        self.q_start, self.k_start = q_start, k_start
        self.cu_seqlens_q, self.cu_seqlens_k = cu_seqlens_q, cu_seqlens_k
        if isinstance(cu_seqlens_q, tuple):  # the host form knows its longest documents
            max_seqlen_q = _longest(cu_seqlens_q) if max_seqlen_q is None else max_seqlen_q
            max_seqlen_k = _longest(cu_seqlens_k) if max_seqlen_k is None else max_seqlen_k
        self.max_seqlen_q, self.max_seqlen_k = max_seqlen_q, max_seqlen_k

    def _identity(self):
        return (self.left, self.right, self.q_start, self.k_start, self.cu_seqlens_q, self.cu_seqlens_k,
                self.max_seqlen_q, self.max_seqlen_k)

    def __eq__(self, other):
        if not isinstance(other, MaskSpec):
            return NotImplemented
        return all(a is b if torch.is_tensor(a) or torch.is_tensor(b) else a == b
                   for a, b in zip(self._identity(), other._identity()))

    def __hash__(self):
        return hash(tuple(id(f) if torch.is_tensor(f) else f for f in self._identity()))

    def __repr__(self):
        documents = f", cu_seqlens_q={self.cu_seqlens_q}, cu_seqlens_k={self.cu_seqlens_k}" if self.varlen else ""
        return f"MaskSpec(window={self.window}, q_start={self.q_start}, k_start={self.k_start}{documents})"

    @property
    def window(self):
        return self.left, self.right

    @property
    def varlen(self):
        return self.cu_seqlens_q is not None

    # ---- the planners' questions (host) ----
    def sees(self, q_first, q_last, k_first, k_last):
        """The rule on position ranges: (whether some query at positions [q_first, q_last] sees some
        key at [k_first, k_last], whether every one sees every one), by this mask's window: the
        ring planner's question."""
        left, right = self.window
        some = (right < 0 or k_first <= q_last + right) and (left < 0 or k_last >= q_first - left)
        every = (right < 0 or k_last <= q_first + right) and (left < 0 or k_first >= q_last - left)
        return some, some and every

    def visible_keys(self, q_first, q_last, num_keys):
        """[lo, hi): the keys among positions [0, num_keys) that some query in [q_first, q_last] sees
        (int64 tensors, one range per sequence; empty where lo >= hi): inference's question."""
        left, right = self.window
        hi = num_keys if right < 0 else torch.minimum(q_last + right + 1, num_keys)
        lo = torch.zeros_like(q_first) if left < 0 else (q_first - left).clamp(min=0)
        return lo, hi

    def at(self, q_start, k_start, every=False):
        """This mask's window for a query block and a key block whose first rows sit at positions
        ``q_start`` and ``k_start``; no window at all when ``every`` query sees every key (the
        kernels then skip the mask)."""
        return MaskSpec(window_size=(-1, -1) if every else self.window, q_start=q_start, k_start=k_start)

    def documents(self, q_starts, k_starts, cu_q, cu_k):
        """This mask's window over packed document segments (the host form: tuples of ints)."""
        return MaskSpec(window_size=self.window, q_start=tuple(q_starts), k_start=tuple(k_starts),
                        cu_seqlens_q=tuple(cu_q), cu_seqlens_k=tuple(cu_k))

    def on(self, device):
        """This mask with its document fields as int32 tensors on ``device`` (made once per device)."""
        if not isinstance(self.cu_seqlens_q, tuple):
            return self
        return _on_device(self, torch.device(device))

    # ---- what the kernels read ----
    def num_seqs(self, batch):
        return len(self.cu_seqlens_q) - 1 if self.varlen else batch

    def lengths(self, seqlen_q, seqlen_k):
        """(longest query sequence, longest key sequence)."""
        if self.varlen:
            return self.max_seqlen_q, self.max_seqlen_k
        return seqlen_q, seqlen_k

    def kernel_args(self, like):
        """(CuSeqlensQ, CuSeqlensK, PosQ, PosK, q_start, k_start, window_left, window_right)."""
        if self.varlen:
            mask = self.on(like.device)
            return (mask.cu_seqlens_q, mask.cu_seqlens_k, mask.q_start, mask.k_start, 0, 0,
                    max(self.left, 0), max(self.right, 0))
        return like, like, like, like, int(self.q_start), int(self.k_start), max(self.left, 0), max(self.right, 0)

    def constants(self):
        """The constexprs of the rule: packed documents, and which sides of the window are bounded."""
        return {"VARLEN": self.varlen, "LEFT": self.left >= 0, "RIGHT": self.right >= 0}


def _longest(bounds):
    return max((b - a for a, b in zip(bounds, bounds[1:])), default=0)


@functools.lru_cache(maxsize=4096)
def _on_device(mask, device):
    def tensor(values):
        return torch.tensor(values, dtype=torch.int32, device=device)
    return MaskSpec(window_size=mask.window, q_start=tensor(mask.q_start), k_start=tensor(mask.k_start),
                    cu_seqlens_q=tensor(mask.cu_seqlens_q), cu_seqlens_k=tensor(mask.cu_seqlens_k),
                    max_seqlen_q=mask.max_seqlen_q, max_seqlen_k=mask.max_seqlen_k)


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
