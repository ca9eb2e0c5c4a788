"""Ring and zigzag-ring attention: KV chunks travel round the ring group.

Every rank keeps its queries and, at step s, holds the keys/values of ring
rank (ring_index - s) mod R. Computation and communication are separate:

* ``plan_step`` (pure): the kernel calls one step needs, from the global
  positions of the local query chunks and of the visiting kv chunks and the
  attention's one ``MaskSpec``, which it cuts into each call's. Pairs
  whose keys are all in the future are skipped; when every remaining pair is
  fully visible and they form one rectangle of the local buffers, one
  non-causal call covers it. Otherwise each pair is a call at its true
  positions (the kernel skips invisible blocks). No special-case masks: ring
  and zigzag differ only in the chunk positions ``Layout.ring_chunks`` gives.
  With zigzag shards, steps other than the first are one half-size call on
  every rank: kv from an earlier rank is seen by both query chunks through its
  early chunk only; kv from a later rank by the late query chunk only.
* ``ring_plan``: every step's calls of one ring rank, computed once per shape
  (cached), so a steady-state call does no planning.
* ``forward_step`` / ``backward_step``: run a plan's calls, accumulating into
  fp32 buffers (fused LSE merge in the forward kernel).
* ``ring_forward`` / ``ring_backward``: the loops with P2P double buffering:
  the transfer for step s+1 is posted before step s's kernels, waited after.
  A message carries only the rows of a piece later steps read
  (``travelling_rows``, from the plans of every rank).
  The backward uses the final out and lse; dk/dv accumulate in fp32 buffers
  that travel with their kv and arrive back at the owner after R hops; dq
  stays local. Each step passes a ``fault_point`` (see faults.py).
* ``simulate_ring_attention`` / ``simulate_ring_attention_backward``: one
  process plays every rank, running the same ``plan_step`` and step functions
  (for tests of many shapes and for benchmarks on one device).
"""
import bisect
import functools
import math
from dataclasses import dataclass

import torch

from cpattn.kernels import MaskSpec, attention_backward, attention_backward_delta, attention_forward

from .checks import check_cu_seqlens, check_qkv
from .ops import kernel_dtype
from .faults import fault_point
from .partials import empty_partial, merge_sinks, sinks_grad
from .layout import Layout

KV_TAG, DKV_TAG = 0, 1  # distinct tags keep the two streams of messages apart on gloo


@dataclass(frozen=True)
class KernelCall:
    """One kernel call of a ring step: rows [q_lo, q_hi) of the local queries
    against rows [k_lo, k_hi) of the visiting kv, under ``mask``: the attention's
    mask cut to this block (``MaskSpec.at``: the positions of its first query row
    and key column, no window when every query sees every key), or, for packed
    documents, over the block's document segments (``MaskSpec.documents``: their
    bounds relative to q_lo/k_lo and each segment's first positions inside its
    document)."""
    q_lo: int
    q_hi: int
    k_lo: int
    k_hi: int
    mask: MaskSpec


def _with_offsets(chunks):
    """[(global start, length)] -> [(global start, length, local offset)]."""
    offset, result = 0, []
    for start, length in chunks:
        result.append((start, length, offset))
        offset += length
    return result


def _shared_documents(packing, q_start, q_len, k_start, k_len):
    """[(document start, q start, q end, k start, k end)]: the parts of two position ranges in each
    document both touch (``packing``, a cu_seqlens tuple). Two disjoint ranges share at most one."""
    def first_last(start, length):  # the documents holding a range's first and last token
        return bisect.bisect_right(packing, start) - 1, bisect.bisect_right(packing, start + length - 1) - 1
    (q_first, q_last), (k_first, k_last) = first_last(q_start, q_len), first_last(k_start, k_len)
    shared = []
    for d in range(max(q_first, k_first), min(q_last, k_last) + 1):
        lo, hi = packing[d], packing[d + 1]
        qa, qb, ka, kb = max(q_start, lo), min(q_start + q_len, hi), max(k_start, lo), min(k_start + k_len, hi)
        if qa < qb and ka < kb:
            shared.append((lo, qa, qb, ka, kb))
    return shared


