"""Ring and zigzag-ring attention: KV chunks travel round the ring group.

Every rank keeps its queries and, at step s, holds the keys/values of ring
rank (ring_index - s) mod R. Computation and communication are separate:

* ``plan_step`` (pure): the kernel calls one step needs, from the global
  positions of the local query chunks and of the visiting kv chunks. Pairs
  whose keys are all in the future are skipped; when every remaining pair is
  fully visible and they form one rectangle of the local buffers, one
  non-causal call covers it. Otherwise each pair is a call at its true
  positions (the kernel skips invisible blocks). No special-case masks: ring
  and zigzag differ only in the chunk positions ``Layout.ring_chunks`` gives.
  With zigzag shards, steps other than the first are one half-size call on
  every rank: kv from an earlier rank is seen by both query chunks through its
  early chunk only; kv from a later rank by the late query chunk only.
* ``forward_step`` / ``backward_step``: run a plan's calls, accumulating into
  fp32 buffers (fused LSE merge in the forward kernel).
* ``ring_forward`` / ``ring_backward``: the loops with P2P double buffering:
  the transfer for step s+1 is posted before step s's kernels, waited after.
  The backward uses the final out and lse; dk/dv accumulate in fp32 buffers
  that travel with their kv and arrive back at the owner after R hops; dq
  stays local.
* ``simulate_ring_attention`` / ``simulate_ring_attention_backward``: one
  process plays every rank, running the same ``plan_step`` and step functions
  (for tests of many shapes and for benchmarks on one device).
"""
from dataclasses import dataclass

import torch

from cpattn.kernels import attention_backward, attention_backward_delta, attention_forward

from ._checks import check_qkv
from .attention import _kernel_dtype
from .layout import Layout

KV_TAG, DKV_TAG = 0, 1  # distinct tags keep the two streams of messages apart on gloo


@dataclass(frozen=True)
class KernelCall:
    """One kernel call of a ring step: rows [q_lo, q_hi) of the local queries
    against rows [k_lo, k_hi) of the visiting kv, whose first rows sit at
    global positions q_start and k_start."""
    q_lo: int
    q_hi: int
    k_lo: int
    k_hi: int
    q_start: int
    k_start: int
    causal: bool


def _with_offsets(chunks):
    """[(global start, length)] -> [(global start, length, local offset)]."""
    offset, result = 0, []
    for start, length in chunks:
        result.append((start, length, offset))
        offset += length
    return result


def plan_step(q_chunks, kv_chunks, causal):
    """Kernel calls for local query chunks against visiting kv chunks.

    Chunks are [(global start, length)] in local buffer order (``Layout.ring_chunks``).
    """
    q_chunks, kv_chunks = _with_offsets(q_chunks), _with_offsets(kv_chunks)
    pairs = []  # (q chunk index, kv chunk index, every key visible to every query)
    for qi, (q_start, q_len, _) in enumerate(q_chunks):
        for ki, (k_start, k_len, _) in enumerate(kv_chunks):
            if causal and k_start > q_start + q_len - 1:
                continue  # the first key is after the last query: nothing visible
            pairs.append((qi, ki, not causal or k_start + k_len - 1 <= q_start))
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
                           q_first[0], k_first[0], False)]
    calls = []
    for qi, ki, full in pairs:
        q_start, q_len, q_off = q_chunks[qi]
        k_start, k_len, k_off = kv_chunks[ki]
        calls.append(KernelCall(q_off, q_off + q_len, k_off, k_off + k_len, q_start, k_start, not full))
    return calls


def forward_step(q, k, v, calls, out, lse, softmax_scale):
    """Merge this step's partials into the running ``out`` (fp32) and ``lse``."""
    for c in calls:
        attention_forward(q[:, c.q_lo:c.q_hi], k[:, c.k_lo:c.k_hi], v[:, c.k_lo:c.k_hi], softmax_scale,
                          c.causal, c.q_start, c.k_start, out=out[:, c.q_lo:c.q_hi], lse=lse[:, :, c.q_lo:c.q_hi],
                          accumulate=True)


def backward_step(dout, q, k, v, out, lse, delta, calls, dq, dk, dv, softmax_scale):
    """Add this step's gradients into ``dq`` (local queries) and ``dk``/``dv`` (visiting kv).

    ``delta`` is ``attention_backward_delta(out, dout)`` of the local queries, computed once.
    """
    for c in calls:
        qs, ks = slice(c.q_lo, c.q_hi), slice(c.k_lo, c.k_hi)
        attention_backward(dout[:, qs], q[:, qs], k[:, ks], v[:, ks], out[:, qs], lse[:, :, qs], softmax_scale,
                           c.causal, c.q_start, c.k_start, delta=delta[:, :, qs],
                           dq=dq[:, qs], dk=dk[:, ks], dv=dv[:, ks], accumulate=True)


