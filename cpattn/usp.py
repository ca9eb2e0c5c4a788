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
every rank raises (faults.py). Under torch.compile the same forward and
backward run inside two custom operators (``usp_attention_forward`` and
``usp_attention_backward``, called by cpattn/cp_ops.py) instead of the
autograd Function.
"""
from typing import NamedTuple, Optional

import torch

from cpattn.kernels import MaskSpec

from .ops import kernel_dtype
from .faults import fault_path, fault_point
from .mesh import Mesh
from .ring import ring_backward, ring_forward
from .ulysses import gather_heads, scatter_heads


def _guarded(mesh, where, fn, *args):
    """``fn(*args)`` on the fault path of faults.py, after raising if an earlier call failed."""
    if mesh.comm is not None:
        mesh.comm.check(where)
    with fault_path(mesh.comm, where):
        return fn(*args)


def _local_heads(mesh, heads):
    """The query heads this rank attends with after the Ulysses all-to-all."""
    if mesh.ulysses is None:
        return slice(0, heads)
    width = heads // mesh.ulysses.degree
    return slice(mesh.ulysses_index * width, (mesh.ulysses_index + 1) * width)


class _Call(NamedTuple):
    """What a call's backward needs besides tensors."""
    mesh: Mesh
    seq_len: int
    packing: Optional[tuple]
    parts: list  # the Ulysses ranks' token counts
    mask: MaskSpec  # the whole attention's, at global positions
    cut: int  # the window left side the packed shards were cut for (-1: none; Layout.ring_chunks)
    softmax_scale: Optional[float]
    softcap: float
    heads: int
    heads_kv: int
    in_dtype: torch.dtype

    @staticmethod
    def of(q, k, mesh, seq_len, packing, mask, softmax_scale, softcap, cut=None):
        cut = mask.left if cut is None else cut
        parts = mesh.layout.ulysses_parts(mesh.ring_index, seq_len, packing, cut)
        return _Call(mesh, seq_len, packing, parts, mask, cut, softmax_scale, softcap, q.shape[2], k.shape[2],
                     q.dtype)


def _ring_inputs(q, k, v, mesh):
    """q, k, v as the ring takes them: in the kernels' dtype, and k, v contiguous when they travel (made
    so once, here, and saved so)."""
    dtype = kernel_dtype(q)
    if dtype != q.dtype:
        q, k, v = (t.to(dtype) for t in (q, k, v))
    if mesh.ring is not None:
        k, v = k.contiguous(), v.contiguous()
    return q, k, v


def _lse_as_heads(lse):
    """lse (B, H, S) as a (B, S, H, 1) "tensor", the layout the head all-to-alls move."""
    return lse.transpose(1, 2).unsqueeze(-1)


def _forward(q, k, v, sinks, call, return_lse):
    """(out, lse or None, the tensors the backward needs) of this rank's part of the sequence."""
    mesh = call.mesh
    if mesh.ulysses is not None:
        q, k, v = scatter_heads((q, k, v), mesh.ulysses, call.parts)
        fault_point("ulysses forward")
    local_sinks = sinks[_local_heads(mesh, call.heads)] if sinks is not None else None
    q, k, v = _ring_inputs(q, k, v, mesh)
    out, lse = ring_forward(q, k, v, mesh.layout, call.seq_len, mesh.ring_index, mesh.ring, call.mask,
                            call.softmax_scale, call.softcap, local_sinks, call.packing, call.cut)
    out = out.to(q.dtype)
    saved = (q, k, v, out, lse, local_sinks)
    out = out.to(call.in_dtype)
    if mesh.ulysses is not None:
        (out,) = gather_heads([out], [call.heads], mesh.ulysses, call.parts, mesh.ulysses_index)
        if return_lse:
            (lse,) = gather_heads([_lse_as_heads(lse)], [call.heads], mesh.ulysses, call.parts, mesh.ulysses_index)
            lse = lse[..., 0].transpose(1, 2)
    return out, (lse if return_lse else None), saved


def _backward(dout, saved, call):
    """(dq, dk, dv, d sinks or None) from this rank's part of dout and what ``_forward`` saved."""
    if call.mesh.ulysses is not None:
        (dout,) = scatter_heads([dout], call.mesh.ulysses, call.parts)
        fault_point("ulysses backward")
    return _ring_backward(dout, saved, call)