def _document_calls(q_chunk, kv_chunk, mask, packing):
    """The calls of one chunk pair under ``packing``: one per shared document segment with a
    visible pair (``_merge_diagonal`` joins those that tile contiguous rows into varlen calls)."""
    (q_start, q_len, q_off), (k_start, k_len, k_off) = q_chunk, kv_chunk
    segments = []
    for doc, qa, qb, ka, kb in _shared_documents(packing, q_start, q_len, k_start, k_len):
        some, every = mask.sees(qa - doc, qb - 1 - doc, ka - doc, kb - 1 - doc)
        if some:
            segments.append(KernelCall(q_off + qa - q_start, q_off + qb - q_start, k_off + ka - k_start,
                                       k_off + kb - k_start, mask.at(qa - doc, ka - doc, every)))
    return segments


def _merge_diagonal(calls, mask):
    """Calls whose rows follow one another in q and in kv alike (every document held whole, against
    itself: the whole first step) as one varlen call each run; a segment that saw every key under no
    window sees the same keys under ``mask``'s, so one mask serves the run."""
    merged, run = [], []

    def close_run():
        if len(run) == 1:
            merged.append(run[0])
        elif run:
            segments = [seg for call in run for seg in _segments(call)]
            q_lo, k_lo = segments[0][0], segments[0][2]
            merged.append(KernelCall(q_lo, segments[-1][1], k_lo, segments[-1][3],
                                     mask.documents((seg[4] for seg in segments), (seg[5] for seg in segments),
                                                    (0, *(seg[1] - q_lo for seg in segments)),
                                                    (0, *(seg[3] - k_lo for seg in segments)))))
        run.clear()
    for call in sorted(calls, key=lambda c: (c.q_lo, c.k_lo)):
        if run and not (run[-1].q_hi == call.q_lo and run[-1].k_hi == call.k_lo):
            close_run()
        run.append(call)
    close_run()
    return merged


def _segments(call):
    """[(q_lo, q_hi, k_lo, k_hi, q_start, k_start)] of a call, one per document segment."""
    mask = call.mask
    if not mask.varlen:
        return [(call.q_lo, call.q_hi, call.k_lo, call.k_hi, mask.q_start, mask.k_start)]
    cu_q, cu_k = mask.cu_seqlens_q, mask.cu_seqlens_k
    return [(call.q_lo + qa, call.q_lo + qb, call.k_lo + ka, call.k_lo + kb, qs, ks)
            for qa, qb, ka, kb, qs, ks in zip(cu_q, cu_q[1:], cu_k, cu_k[1:], mask.q_start, mask.k_start)]


def _packed_calls(q_chunks, kv_chunks, mask, packing):
    """``plan_step`` under packed documents: each query chunk meets only the kv chunks that share one of
    its documents (found through an index by document, so many chunks cost no quadratic scan)."""
    def documents(start, length):
        return range(bisect.bisect_right(packing, start) - 1, bisect.bisect_right(packing, start + length - 1))
    by_document = {}
    for index, (start, length, _) in enumerate(kv_chunks):
        if length:
            for doc in documents(start, length):
                by_document.setdefault(doc, []).append(index)
    calls = []
    for q_chunk in q_chunks:
        if q_chunk[1]:
            met = sorted({index for doc in documents(*q_chunk[:2]) for index in by_document.get(doc, ())})
            calls += [call for index in met for call in _document_calls(q_chunk, kv_chunks[index], mask, packing)]
    return _merge_diagonal(calls, mask)