def _empty_result(q):
    batch, seqlen, heads, _ = q.shape
    out = torch.zeros(q.shape, dtype=torch.float32, device=q.device)
    lse = torch.full((batch, heads, seqlen), float("-inf"), dtype=torch.float32, device=q.device)
    return out, lse


def ring_forward(q, k, v, layout, ring_index, comm, causal, softmax_scale):
    """Forward over the ring; q, k, v hold this ring rank's whole piece.

    Returns (out fp32, lse). ``comm`` is a ``RingComm`` (None when ring_degree is 1).
    """
    ring_degree, piece_len = layout.ring_degree, q.shape[1]
    q_chunks = layout.ring_chunks(ring_index, piece_len)
    out, lse = _empty_result(q)
    kv = torch.stack((k, v))  # one message per step; a copy, so the inputs are never written
    spare = torch.empty_like(kv) if ring_degree > 1 else None
    for step in range(ring_degree):
        kv_index = (ring_index - step) % ring_degree
        incoming = comm.exchange(kv, spare, KV_TAG) if step + 1 < ring_degree else None
        calls = plan_step(q_chunks, layout.ring_chunks(kv_index, piece_len), causal)
        forward_step(q, kv[0], kv[1], calls, out, lse, softmax_scale)
        if incoming is not None:
            incoming.wait()
            kv, spare = spare, kv
    return out, lse


def ring_backward(dout, q, k, v, out, lse, layout, ring_index, comm, causal, softmax_scale):
    """Gradients (fp32 dq, dk, dv) of ``ring_forward`` from the final out and lse."""
    ring_degree, piece_len = layout.ring_degree, q.shape[1]
    q_chunks = layout.ring_chunks(ring_index, piece_len)
    delta = attention_backward_delta(out, dout)
    dq = torch.zeros(q.shape, dtype=torch.float32, device=q.device)
    kv = torch.stack((k, v))
    spare = torch.empty_like(kv) if ring_degree > 1 else None
    dkv_in = torch.empty(kv.shape, dtype=torch.float32, device=kv.device) if ring_degree > 1 else None
    dkv_pending = None
    for step in range(ring_degree):
        kv_index = (ring_index - step) % ring_degree
        kv_pending = comm.exchange(kv, spare, KV_TAG) if step + 1 < ring_degree else None
        # This rank's share of the visiting kv's gradient goes to a fresh buffer, so the
        # kernels need not wait for the gradient accumulated upstream (it is in flight).
        dkv = torch.zeros(kv.shape, dtype=torch.float32, device=kv.device)
        calls = plan_step(q_chunks, layout.ring_chunks(kv_index, piece_len), causal)
        backward_step(dout, q, kv[0], kv[1], out, lse, delta, calls, dq, dkv[0], dkv[1], softmax_scale)
        if dkv_pending is not None:
            dkv_pending.wait()
            dkv += dkv_in
        if kv_pending is not None:
            kv_pending.wait()
            kv, spare = spare, kv
        if ring_degree > 1:
            # After R hops (the last one after the last step) dkv is back with its owner.
            dkv_pending = comm.exchange(dkv, dkv_in, DKV_TAG)
    if dkv_pending is not None:
        dkv_pending.wait()
        dkv = dkv_in
    return dq, dkv[0], dkv[1]


class RingAttentionFunction(torch.autograd.Function):
    """out = attention over the ring, differentiable in q, k, v (flash layout, local pieces)."""

    @staticmethod
    def forward(ctx, q, k, v, layout, ring_index, comm, causal, softmax_scale):
        dtype = _kernel_dtype(q)
        qc, kc, vc = (t.to(dtype) for t in (q, k, v))
        out, lse = ring_forward(qc, kc, vc, layout, ring_index, comm, causal, softmax_scale)
        out = out.to(dtype)
        ctx.save_for_backward(qc, kc, vc, out, lse)
        ctx.args = (layout, ring_index, comm, causal, softmax_scale)
        return out.to(q.dtype)

    @staticmethod
    def backward(ctx, dout):
        q, k, v, out, lse = ctx.saved_tensors
        dq, dk, dv = ring_backward(dout.to(q.dtype), q, k, v, out, lse, *ctx.args)
        return dq.to(dout.dtype), dk.to(dout.dtype), dv.to(dout.dtype), None, None, None, None, None


# ----------------------------------------------------------------------------- simulation

