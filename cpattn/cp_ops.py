"""Context-parallel attention as two PyTorch custom operators, for torch.compile.

A ``ContextParallel`` call does what no graph can hold: the agreement across
ranks (a host all-gather, the first time a signature is seen), ring P2P and
Ulysses all-to-alls posted and waited for around the kernels, and the fault
path of faults.py (a ``try`` around every communicating step, connections
closed on failure). Under torch.compile the call is therefore one opaque
operator for the forward, ``cpattn::cp_attention_fwd``, and one for the
backward, ``cpattn::cp_attention_bwd``, whose implementations are the eager
code itself: the same checks and agreement, the same collectives in the same
order, the same fault path. Dynamo traces up to them with no graph break
(``fullgraph=True`` works) and any backend (inductor included) calls them as
extern operators; every rank compiles the same graph, so the ranks still meet
in the same collectives.

An operator takes tensors and plain values, so the ``ContextParallel`` is
named by an int handle (``register``), a constant of the graph.

The forward returns this rank's out (B, S/P, H, Dv), contiguous in flash
layout, and lse (B, H, S/P) float32, always (the backward needs it). The
backward gets the forward's inputs and outputs (``usp.usp_attention_backward``
says why not the ring-side tensors eager autograd saves) and returns dq, dk,
dv in the inputs' layout (flash-contiguous, viewed back to (B, H, S/P, D) for
the SDPA layout) and the sinks' gradient (empty without sinks). Each fake
implementation builds its outputs with the same helper the real one passes
them through, so their strides agree by construction.
"""
import itertools
import weakref
from typing import Optional, Tuple

import torch
from torch import Tensor

from .cp_calls import AttentionArgs, check_attention_arguments

# CUDA-graph capture (mode="reduce-overhead") must leave these calls out: they read the host and wait on peers.
_TAGS = {"tags": (torch.Tag.cudagraph_unsafe,)} if hasattr(torch.Tag, "cudagraph_unsafe") else {}

_targets = {}  # handle -> (forward, backward), weak references to a ContextParallel's methods
_handles = itertools.count()


def register(forward, backward):
    """A handle for the bound methods implementing one ContextParallel's operators (held weakly)."""
    handle = next(_handles)
    _targets[handle] = (weakref.WeakMethod(forward), weakref.WeakMethod(backward))
    weakref.finalize(forward.__self__, _targets.pop, handle, None)
    return handle


def _target(handle, which):
    method = _targets.get(handle, (lambda: None, lambda: None))[which]()
    if method is None:
        raise RuntimeError("cpattn: the ContextParallel this compiled code was traced with no longer exists")
    return method


def _flash_shape(t, sdpa_layout):
    """(B, S, H, D) of a q/k/v given in flash layout or, with ``sdpa_layout``, as (B, H, S, D)."""
    batch, first, second, head_dim = t.shape
    return (batch, second, first, head_dim) if sdpa_layout else (batch, first, second, head_dim)


def _in_input_layout(grad, sdpa_layout):
    """A gradient computed in flash layout, contiguous there, viewed in its input's layout."""
    grad = grad.contiguous()
    return grad.transpose(1, 2) if sdpa_layout else grad


@torch.library.custom_op("cpattn::cp_attention_fwd", mutates_args=(), **_TAGS)
def cp_attention_fwd(q: Tensor, k: Tensor, v: Tensor, sinks: Optional[Tensor], cu_seqlens: Optional[Tensor],
                     handle: int, causal: bool, softmax_scale: Optional[float], return_lse: bool, sdpa_layout: bool,
                     enable_gqa: bool, window_left: int, window_right: int, softcap: float, seq_len: Optional[int],
                     needs_grad: bool) -> Tuple[Tensor, Tensor]:
    args = AttentionArgs(q, k, v, causal, softmax_scale, return_lse, (window_left, window_right), softcap, sinks,
                         seq_len, cu_seqlens, sdpa_layout, enable_gqa)
    out, lse = _target(handle, 0)(args, needs_grad)
    return out.contiguous(), lse.contiguous()


@cp_attention_fwd.register_fake
def _(q, k, v, sinks, cu_seqlens, handle, causal, softmax_scale, return_lse, sdpa_layout, enable_gqa, window_left,
      window_right, softcap, seq_len, needs_grad):
    batch, seqlen, heads, _ = _flash_shape(q, sdpa_layout)
    return (q.new_empty((batch, seqlen, heads, v.shape[-1])),  # v's head dim, whatever the layout
            q.new_empty((batch, heads, seqlen), dtype=torch.float32))