def plan_step(q_chunks, kv_chunks, mask, packing=None):
    """Kernel calls for local query chunks against visiting kv chunks.

    Chunks are [(global start, length)] in local buffer order (``Layout.ring_chunks``).
    ``mask``: the whole attention's ``MaskSpec`` (its window; the chunks' starts are
    positions): pairs of chunks with no visible (query, key) pair make no call. ``packing``
    (packed documents, a cu_seqlens tuple): only tokens of one document meet,
    at their positions inside it; pairs that share no document make no call, and calls that
    tile contiguous rows (documents held whole, at the first step) are one varlen call.
    """
    q_chunks, kv_chunks = _with_offsets(q_chunks), _with_offsets(kv_chunks)
    if packing is not None:
        return _packed_calls(q_chunks, kv_chunks, mask, packing)
    pairs = []  # (q chunk index, kv chunk index, every key visible to every query)
    for qi, (q_start, q_len, _) in enumerate(q_chunks):
        for ki, (k_start, k_len, _) in enumerate(kv_chunks):
            if not q_len or not k_len:  # an empty chunk (a sequence shorter than 2R)
                continue
            some, every = mask.sees(q_start, q_start + q_len - 1, k_start, k_start + k_len - 1)
            if some:
                pairs.append((qi, ki, every))
    if not pairs:
        return []
    q_ids = sorted({qi for qi, _, _ in pairs})
    k_ids = sorted({ki for _, ki, _ in pairs})
    rectangle = (len(pairs) == len(q_ids) * len(k_ids) and q_ids == list(range(q_ids[0], q_ids[-1] + 1))
                 and k_ids == list(range(k_ids[0], k_ids[-1] + 1)))
    if rectangle and all(full for _, _, full in pairs):
        q_first, q_last = q_chunks[q_ids[0]], q_chunks[q_ids[-1]]
        k_first, k_last = kv_chunks[k_ids[0]], kv_chunks[k_ids[-1]]
        return [KernelCall(q_first[2], q_last[2] + q_last[1], k_first[2], k_last[2] + k_last[1],
                           mask.at(q_first[0], k_first[0], every=True))]
    calls = []
    for qi, ki, full in pairs:
        q_start, q_len, q_off = q_chunks[qi]
        k_start, k_len, k_off = kv_chunks[ki]
        calls.append(KernelCall(q_off, q_off + q_len, k_off, k_off + k_len, mask.at(q_start, k_start, full)))
    return calls


@functools.lru_cache(maxsize=256)
def _ring_steps(layout, seq_len, mask, packing=None, cut=None):
    """Every ring rank's steps (``ring_plan``), computed together: the plan's length and the rows that
    travel (``travelling_rows``) depend on every rank's calls."""
    cut = mask.left if cut is None else cut

    def chunks(index, offset):
        return [(start + offset, length) for start, length in layout.ring_chunks(index, seq_len, packing, cut)]
    ring_degree = layout.ring_degree
    steps = [[((rank - step) % ring_degree,
               tuple(plan_step(chunks(rank, mask.q_start), chunks((rank - step) % ring_degree, mask.k_start),
                               mask, packing)))
              for step in range(ring_degree)] for rank in range(ring_degree)]
    needed = max(max((step for step, (_, calls) in enumerate(rank_steps) if calls), default=0)
                 for rank_steps in steps) + 1
    return tuple(tuple(rank_steps[:needed]) for rank_steps in steps)


def ring_plan(layout, ring_index, seq_len, mask, packing=None, cut=None):
    """((kv ring index, (KernelCall, ...)), ...): ring rank ``ring_index``'s steps, computed once per shape.

    ``seq_len``: the full sequence's length; ``mask``: the whole attention's ``MaskSpec`` at
    global positions (its ``q_start``/``k_start``: where the sequence starts). The
    plan stops after the last step in which any ring rank has a call (the same
    on every rank), so a window shorter than the sequence also saves the kv
    transfers of the steps nobody needs. ``packing``: packed documents (``plan_step``), whose shards
    were cut for a window of left side ``cut`` (``Layout.ring_chunks``; None: the attention's own,
    ``mask.left``). Any mask is exact on shards cut for another window, only less balanced. The calls' kv rows
    are rows of the visiting rank's whole piece (``travelling_rows`` says which of them travel).
    """
    return _ring_steps(layout, seq_len, mask, packing, cut)[ring_index]


