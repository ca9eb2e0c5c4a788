"""USP: Ulysses inside each Ulysses group, ring across the ring group, as one autograd Function.

Forward: one all-to-all turns this rank's sequence part of q, k and v into
its ring rank's whole piece for H/U heads (the shard order in ``layout.py``
makes it so), the ring runs over that piece with the global positions
``Layout.ring_chunks`` gives, and one all-to-all turns the output back (a
second, small one the lse when asked). Backward mirrors it: one all-to-all for
dout, the ring backward, one all-to-all for dq, dk and dv together.
Pure ring (ulysses_degree 1) and pure Ulysses (ring_degree 1) are the two
degenerate meshes of the same path: an axis of one rank does no communication.
A failure inside forward or backward goes through ``Communicator.fail``, so
every rank raises (faults.py).
"""
from dataclasses import dataclass

import torch
import torch.distributed as dist

from .attention import _kernel_dtype
from .comm import Communicator, RingComm, UlyssesComm
from .faults import fault_point
from .layout import Layout
from .ring import ring_backward, ring_forward
from .ulysses import gather_heads, scatter_heads


@dataclass(frozen=True)
class MeshComms:
    """What one rank needs to run attention over its mesh; the comms are None on an axis of one rank."""
    layout: Layout
    ring_index: int
    comm: Communicator = None
    ring: RingComm = None
    ulysses: UlyssesComm = None


def _guarded(mesh, where, fn, *args):
    if mesh.comm is None:
        return fn(*args)
    mesh.comm.check(where)
    try:
        return fn(*args)
    except Exception as exc:
        mesh.comm.fail(where, exc)


def _ulysses_index(mesh):
    return mesh.ulysses.members.index(dist.get_rank())


def _local_heads(mesh, heads):
    """The query heads this rank attends with after the Ulysses all-to-all."""
    if mesh.ulysses is None:
        return slice(0, heads)
    width = heads // mesh.ulysses.degree
    index = _ulysses_index(mesh)
    return slice(index * width, (index + 1) * width)


def _forward(ctx, q, k, v, sinks, mesh, seq_len, docs, window, softmax_scale, softcap, return_lse):
    heads, heads_kv, in_dtype = q.shape[2], k.shape[2], q.dtype
    parts = mesh.layout.ulysses_parts(mesh.ring_index, seq_len, docs)  # the Ulysses ranks' token counts
    if mesh.ulysses is not None:
        q, k, v = scatter_heads((q, k, v), mesh.ulysses, parts)
        fault_point("ulysses forward")
    local_sinks = sinks[_local_heads(mesh, heads)] if sinks is not None else None
    dtype = _kernel_dtype(q)
    if dtype != in_dtype:
        q, k, v = (t.to(dtype) for t in (q, k, v))
    if mesh.ring is not None:  # sent as they are: contiguous once, here, and saved so
        k, v = k.contiguous(), v.contiguous()
    out, lse = ring_forward(q, k, v, mesh.layout, seq_len, mesh.ring_index, mesh.ring, window, softmax_scale,
                            softcap, local_sinks, docs)
    out = out.to(dtype)
    ctx.save_for_backward(q, k, v, out, lse, local_sinks)
    ctx.args = (mesh, seq_len, docs, parts, window, softmax_scale, softcap, heads, heads_kv, in_dtype)
    if dtype != in_dtype:
        out = out.to(in_dtype)
    if mesh.ulysses is not None:
        index = _ulysses_index(mesh)
        (out,) = gather_heads([out], [heads], mesh.ulysses, parts, index)
        if return_lse:  # (B, H/U, S) as a (B, S, H/U, 1) "tensor"
            (lse,) = gather_heads([lse.transpose(1, 2).unsqueeze(-1)], [heads], mesh.ulysses, parts, index)
            lse = lse[..., 0].transpose(1, 2)
    return out, (lse if return_lse else None)


def _backward(ctx, dout):
    q, k, v, out, lse, local_sinks = ctx.saved_tensors
    mesh, seq_len, docs, parts, window, softmax_scale, softcap, heads, heads_kv, in_dtype = ctx.args
    if mesh.ulysses is not None:
        (dout,) = scatter_heads([dout], mesh.ulysses, parts)
        fault_point("ulysses backward")
    dq, dk, dv, dsinks_local = ring_backward(dout.to(q.dtype), q, k, v, out, lse, mesh.layout, seq_len,
                                             mesh.ring_index, mesh.ring, window, softmax_scale, softcap, local_sinks,
                                             docs)
    grads = [g.to(in_dtype) for g in (dq, dk, dv)]
    if mesh.ulysses is not None:
        grads = gather_heads(grads, [heads, heads_kv, heads_kv], mesh.ulysses, parts, _ulysses_index(mesh))
    dsinks = None
    if local_sinks is not None:
        # This rank's share (its rows, its heads), as for every replicated parameter under context
        # parallelism: the data/context-parallel gradient all-reduce sums the shares.
        dsinks = torch.zeros(heads, dtype=torch.float32, device=dout.device)
        dsinks[_local_heads(mesh, heads)] = dsinks_local
        dsinks = dsinks.to(local_sinks.dtype)
    return (*grads, dsinks)


class USPAttention(torch.autograd.Function):
    """(out, lse or None) of attention over the mesh; differentiable in q, k, v (flash layout, local shards)."""

    @staticmethod
    def forward(ctx, q, k, v, sinks, mesh, seq_len, docs, window, softmax_scale, softcap, return_lse, where):
        ctx.where = where
        out, lse = _guarded(mesh, where, _forward, ctx, q, k, v, sinks, mesh, seq_len, docs, window, softmax_scale,
                            softcap, return_lse)
        if lse is not None:
            ctx.mark_non_differentiable(lse)
        return out, lse

    @staticmethod
    def backward(ctx, dout, _dlse):
        mesh = ctx.args[0]
        dq, dk, dv, dsinks = _guarded(mesh, f"{ctx.where} backward", _backward, ctx, dout)
        return dq, dk, dv, dsinks, None, None, None, None, None, None, None, None


def usp_attention(q, k, v, mesh, seq_len, window, softmax_scale, return_lse=False, where="usp_attention",
                  softcap=0.0, sinks=None, docs=None):
    """Attention of local shards (flash layout) of a ``seq_len`` sequence over the mesh; (out, lse) with
    ``return_lse``. Inputs are validated.

    ``window`` = (left, right) by global position, causal being right = 0 (``MaskSpec``);
    ``docs``: packed documents (the global cu_seqlens as a tuple), positions then inside each document."""
    out, lse = USPAttention.apply(q, k, v, sinks, mesh, seq_len, docs, tuple(window), softmax_scale, softcap,
                                  return_lse, where)
    return (out, lse) if return_lse else out