def ring_schedule(seq_len, ring_degree, ring_impl, causal):
    """schedule[ring_index][step] = (kv ring index, [KernelCall]) for a ring of full length ``seq_len``.

    Exactly what each rank of ``ring_forward``/``ring_backward`` computes at
    each step; benchmarks can replay it on one device.
    """
    layout = Layout(ring_degree, 1, ring_impl)
    layout.check_seq_len(seq_len, "ring_schedule")
    piece_len = seq_len // ring_degree
    schedule = []
    for ring_index in range(ring_degree):
        q_chunks = layout.ring_chunks(ring_index, piece_len)
        steps = []
        for step in range(ring_degree):
            kv_index = (ring_index - step) % ring_degree
            steps.append((kv_index, plan_step(q_chunks, layout.ring_chunks(kv_index, piece_len), causal)))
        schedule.append(steps)
    return schedule


def _simulation_inputs(q, k, v, ring_degree, ring_impl, causal, where):
    _, seqlen_q, seqlen_k, *_ = check_qkv(q, k, v, where)
    if seqlen_q != seqlen_k:
        raise ValueError(f"{where}: q and k/v must have the same sequence length, got {seqlen_q} and {seqlen_k}")
    layout = Layout(ring_degree, 1, ring_impl)
    layout.check_seq_len(seqlen_q, where)
    positions = [layout.positions(seqlen_q, r).to(q.device) for r in range(ring_degree)]
    return ring_schedule(seqlen_q, ring_degree, ring_impl, causal), positions


def simulate_ring_attention(q, k, v, ring_degree, ring_impl="zigzag", causal=False, softmax_scale=None):
    """Ring attention with one process playing all ``ring_degree`` ranks.

    q (B, S, H, D), k and v (B, S, Hkv, D): full sequences in natural order.
    Each simulated rank takes its shard (``Layout``) and runs, step by step,
    the same ``plan_step`` + ``forward_step`` as ``ring_forward``, with the kv
    shard it would hold at that step. Returns (out in q's dtype, lse fp32
    (B, H, S)) in natural order, equal to single-device attention.
    """
    schedule, positions = _simulation_inputs(q, k, v, ring_degree, ring_impl, causal, "simulate_ring_attention")
    result_dtype, dtype = q.dtype, _kernel_dtype(q)
    q, k, v = (t.to(dtype) for t in (q, k, v))
    out_full, lse_full = _empty_result(q)
    for ring_index, steps in enumerate(schedule):
        pos = positions[ring_index]
        q_local = q[:, pos]
        out, lse = _empty_result(q_local)
        for kv_index, calls in steps:
            kv_pos = positions[kv_index]
            forward_step(q_local, k[:, kv_pos], v[:, kv_pos], calls, out, lse, softmax_scale)
        out_full[:, pos], lse_full[:, :, pos] = out, lse
    return out_full.to(result_dtype), lse_full


def simulate_ring_attention_backward(dout, q, k, v, out, lse, ring_degree, ring_impl="zigzag", causal=False,
                                     softmax_scale=None):
    """Gradients (dq, dk, dv) of ``simulate_ring_attention``, one process playing all ranks.

    Full tensors in natural order; ``out``/``lse`` are the final forward
    results. Each simulated rank runs the same ``plan_step`` + ``backward_step``
    as ``ring_backward``; the dk/dv a rank computes for a visiting kv shard are
    added straight into that shard's owner's buffer (the distributed path
    carries them round the ring instead).
    """
    schedule, positions = _simulation_inputs(q, k, v, ring_degree, ring_impl, causal,
                                             "simulate_ring_attention_backward")
    result_dtype, dtype = q.dtype, _kernel_dtype(q)
    q, k, v, out, dout = (t.to(dtype) for t in (q, k, v, out, dout))
    dq_full = torch.zeros(q.shape, dtype=torch.float32, device=q.device)
    dk_owned = [torch.zeros((k.shape[0], len(p), *k.shape[2:]), dtype=torch.float32, device=k.device)
                for p in positions]
    dv_owned = [torch.zeros_like(t) for t in dk_owned]
    for ring_index, steps in enumerate(schedule):
        pos = positions[ring_index]
        q_local, out_local, dout_local, lse_local = q[:, pos], out[:, pos], dout[:, pos], lse[:, :, pos]
        delta = attention_backward_delta(out_local, dout_local)
        dq = torch.zeros(q_local.shape, dtype=torch.float32, device=q.device)
        for kv_index, calls in steps:
            kv_pos = positions[kv_index]
            backward_step(dout_local, q_local, k[:, kv_pos], v[:, kv_pos], out_local, lse_local, delta, calls,
                          dq, dk_owned[kv_index], dv_owned[kv_index], softmax_scale)
        dq_full[:, pos] = dq
    dk_full = torch.zeros(k.shape, dtype=torch.float32, device=k.device)
    dv_full = torch.zeros_like(dk_full)
    for pos, dk, dv in zip(positions, dk_owned, dv_owned):
        dk_full[:, pos], dv_full[:, pos] = dk, dv
    return dq_full.to(result_dtype), dk_full.to(result_dtype), dv_full.to(result_dtype)