@functools.lru_cache(maxsize=256)
def travelling_rows(layout, seq_len, mask, packing=None, cut=None):
    """Per ring rank, (lo, hi): the rows of its piece that some rank's call reads after the first step, so
    the only ones its kv messages need carry ((0, 0): none). A window, or packed documents held whole
    (the dispatch puts the rows other ranks need last), leave the rest at home."""
    spans = [[None, None] for _ in range(layout.ring_degree)]
    for rank_steps in _ring_steps(layout, seq_len, mask, packing, cut):
        for kv_index, calls in rank_steps[1:]:
            for call in calls:
                lo, hi = spans[kv_index]
                spans[kv_index] = [call.k_lo if lo is None else min(lo, call.k_lo),
                                   call.k_hi if hi is None else max(hi, call.k_hi)]
    spans = [(0, 0) if lo is None else (lo, hi) for lo, hi in spans]
    longest = max(hi - lo for lo, hi in spans)
    cut = mask.left if cut is None else cut
    pieces = [layout.piece_length(r, seq_len, packing, cut) for r in range(layout.ring_degree)]
    # A piece no longer than the longest message travels whole: the same bytes, no copy to pad, and its
    # first step's dk/dv can start in the buffer that travels.
    return tuple((0, piece) if piece <= longest else span for span, piece in zip(spans, pieces))


def _row_range(t, lo, hi, dim=1):
    """Rows [lo, hi) of ``t`` along ``dim``; ``t`` itself when that is all of it (no view to build)."""
    return t if lo == 0 and hi == t.shape[dim] else t.narrow(dim, lo, hi - lo)


def _cached_row_ranges():
    """A ``_row_range`` that builds each view once: a ring call meets the same ranges of the same tensors at
    every step (host time: a view costs more than a dict lookup)."""
    made = {}

    def row_range(t, lo, hi, dim=1):
        key = (id(t), lo, hi)
        view = made.get(key)
        if view is None:
            view = made[key] = _row_range(t, lo, hi, dim)
        return view
    return row_range


def forward_step(q, k, v, calls, out, lse, softmax_scale, softcap=0.0, rows=_row_range, kv_offset=0):
    """Merge this step's partials into the running ``out`` (fp32) and ``lse``. ``kv_offset``: the row of
    the visiting piece that ``k``/``v``'s first row is (a message carries only ``travelling_rows``)."""
    for c in calls:
        k_lo, k_hi = c.k_lo - kv_offset, c.k_hi - kv_offset
        attention_forward(rows(q, c.q_lo, c.q_hi), rows(k, k_lo, k_hi), rows(v, k_lo, k_hi),
                          softmax_scale=softmax_scale, mask=c.mask, softcap=softcap,
                          out=rows(out, c.q_lo, c.q_hi), lse=rows(lse, c.q_lo, c.q_hi, 2), accumulate=True)


def backward_step(dout, q, k, v, out, lse, delta, calls, dq, dk, dv, softmax_scale, softcap=0.0,
                  compute_dq=True, compute_dkdv=True, rows=_row_range, lse_log2=None, kv_offset=0):
    """Add this step's gradients into ``dq`` (local queries) and ``dk``/``dv`` (visiting kv).

    ``delta, lse_log2`` are ``attention_backward_delta(out, dout, lse)`` of the local queries,
    computed once (without ``lse_log2`` every call converts its rows of ``lse``).
    ``compute_dq``/``compute_dkdv=False`` skip that kernel (its buffers may then be None).
    ``rows(t, lo, hi, dim=1)``: rows [lo, hi) of ``t`` (``_row_range``, or a cached one).
    ``kv_offset``: as ``forward_step``'s, for k, v, dk and dv alike.
    """
    for c in calls:
        q_lo, q_hi, k_lo, k_hi = c.q_lo, c.q_hi, c.k_lo - kv_offset, c.k_hi - kv_offset
        attention_backward(rows(dout, q_lo, q_hi), rows(q, q_lo, q_hi), rows(k, k_lo, k_hi),
                           rows(v, k_lo, k_hi), rows(out, q_lo, q_hi), rows(lse, q_lo, q_hi, 2),
                           softmax_scale=softmax_scale, mask=c.mask, softcap=softcap,
                           delta=rows(delta, q_lo, q_hi, 2), dq=rows(dq, q_lo, q_hi) if compute_dq else None,
                           dk=rows(dk, k_lo, k_hi) if compute_dkdv else None,
                           dv=rows(dv, k_lo, k_hi) if compute_dkdv else None, accumulate=True,
                           compute_dq=compute_dq, compute_dkdv=compute_dkdv,
                           lse_log2=None if lse_log2 is None else rows(lse_log2, q_lo, q_hi, 2))