@torch.library.custom_op("cpattn::cp_attention_bwd", mutates_args=(), **_TAGS)
def cp_attention_bwd(dout: Tensor, q: Tensor, k: Tensor, v: Tensor, out: Tensor, lse: Tensor, sinks: Optional[Tensor],
                     cu_seqlens: Optional[Tensor], handle: int, causal: bool, softmax_scale: Optional[float],
                     sdpa_layout: bool, window_left: int, window_right: int, softcap: float,
                     seq_len: Optional[int]) -> Tuple[Tensor, Tensor, Tensor, Tensor]:
    # (the backward reads neither return_lse nor enable_gqa: the forward checked and agreed on them)
    args = AttentionArgs(q, k, v, causal, softmax_scale, True, (window_left, window_right), softcap, sinks, seq_len,
                         cu_seqlens, sdpa_layout, True)
    dq, dk, dv, dsinks = _target(handle, 1)(dout, args, out, lse)
    grads = []
    for g in (dq, dk, dv):
        # Outputs may not share memory (the ring returns dk and dv as halves of one buffer): copy if they do.
        shared = any(g.untyped_storage().data_ptr() == other.untyped_storage().data_ptr() for other in grads)
        grads.append(_in_input_layout(g.clone() if shared else g, sdpa_layout))
    return (*grads, q.new_empty(0) if dsinks is None else dsinks.contiguous())


@cp_attention_bwd.register_fake
def _(dout, q, k, v, out, lse, sinks, cu_seqlens, handle, causal, softmax_scale, sdpa_layout, window_left,
      window_right, softcap, seq_len):
    grads = (_in_input_layout(t.new_empty(_flash_shape(t, sdpa_layout)), sdpa_layout) for t in (q, k, v))
    return (*grads, q.new_empty(0) if sinks is None else sinks.new_empty(sinks.shape))


_OPTIONS = slice(5, 16)  # cp_attention_fwd's arguments after the tensors


def _setup_context(ctx, inputs, output):
    q, k, v, sinks, cu_seqlens = inputs[:5]
    handle, causal, softmax_scale, _, sdpa_layout, _, window_left, window_right, softcap, seq_len, _ = inputs[_OPTIONS]
    out, lse = output
    ctx.save_for_backward(q, k, v, out, lse, sinks, cu_seqlens)
    ctx.options = (handle, causal, softmax_scale, sdpa_layout, window_left, window_right, softcap, seq_len)
    ctx.mark_non_differentiable(lse)  # as in eager: lse is returned for inspection, not differentiated


def _backward(ctx, dout, _dlse):
    q, k, v, out, lse, sinks, cu_seqlens = ctx.saved_tensors
    dq, dk, dv, dsinks = cp_attention_bwd(dout, q, k, v, out, lse, sinks, cu_seqlens, *ctx.options)
    needs = ctx.needs_input_grad
    grads = (dq if needs[0] else None, dk if needs[1] else None, dv if needs[2] else None,
             dsinks if sinks is not None and needs[3] else None)
    return (*grads, None) + (None,) * (_OPTIONS.stop - _OPTIONS.start)


torch.library.register_autograd("cpattn::cp_attention_fwd", _backward, setup_context=_setup_context)


def compiled_attention(handle, args, layout, where):
    """A ContextParallel call (``AttentionArgs``) while dynamo traces: the checks of the arguments alone
    run here (a bad argument raises while compiling), then the forward operator; returns out in flash
    layout, and lse with ``return_lse``."""
    softmax_scale, window_size, softcap, _ = check_attention_arguments(args, layout.ulysses_degree, where)
    if args.seq_len is not None:
        layout.check_seq_len(args.seq_len, where)
    if args.cu_seqlens is not None and not isinstance(args.cu_seqlens, torch.Tensor):
        raise TypeError(f"{where}: cu_seqlens must be an int32 tensor, got {type(args.cu_seqlens).__name__}")
    out, lse = cp_attention_fwd(args.q, args.k, args.v, args.sinks, args.cu_seqlens, handle, bool(args.causal),
                                softmax_scale, bool(args.return_lse), bool(args.sdpa_layout), bool(args.enable_gqa),
                                *window_size, softcap, args.seq_len, args.needs_grad())
    return (out, lse) if args.return_lse else out