def _ring_backward(dout, saved, call):
    """The ring backward on this rank's ring piece (dout already there); the gradients sent back."""
    q, k, v, out, lse, local_sinks = saved
    mesh = call.mesh
    dq, dk, dv, dsinks_local = ring_backward(dout.to(q.dtype), q, k, v, out, lse, mesh.layout, call.seq_len,
                                             mesh.ring_index, mesh.ring, call.mask, call.softmax_scale,
                                             call.softcap, local_sinks, call.packing, call.cut)
    grads = [g.to(call.in_dtype) for g in (dq, dk, dv)]
    if mesh.ulysses is not None:
        grads = gather_heads(grads, [call.heads, call.heads_kv, call.heads_kv], mesh.ulysses, call.parts,
                             mesh.ulysses_index)
    dsinks = None
    if local_sinks is not None:
        # This rank's share (its rows, its heads), as for every replicated parameter under context
        # parallelism: the data/context-parallel gradient all-reduce sums the shares.
        dsinks = torch.zeros(call.heads, dtype=torch.float32, device=dout.device)
        dsinks[_local_heads(mesh, call.heads)] = dsinks_local
        dsinks = dsinks.to(local_sinks.dtype)
    return (*grads, dsinks)


class USPAttention(torch.autograd.Function):
    """(out, lse or None) of attention over the mesh; differentiable in q, k, v (flash layout, local shards)."""

    @staticmethod
    def forward(ctx, q, k, v, sinks, mesh, seq_len, packing, mask, softmax_scale, softcap, return_lse, where, cut):
        ctx.where = where
        ctx.call = _Call.of(q, k, mesh, seq_len, packing, mask, softmax_scale, softcap, cut)
        out, lse, saved = _guarded(mesh, where, _forward, q, k, v, sinks, ctx.call, return_lse)
        ctx.save_for_backward(*saved)
        if lse is not None:
            ctx.mark_non_differentiable(lse)
        return out, lse

    @staticmethod
    def backward(ctx, dout, _dlse):
        dq, dk, dv, dsinks = _guarded(ctx.call.mesh, f"{ctx.where} backward", _backward, dout, ctx.saved_tensors,
                                      ctx.call)
        return dq, dk, dv, dsinks, None, None, None, None, None, None, None, None, None


def usp_attention(q, k, v, mesh, seq_len, mask, softmax_scale, return_lse=False, where="usp_attention",
                  softcap=0.0, sinks=None, packing=None, cut=None):
    """Attention of local shards (flash layout) of a ``seq_len`` sequence over the mesh; (out, lse) with
    ``return_lse``. Inputs are validated.

    ``mask``: the attention's ``MaskSpec`` (causal and window) at global positions;
    ``packing``: packed documents (the global cu_seqlens as a tuple), positions then inside each document,
    in shards cut for a window of left side ``cut`` (None: the mask's; ``ring.ring_plan``)."""
    out, lse = USPAttention.apply(q, k, v, sinks, mesh, seq_len, packing, mask, softmax_scale, softcap,
                                  return_lse, where, cut)
    return (out, lse) if return_lse else out


# ----------------------------------------------------------------------------- for the custom operators
# Under torch.compile a call is two custom operators (cpattn/cp_ops.py), whose outputs must have shapes
# known before they run. The ring-side tensors USPAttention saves have none such (with packed documents
# their length depends on cu_seqlens' values), so the backward starts from the forward's inputs and
# outputs instead and brings them to the ring again: with Ulysses, in the all-to-all that brings dout.

def usp_attention_forward(q, k, v, mesh, seq_len, mask, softmax_scale, where, softcap=0.0, sinks=None, packing=None,
                          cut=None):
    """``usp_attention`` without autograd: (out, lse) of this rank's rows, on the same fault path."""
    call = _Call.of(q, k, mesh, seq_len, packing, mask, softmax_scale, softcap, cut)
    out, lse, _ = _guarded(mesh, where, _forward, q, k, v, sinks, call, True)
    return out, lse


def usp_attention_backward(dout, q, k, v, out, lse, mesh, seq_len, mask, softmax_scale, where, softcap=0.0,
                           sinks=None, packing=None, cut=None):
    """(dq, dk, dv, d sinks or None) of ``usp_attention_forward``, from its inputs and outputs."""
    call = _Call.of(q, k, mesh, seq_len, packing, mask, softmax_scale, softcap, cut)
    return _guarded(mesh, where, _backward_from_outputs, dout, q, k, v, out, lse, sinks, call)


def _backward_from_outputs(dout, q, k, v, out, lse, sinks, call):
    mesh = call.mesh
    if mesh.ulysses is not None:
        dout, q, k, v, out = scatter_heads((dout, q, k, v, out), mesh.ulysses, call.parts)
        (lse,) = scatter_heads([_lse_as_heads(lse)], mesh.ulysses, call.parts)
        lse = lse[..., 0].transpose(1, 2)
        fault_point("ulysses backward")
    local_sinks = sinks[_local_heads(mesh, call.heads)] if sinks is not None else None
    q, k, v = _ring_inputs(q, k, v, mesh)
    return _ring_backward(dout, (q, k, v, out.to(q.dtype), lse, local_sinks), call)