def _padded(t, length):
    """``t`` (B, S, H, D) with zero rows appended up to ``length``: ring ranks may hold pieces one or
    two tokens apart (uneven lengths), and every message of a ring has the longest piece's shape.
    The padding rows are never read: the plan's calls stop at each piece's true end."""
    if t.shape[1] == length:
        return t
    padded = t.new_zeros((t.shape[0], length, *t.shape[2:]))
    padded[:, :t.shape[1]] = t
    return padded


def _longest_span(travelling):
    """The rows of the longest ring message: every message has one shape (the ring's pieces may differ)."""
    return max(hi - lo for lo, hi in travelling)


def _pair_buffer(shape_a, shape_b, dtype, device, zero=False):
    """One flat buffer holding a tensor of ``shape_a`` and one of ``shape_b`` back to back, and those
    two as contiguous views of it: k and v (or their fp32 gradients) travel as one message, each
    with its own head dim (MLA: 192 and 128)."""
    size_a = math.prod(shape_a)
    buffer = (torch.zeros if zero else torch.empty)(size_a + math.prod(shape_b), dtype=dtype, device=device)
    return buffer, (buffer[:size_a].view(shape_a), buffer[size_a:].view(shape_b))


class _KVRotation:
    """The kv chunks a ring call visits, and what it sends at each step.

    Step 0 sends this rank's travelling k and v rows (``travelling_rows``, padded to the longest
    rank's) as two messages (no stacked copy when they are the caller's whole k and v: those are never
    written) into the two parts of one receive buffer (``_pair_buffer``); later steps send that buffer
    as one message. Two receive buffers take turns.
    """

    def __init__(self, k, v, comm):
        self.comm, self.kv, self._message = comm, (k, v), (k, v)
        self._buffers, self._halves = [], []

    @classmethod
    def of_rows(cls, k, v, rows, length, comm):
        """The rotation of rows [lo, hi) of ``k`` and ``v``, padded to ``length`` rows."""
        lo, hi = rows
        return cls(*(_padded(_row_range(t, lo, hi), length).contiguous() for t in (k, v)), comm)

    def post(self, step, tag):
        """Post the transfer that brings the next step's kv; returns what to wait for."""
        if len(self._buffers) < 2:
            k, v = self._message if step == 0 else self.kv
            buffer, halves = _pair_buffer(k.shape, v.shape, k.dtype, k.device)
            self._buffers.append(buffer)
            self._halves.append(halves)
        incoming = step % 2
        recv = self._halves[incoming] if step == 0 else (self._buffers[incoming],)
        self._next = incoming
        return self.comm.exchange(self._message, recv, tag)

    def advance(self, pending, on_cpu):
        """Wait for ``post``'s transfer; the kv now visiting is what arrived."""
        self.comm.wait(pending, on_cpu)
        self.kv, self._message = self._halves[self._next], (self._buffers[self._next],)


