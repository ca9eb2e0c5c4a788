"""The attention kernels as PyTorch custom operators.

``cpattn::attention_fwd`` and ``cpattn::attention_bwd`` wrap the Triton forward and
backward, with fake (meta) implementations and autograd registered, so that
``torch.compile(fullgraph=True)`` treats a cpattn call as one opaque node (no
graph break, no tracing into Triton) and autograd works in eager and compiled
code alike. The same implementation serves CPU tensors (Triton's interpreter)
and CUDA tensors (compiled kernels).

The mask arguments are those of ``cpattn.kernels.MaskSpec``: the window (-1 =
unbounded; causal is a right bound of 0), the global positions of the first query row / key column, and
for packed documents (q, k, v of shape (1, total, H, D)) the cu_seqlens and each
document's first query / key position.
"""
from typing import Optional, Tuple

import torch
from torch import Tensor

from cpattn.kernels import MaskSpec, attention_backward, attention_backward_delta, attention_forward

from .partials import sinks_grad


def kernel_dtype(t):
    # Triton's CPU interpreter computes with numpy, which has no bfloat16 matmul:
    # on CPU, bf16 inputs run the same kernels in float32 and are rounded back.
    if t.device.type == "cpu" and t.dtype == torch.bfloat16:
        return torch.float32
    return t.dtype


def _fresh(t, dtype=None):
    """A new contiguous tensor of ``t``'s shape: how every operator here returns its outputs."""
    return torch.empty(t.shape, dtype=dtype or t.dtype, device=t.device)


def _mask(window_left, window_right, q_start, k_start, cu_seqlens_q, cu_seqlens_k, pos_q, pos_k,
          max_seqlen_q, max_seqlen_k):
    if cu_seqlens_q is None:
        return MaskSpec(window_size=(window_left, window_right), q_start=q_start, k_start=k_start)
    return MaskSpec(False, (window_left, window_right), pos_q, pos_k, cu_seqlens_q, cu_seqlens_k,
                    max_seqlen_q, max_seqlen_k)


@torch.library.custom_op("cpattn::attention_fwd", mutates_args=())
def attention_fwd(q: Tensor, k: Tensor, v: Tensor, softmax_scale: float, window_left: int, window_right: int,
                  q_start: int, k_start: int, softcap: float, sinks: Optional[Tensor],
                  cu_seqlens_q: Optional[Tensor], cu_seqlens_k: Optional[Tensor], pos_q: Optional[Tensor],
                  pos_k: Optional[Tensor], max_seqlen_q: int, max_seqlen_k: int,
                  atomic_dq: bool = False) -> Tuple[Tensor, Tensor]:
    """(out (B, Sq, H, Dv) in q's dtype, Dv v's head dim, lse (B, H, Sq) float32 natural log).
    ``atomic_dq`` only chooses the backward (the 5-GEMM one, see attention_backward)."""
    mask = _mask(window_left, window_right, q_start, k_start, cu_seqlens_q, cu_seqlens_k, pos_q, pos_k,
                 max_seqlen_q, max_seqlen_k)
    dtype = kernel_dtype(q)
    out, lse = attention_forward(q.to(dtype), k.to(dtype), v.to(dtype), softmax_scale, mask=mask, softcap=softcap,
                                 sinks=sinks)
    return out.to(q.dtype), lse


@attention_fwd.register_fake
def _(q, k, v, softmax_scale, window_left, window_right, q_start, k_start, softcap, sinks,
      cu_seqlens_q, cu_seqlens_k, pos_q, pos_k, max_seqlen_q, max_seqlen_k, atomic_dq=False):
    # The kernels write a fresh contiguous out, whatever q's strides (an SDPA-layout q is a transposed view),
    # with v's head dim.
    batch, seqlen_q, heads, _ = q.shape
    return (q.new_empty((batch, seqlen_q, heads, v.shape[-1])),
            q.new_empty((batch, heads, seqlen_q), dtype=torch.float32))


@torch.library.custom_op("cpattn::attention_bwd", mutates_args=())
def attention_bwd(dout: Tensor, q: Tensor, k: Tensor, v: Tensor, out: Tensor, delta: Tensor, lse: Tensor,
                  softmax_scale: float, window_left: int, window_right: int, q_start: int,
                  k_start: int, softcap: float, cu_seqlens_q: Optional[Tensor], cu_seqlens_k: Optional[Tensor],
                  pos_q: Optional[Tensor], pos_k: Optional[Tensor], max_seqlen_q: int, max_seqlen_k: int,
                  compute_dq: bool, compute_dkdv: bool, atomic_dq: bool = False,
                  lse_log2: Optional[Tensor] = None) -> Tuple[Tensor, Tensor, Tensor]:
    """(dq, dk, dv), contiguous; a gradient not asked for is an empty tensor (its kernel does not run).
    ``lse_log2``: the lse as the kernels read it, from ``attention_row_stats`` (else converted here)."""
    mask = _mask(window_left, window_right, q_start, k_start, cu_seqlens_q, cu_seqlens_k, pos_q, pos_k,
                 max_seqlen_q, max_seqlen_k)
    dtype = kernel_dtype(q)
    qc, kc, vc, oc, dc = (t.to(dtype) for t in (q, k, v, out, dout))
    # Fresh contiguous gradients, whatever the inputs' strides: the layout the fake implementation can
    # promise (one like q's would copy odd strides of size-1 dimensions, which fake tensors normalise).
    dq, dk, dv = attention_backward(dc, qc, kc, vc, oc, lse, softmax_scale, delta=delta, mask=mask, softcap=softcap,
                                    dq=_fresh(q, dtype) if compute_dq else None,
                                    dk=_fresh(k, dtype) if compute_dkdv else None,
                                    dv=_fresh(v, dtype) if compute_dkdv else None,
                                    compute_dq=compute_dq, compute_dkdv=compute_dkdv,
                                    atomic_dq=atomic_dq and compute_dq and compute_dkdv, lse_log2=lse_log2)
    # Outputs may not alias each other: every skipped gradient gets its own empty tensor.
    return (dq.to(q.dtype) if compute_dq else q.new_empty(0), dk.to(k.dtype) if compute_dkdv else q.new_empty(0),
            dv.to(v.dtype) if compute_dkdv else q.new_empty(0))