def ring_forward(q, k, v, layout, seq_len, ring_index, comm, mask, softmax_scale, softcap=0.0, sinks=None,
                 packing=None, cut=None):
    """Forward over the ring; q, k, v hold this ring rank's whole piece of a ``seq_len`` sequence
    (packed documents ``packing``, a cu_seqlens tuple, or None, in shards cut for ``cut``: ``ring_plan``).

    Returns (out fp32, lse). ``comm`` is a ``RingComm`` (None when ring_degree is 1).
    ``mask``: the attention's ``MaskSpec`` at global positions; ``sinks`` (H,) are
    merged once, after the last step.
    """
    plan = ring_plan(layout, ring_index, seq_len, mask, packing, cut)
    out, lse = empty_partial(q, v.shape[-1])
    kv, travelling = None, travelling_rows(layout, seq_len, mask, packing, cut)
    if comm is not None:
        kv = _KVRotation.of_rows(k, v, travelling[ring_index], _longest_span(travelling), comm)
    on_cpu, rows = q.device.type == "cpu", _cached_row_ranges()
    for step, (kv_index, calls) in enumerate(plan):
        pending = kv.post(step, KV_TAG) if step + 1 < len(plan) else None
        fault_point("ring forward", step)
        visiting, kv_offset = ((k, v), 0) if step == 0 else (kv.kv, travelling[kv_index][0])
        forward_step(q, *visiting, calls, out, lse, softmax_scale, softcap, rows, kv_offset)
        if pending is not None:
            kv.advance(pending, on_cpu)
    if sinks is not None:
        merge_sinks(out, lse, sinks)
    return out, lse


def ring_backward(dout, q, k, v, out, lse, layout, seq_len, ring_index, comm, mask, softmax_scale, softcap=0.0,
                  sinks=None, packing=None, cut=None):
    """Gradients (fp32 dq, dk, dv, and this rank's share of d sinks or None) of
    ``ring_forward`` from the final out and lse.

    The dk/dv of a kv chunk travel with it and reach its owner after R hops.
    Two fp32 dk/dv buffers take turns: while one is sent on, the other
    receives the gradient accumulated upstream for the kv chunk now visiting,
    and this rank's dk/dv kernels add to it once it is there. The dq kernels
    need nothing from upstream, so they run first, while it arrives; the kv
    transfer for the next step overlaps the whole step. When a window ends the
    plan early, the dk/dv still travel the rest of the ring (without kv) home.
    Only the rows that travel (``travelling_rows``) have travelling gradients; when
    that is not this rank's whole piece, its first step's dk/dv go to buffers of
    their own and the travelled rows are added to them on return.
    """
    plan = ring_plan(layout, ring_index, seq_len, mask, packing, cut)
    delta, lse_log2 = attention_backward_delta(out, dout, lse)
    dq = torch.zeros(q.shape, dtype=torch.float32, device=q.device)
    travelling, longest, kv, own = travelling_rows(layout, seq_len, mask, packing, cut), k.shape[1], None, None
    lo, hi = travelling[ring_index]
    if comm is not None:
        longest = _longest_span(travelling)
        kv = _KVRotation.of_rows(k, v, (lo, hi), longest, comm)
        if (lo, hi) != (0, k.shape[1]):
            own = [torch.zeros(t.shape, dtype=torch.float32, device=t.device) for t in (k, v)]
    # fp32 dk and dv of the visiting kv, each at its tensor's own head dim, back to back in one buffer.
    shapes = [(k.shape[0], longest, *t.shape[2:]) for t in (k, v)]
    # The second, which only ever receives whole messages, needs no zeros.
    buffers = [_pair_buffer(*shapes, torch.float32, k.device, zero=i == 0) for i in range(1 if comm is None else 2)]
    dkv, halves = [buffer for buffer, _ in buffers], [parts for _, parts in buffers]
    on_cpu, rows, current, dkv_pending = q.device.type == "cpu", _cached_row_ranges(), 0, None
    for step, (kv_index, calls) in enumerate(plan):
        kv_pending = kv.post(step, KV_TAG) if step + 1 < len(plan) else None
        fault_point("ring backward", step)
        if dkv_pending is None:  # the first step: this rank's own kv, nothing comes from upstream
            dk, dv = halves[current] if own is None else own
            backward_step(dout, q, k, v, out, lse, delta, calls, dq, dk, dv, softmax_scale, softcap, rows=rows,
                          lse_log2=lse_log2)
        else:
            (dk, dv), kv_offset = halves[current], travelling[kv_index][0]
            backward_step(dout, q, *kv.kv, out, lse, delta, calls, dq, None, None, softmax_scale, softcap,
                          compute_dkdv=False, rows=rows, lse_log2=lse_log2, kv_offset=kv_offset)
            comm.wait(dkv_pending, on_cpu)  # dkv[current] now holds the upstream gradient of the visiting kv
            backward_step(dout, q, *kv.kv, out, lse, delta, calls, None, dk, dv, softmax_scale, softcap,
                          compute_dq=False, rows=rows, lse_log2=lse_log2, kv_offset=kv_offset)
        if kv_pending is not None:
            kv.advance(kv_pending, on_cpu)
        if comm is not None:
            dkv_pending = comm.exchange((dkv[current],), (dkv[1 - current],), DKV_TAG)
            current = 1 - current
    for _ in range(layout.ring_degree - len(plan) if comm is not None else 0):  # the way home
        comm.wait(dkv_pending, on_cpu)
        dkv_pending = comm.exchange((dkv[current],), (dkv[1 - current],), DKV_TAG)
        current = 1 - current
    if dkv_pending is not None:
        comm.wait(dkv_pending, on_cpu)
    dsinks = sinks_grad(sinks, lse, delta) if sinks is not None else None
    if own is None:
        dk, dv = (_row_range(t, 0, k.shape[1]) for t in halves[current])
    else:  # the travelled rows are home: add them to the first step's
        for mine, travelled in zip(own, halves[current]):
            mine[:, lo:hi] += travelled[:, :hi - lo]
        dk, dv = own
    return dq, dk, dv, dsinks


# ----------------------------------------------------------------------------- simulation

def ring_schedule(seq_len, ring_degree, ring_impl, causal, offset=0, window_size=(-1, -1), packing=None):
    """schedule[ring_index][step] = (kv ring index, [KernelCall]) for a ring of full length ``seq_len``.

    Exactly what each rank of ``ring_forward``/``ring_backward`` computes at
    each step; benchmarks can replay it on one device. ``offset``: the global
    position of the first token; ``window_size`` as flash-attn's (steps whose kv no
    query of any rank sees are dropped from the end); ``packing``: packed documents (a cu_seqlens tuple).
    """
    layout = Layout(ring_degree, 1, ring_impl)
    layout.check_seq_len(seq_len, "ring_schedule")
    mask = MaskSpec(causal, window_size, q_start=offset, k_start=offset)
    return [[(kv_index, list(calls)) for kv_index, calls in ring_plan(layout, r, seq_len, mask, packing)]
            for r in range(ring_degree)]


def _simulation_inputs(q, k, v, ring_degree, ring_impl, causal, offset, window_size, cu_seqlens, where):
    batch, seqlen_q, seqlen_k, *_ = check_qkv(q, k, v, where, same_value_dim=False)
    if seqlen_q != seqlen_k:
        raise ValueError(f"{where}: q and k/v must have the same sequence length, got {seqlen_q} and {seqlen_k}")
    if isinstance(offset, bool) or not isinstance(offset, int) or offset < 0:
        raise ValueError(f"{where}: position_offset must be a non-negative int, got {offset!r}")
    layout = Layout(ring_degree, 1, ring_impl)
    layout.check_seq_len(seqlen_q, where)
    packing = None
    if cu_seqlens is not None:
        check_cu_seqlens(cu_seqlens, seqlen_q, seqlen_q, q.device, "cu_seqlens", where)
        if batch != 1 or offset:
            raise ValueError(f"{where}: packed documents (cu_seqlens) need batch 1 and position_offset 0")
        packing = tuple(cu_seqlens.tolist())
    # packed shards are cut for the window the attention uses (its left side, as ContextParallel.shard)
    positions = [layout.positions(seqlen_q, r, packing, window_size[0]).to(q.device) for r in range(ring_degree)]
    return ring_schedule(seqlen_q, ring_degree, ring_impl, causal, offset, window_size, packing), positions