@attention_bwd.register_fake
def _(dout, q, k, v, out, delta, lse, softmax_scale, window_left, window_right, q_start, k_start, softcap,
      cu_seqlens_q, cu_seqlens_k, pos_q, pos_k, max_seqlen_q, max_seqlen_k, compute_dq, compute_dkdv,
      atomic_dq=False, lse_log2=None):
    return (_fresh(q) if compute_dq else q.new_empty(0), _fresh(k) if compute_dkdv else q.new_empty(0),
            _fresh(v) if compute_dkdv else q.new_empty(0))


@torch.library.custom_op("cpattn::attention_row_stats", mutates_args=())
def attention_row_stats(out: Tensor, dout: Tensor, lse: Tensor) -> Tuple[Tensor, Tensor]:
    """(delta, lse in base 2 as the backward kernels read it), both (B, H, Sq) float32, from one pass."""
    dtype = kernel_dtype(out)
    return attention_backward_delta(out.to(dtype), dout.to(dtype), lse)


@attention_row_stats.register_fake
def _(out, dout, lse):
    batch, seqlen, heads, _ = out.shape
    return (out.new_empty((batch, heads, seqlen), dtype=torch.float32),
            out.new_empty((batch, heads, seqlen), dtype=torch.float32))


_MASK_ARGS = ("softmax_scale", "window_left", "window_right", "q_start", "k_start", "softcap")
_PACKING_ARGS = ("cu_seqlens_q", "cu_seqlens_k", "pos_q", "pos_k", "max_seqlen_q", "max_seqlen_k")
_BACKWARD_ARGS = ("atomic_dq",)
_SINKS_INDEX = 3 + len(_MASK_ARGS)  # after q, k, v and the mask arguments


def _setup_context(ctx, inputs, output):
    q, k, v, *rest = inputs
    args = dict(zip(_MASK_ARGS + ("sinks",) + _PACKING_ARGS + _BACKWARD_ARGS, rest))
    out, lse = output
    ctx.sinks = args.pop("sinks")
    ctx.args = args
    ctx.save_for_backward(q, k, v, out, lse, ctx.sinks)


def _backward(ctx, dout, dlse):
    q, k, v, out, lse, sinks = ctx.saved_tensors
    needs_q, needs_k, needs_v = ctx.needs_input_grad[:3]
    delta, lse_log2 = attention_row_stats(out, dout, lse)
    if dlse is not None:
        # d lse / d score = p, so a gradient reaching lse enters the backward as a shift of delta.
        delta = delta - dlse
    dq, dk, dv = attention_bwd(dout, q, k, v, out, delta, lse, **ctx.args,
                               compute_dq=needs_q, compute_dkdv=needs_k or needs_v, lse_log2=lse_log2)
    dsinks = None
    if sinks is not None and ctx.needs_input_grad[_SINKS_INDEX]:
        dsinks = sinks_grad(sinks, lse, delta).to(sinks.dtype)
    grads = [dq if needs_q else None, dk if needs_k else None, dv if needs_v else None]
    rest = [None] * (len(_MASK_ARGS) + 1 + len(_PACKING_ARGS) + len(_BACKWARD_ARGS))
    rest[_SINKS_INDEX - 3] = dsinks
    return (*grads, *rest)


torch.library.register_autograd("cpattn::attention_fwd", _backward, setup_context=_setup_context)


def differentiable_attention(q, k, v, softmax_scale, mask, softcap=0.0, sinks=None, atomic_dq=False):
    """Differentiable (out, lse) of the kernels for a MaskSpec ``mask``, through the custom ops;
    ``atomic_dq`` selects the 5-GEMM backward."""
    mask = mask.on(q.device)  # the operators take documents as tensors
    if mask.varlen:
        packing = (mask.cu_seqlens_q, mask.cu_seqlens_k, mask.q_start, mask.k_start,
                   int(mask.max_seqlen_q), int(mask.max_seqlen_k))
        q_start = k_start = 0
    else:
        packing = (None, None, None, None, 0, 0)
        q_start, k_start = int(mask.q_start), int(mask.k_start)
    return attention_fwd(q, k, v, float(softmax_scale), mask.left, mask.right, q_start, k_start,
                         float(softcap), sinks, *packing, bool(atomic_dq))