def simulate_ring_attention(q, k, v, ring_degree, ring_impl="zigzag", causal=False, softmax_scale=None,
                            position_offset=0, window_size=(-1, -1), softcap=0.0, sinks=None, cu_seqlens=None):
    """Ring attention with one process playing all ``ring_degree`` ranks.

    q (B, S, H, D), k (B, S, Hkv, D) and v (B, S, Hkv, Dv): full sequences in natural order,
    whose first token sits at global position ``position_offset``.
    Each simulated rank takes its shard (``Layout``) and runs, step by step,
    the same ``plan_step`` + ``forward_step`` as ``ring_forward``, with the kv
    shard it would hold at that step. Returns (out in q's dtype, lse fp32
    (B, H, S)) in natural order, equal to single-device attention.
    ``window_size``, ``softcap`` and ``sinks`` as in ``flash_attn_func``. ``cu_seqlens``
    (int32, batch 1): packed documents, each attended separately, sharded as
    ``ContextParallel.shard(..., cu_seqlens=)`` does.
    """
    schedule, positions = _simulation_inputs(q, k, v, ring_degree, ring_impl, causal, position_offset,
                                             window_size, cu_seqlens, "simulate_ring_attention")
    result_dtype, dtype = q.dtype, kernel_dtype(q)
    q, k, v = (t.to(dtype) for t in (q, k, v))
    out_full, lse_full = empty_partial(q, v.shape[-1])
    for ring_index, steps in enumerate(schedule):
        pos = positions[ring_index]
        q_local = q[:, pos]
        out, lse = empty_partial(q_local, v.shape[-1])
        for kv_index, calls in steps:
            kv_pos = positions[kv_index]
            forward_step(q_local, k[:, kv_pos], v[:, kv_pos], calls, out, lse, softmax_scale, softcap)
        if sinks is not None:
            merge_sinks(out, lse, sinks)
        out_full[:, pos], lse_full[:, :, pos] = out, lse
    return out_full.to(result_dtype), lse_full


def simulate_ring_attention_backward(dout, q, k, v, out, lse, ring_degree, ring_impl="zigzag", causal=False,
                                     softmax_scale=None, position_offset=0, window_size=(-1, -1), softcap=0.0,
                                     cu_seqlens=None):
    """Gradients (dq, dk, dv) of ``simulate_ring_attention``, one process playing all ranks.

    Full tensors in natural order; ``out``/``lse`` are the final forward
    results. Each simulated rank runs the same ``plan_step`` + ``backward_step``
    as ``ring_backward``; the dk/dv a rank computes for a visiting kv shard are
    added straight into that shard's owner's buffer (the distributed path
    carries them round the ring instead).
    """
    schedule, positions = _simulation_inputs(q, k, v, ring_degree, ring_impl, causal, position_offset,
                                             window_size, cu_seqlens, "simulate_ring_attention_backward")
    result_dtype, dtype = q.dtype, kernel_dtype(q)
    q, k, v, out, dout = (t.to(dtype) for t in (q, k, v, out, dout))
    dq_full = torch.zeros(q.shape, dtype=torch.float32, device=q.device)
    dk_owned, dv_owned = ([torch.zeros((t.shape[0], len(p), *t.shape[2:]), dtype=torch.float32, device=t.device)
                           for p in positions] for t in (k, v))
    for ring_index, steps in enumerate(schedule):
        pos = positions[ring_index]
        q_local, out_local, dout_local, lse_local = q[:, pos], out[:, pos], dout[:, pos], lse[:, :, pos]
        delta, lse_log2 = attention_backward_delta(out_local, dout_local, lse_local)
        dq = torch.zeros(q_local.shape, dtype=torch.float32, device=q.device)
        for kv_index, calls in steps:
            kv_pos = positions[kv_index]
            backward_step(dout_local, q_local, k[:, kv_pos], v[:, kv_pos], out_local, lse_local, delta, calls,
                          dq, dk_owned[kv_index], dv_owned[kv_index], softmax_scale, softcap, lse_log2=lse_log2)
        dq_full[:, pos] = dq
    dk_full = torch.zeros(k.shape, dtype=torch.float32, device=k.device)
    dv_full = torch.zeros(v.shape, dtype=torch.float32, device=v.device)
    for pos, dk, dv in zip(positions, dk_owned, dv_owned):
        dk_full[:, pos], dv_full[:, pos] = dk, dv
    return dq_full.to(result_dtype), dk_full.to(result_dtype), dv_full.to(result_dtype)
