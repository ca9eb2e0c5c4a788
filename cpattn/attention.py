"""Single-device attention: flash-attn's functions (dense and packed/varlen, with
their qkv/kv-packed variants) and a drop-in for torch's scaled_dot_product_attention.

Each entry point checks its arguments, applies autocast like torch SDPA, turns its
layout and mask convention into the kernels' one description (``MaskSpec``) and
calls the custom operator of cpattn/ops.py, which is differentiable and traceable
by torch.compile.
"""
import math
import warnings

import torch
import torch.nn.functional as F

from cpattn.kernels import MaskSpec

from . import ops
from .checks import (check_documents, check_qkv, check_scale, check_sinks, check_softcap, check_window,
                      refuse_unsupported)
from .flash_kvcache import paged_varlen_attention


def _autocast(*tensors):
    """Cast floating inputs to the autocast dtype when autocast is on for their device, as torch SDPA does."""
    if not all(isinstance(t, torch.Tensor) for t in tensors):
        return tensors  # the checks that follow name the culprit
    device = tensors[0].device.type
    if device in ("cpu", "cuda") and torch.is_autocast_enabled(device):
        dtype = torch.get_autocast_dtype(device)
        return tuple(t.to(dtype) if t.is_floating_point() else t for t in tensors)
    return tensors


def _call_kernels(q, k, v, where, softmax_scale, mask, softcap, sinks, heads, atomic_dq=False):
    scale = check_scale(softmax_scale, where)
    scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else scale
    softcap = check_softcap(softcap, where)
    sinks = check_sinks(sinks, heads, q.device, where)
    return ops.differentiable_attention(q, k, v, scale, mask, softcap, sinks, atomic_dq)


def _check_atomic_dq(atomic_dq, deterministic, where):
    """The 5-GEMM backward (dq summed with atomics) is opt-in and never deterministic."""
    if not isinstance(atomic_dq, bool):
        raise TypeError(f"{where}: atomic_dq must be a bool, got {type(atomic_dq).__name__}")
    if atomic_dq and deterministic:
        raise ValueError(f"{where}: atomic_dq=True sums dq with atomics in an order that varies between runs; "
                         "it cannot be combined with deterministic=True")
    return atomic_dq


def _returns(out, lse, return_attn_probs, return_lse):
    # flash-attn returns (out, softmax_lse, S_dmask); S_dmask only exists with dropout.
    if return_attn_probs:
        return out, lse, None
    return (out, lse) if return_lse else out


def flash_attn_func(q, k, v, dropout_p=0.0, softmax_scale=None, causal=False, window_size=(-1, -1), softcap=0.0,
                    alibi_slopes=None, deterministic=False, return_attn_probs=False, *, sinks=None, return_lse=False,
                    atomic_dq=False):
    """flash-attn 2's ``flash_attn_func``: q (B, Sq, H, D), k (B, Sk, Hkv, D) and v (B, Sk, Hkv, Dv),
    H a multiple of Hkv. v may have a head dim of its own (as in FlashAttention-3), e.g. MLA's
    D = 192, Dv = 128; the output has v's. The scale defaults to 1/sqrt(D), q's head dim.

    Causal masks and windows are bottom-right aligned when Sq != Sk, as in flash-attn:
    query row i sits at position i + Sk - Sq and sees keys j with
    pos - window_left <= j <= pos + window_right (causal: window_right = 0; -1: unbounded).
    ``softcap > 0`` caps the logits (``softcap * tanh(s / softcap)``). The backward is
    deterministic unless the cpattn keyword ``atomic_dq=True`` asks for the 5-GEMM backward
    (dq summed with fp32 atomics inside the dk/dv kernel; refused with ``deterministic=True``).
    ``dropout_p > 0`` and ``alibi_slopes`` raise NotImplementedError.

    Returns out (B, Sq, H, Dv); with ``return_attn_probs=True`` (out, lse, None) and with
    the cpattn keyword ``return_lse=True`` (out, lse), lse (B, H, Sq) float32, natural log,
    -inf for rows that see no key. cpattn keyword ``sinks`` (H,): one value-less logit
    per query head added to every row's softmax (gpt-oss), differentiable.
    Batch, heads (q and k/v alike) and lengths may be 0: an empty key set gives out 0 and
    lse -inf (flash-attn's CUDA code writes +inf; cpattn's merges read either as empty).
    """
    where = "flash_attn_func"
    refuse_unsupported(where, dropout_p, alibi_slopes)
    q, k, v = _autocast(q, k, v)
    _, seqlen_q, seqlen_k, heads, _, _ = check_qkv(q, k, v, where, same_value_dim=False, allow_no_heads=True)
    atomic_dq = _check_atomic_dq(atomic_dq, deterministic, where)
    mask = MaskSpec(bool(causal), check_window(window_size, where), q_start=seqlen_k - seqlen_q)
    out, lse = _call_kernels(q, k, v, where, softmax_scale, mask, softcap, sinks, heads, atomic_dq)
    return _returns(out, lse, return_attn_probs, return_lse)


def flash_attn_qkvpacked_func(qkv, dropout_p=0.0, softmax_scale=None, causal=False, window_size=(-1, -1),
                              softcap=0.0, alibi_slopes=None, deterministic=False, return_attn_probs=False, **extra):
    """flash-attn's packed variant: qkv (B, S, 3, H, D); q, k, v are views of it (no copy)."""
    _check_packed(qkv, 3, "qkv", "(batch, seqlen, 3, heads, headdim)", "flash_attn_qkvpacked_func")
    return flash_attn_func(qkv[:, :, 0], qkv[:, :, 1], qkv[:, :, 2], dropout_p, softmax_scale, causal, window_size,
                           softcap, alibi_slopes, deterministic, return_attn_probs, **extra)


def flash_attn_kvpacked_func(q, kv, dropout_p=0.0, softmax_scale=None, causal=False, window_size=(-1, -1),
                             softcap=0.0, alibi_slopes=None, deterministic=False, return_attn_probs=False, **extra):
    """flash-attn's packed variant: q (B, Sq, H, D), kv (B, Sk, 2, Hkv, D); k, v are views of kv
    (one head dim for both: a value head dim of its own needs ``flash_attn_func``)."""
    _check_packed(kv, 2, "kv", "(batch, seqlen, 2, heads, headdim)", "flash_attn_kvpacked_func")
    _check_packed_width(q, kv, "flash_attn_kvpacked_func")
    return flash_attn_func(q, kv[:, :, 0], kv[:, :, 1], dropout_p, softmax_scale, causal, window_size, softcap,
                           alibi_slopes, deterministic, return_attn_probs, **extra)


def _check_packed(t, parts, name, dims, where, packed_dim=2):
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{where}: {name} must be a torch.Tensor, got {type(t).__name__}")
    if t.dim() != len(dims.split(",")) or t.shape[packed_dim] != parts:
        raise ValueError(f"{where}: {name} must be {dims}, got shape {tuple(t.shape)}")


def _check_packed_width(q, kv, where):
    """kv packs k and v at one head dim, so that head dim is q's too; naming the way to v's own head dim."""
    if isinstance(q, torch.Tensor) and q.dim() >= 1 and q.shape[-1] != kv.shape[-1]:
        raise ValueError(f"{where}: kv packs k and v with one head dim ({kv.shape[-1]}), which must be q's "
                         f"({q.shape[-1]}); for a value head dim different from the query's (e.g. MLA's 192/128) "
                         "pass k and v apart to the unpacked function")


def flash_attn_varlen_func(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, dropout_p=0.0,
                           softmax_scale=None, causal=False, window_size=(-1, -1), softcap=0.0, alibi_slopes=None,
                           deterministic=False, return_attn_probs=False, block_table=None, *, sinks=None,
                           return_lse=False, atomic_dq=False):
    """flash-attn 2's ``flash_attn_varlen_func``: packed documents, each attended separately.

    q (total_q, H, D), k (total_k, Hkv, D) and v (total_k, Hkv, Dv); ``cu_seqlens_q``/``cu_seqlens_k`` int32
    (N + 1,) cumulative document lengths from 0; ``max_seqlen_*`` at least the longest
    document. Inside each document, masks follow ``flash_attn_func`` (bottom-right when
    its query and key lengths differ). Returns out (total_q, H, Dv); lse is (H, total_q)
    float32, as flash-attn's. ``atomic_dq`` as in ``flash_attn_func``.

    With ``block_table`` (N, max_num_blocks) int32, k and v are a page pool (num_blocks,
    page_block_size, Hkv, D), page_block_size a power of two >= 16, and document b's keys are
    the first cu_seqlens_k[b + 1] - cu_seqlens_k[b] slots of the pages in row b of the table
    (flash-attn's paged prefill). Forward only, on the decode kernel
    (``cpattn.flash_kvcache.paged_varlen_attention``): a call that needs gradients raises.
    """
    where = "flash_attn_varlen_func"
    refuse_unsupported(where, dropout_p, alibi_slopes)
    q, k, v = _autocast(q, k, v)
    atomic_dq = _check_atomic_dq(atomic_dq, deterministic, where)
    if block_table is not None:
        out, lse = paged_varlen_attention(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k,
                                          block_table, softmax_scale, causal, window_size, softcap, sinks, where)
        return _returns(out, lse, return_attn_probs, return_lse)
    for name, t in (("q", q), ("k", k), ("v", v)):
        if not isinstance(t, torch.Tensor) or t.dim() != 3:
            raise ValueError(f"{where}: {name} must be a 3-D tensor (total_tokens, heads, headdim), got "
                             f"{tuple(t.shape) if isinstance(t, torch.Tensor) else type(t).__name__}")
    q4, k4, v4 = q.unsqueeze(0), k.unsqueeze(0), v.unsqueeze(0)  # one "batch" of packed rows
    _, total_q, total_k, heads, _, _ = check_qkv(q4, k4, v4, where, same_value_dim=False, allow_no_heads=True)
    check_documents(cu_seqlens_q, cu_seqlens_k, total_q, total_k, max_seqlen_q, max_seqlen_k, q.device, where)
    # Positions inside each document: keys from 0, queries bottom-right aligned.
    lens_q, lens_k = cu_seqlens_q.diff(), cu_seqlens_k.diff()
    mask = MaskSpec(bool(causal), check_window(window_size, where), q_start=(lens_k - lens_q).to(torch.int32),
                    k_start=torch.zeros_like(lens_k), cu_seqlens_q=cu_seqlens_q, cu_seqlens_k=cu_seqlens_k,
                    max_seqlen_q=max(int(max_seqlen_q), 1), max_seqlen_k=max(int(max_seqlen_k), 1))
    out, lse = _call_kernels(q4, k4, v4, where, softmax_scale, mask, softcap, sinks, heads, atomic_dq)
    return _returns(out[0], lse[0], return_attn_probs, return_lse)


def flash_attn_varlen_qkvpacked_func(qkv, cu_seqlens, max_seqlen, dropout_p=0.0, softmax_scale=None, causal=False,
                                     window_size=(-1, -1), softcap=0.0, alibi_slopes=None, deterministic=False,
                                     return_attn_probs=False, **extra):
    """flash-attn's packed varlen variant: qkv (total, 3, H, D)."""
    _check_packed(qkv, 3, "qkv", "(total, 3, heads, headdim)", "flash_attn_varlen_qkvpacked_func", packed_dim=1)
    return flash_attn_varlen_func(qkv[:, 0], qkv[:, 1], qkv[:, 2], cu_seqlens, cu_seqlens, max_seqlen, max_seqlen,
                                  dropout_p, softmax_scale, causal, window_size, softcap, alibi_slopes, deterministic,
                                  return_attn_probs, **extra)


def flash_attn_varlen_kvpacked_func(q, kv, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, dropout_p=0.0,
                                    softmax_scale=None, causal=False, window_size=(-1, -1), softcap=0.0,
                                    alibi_slopes=None, deterministic=False, return_attn_probs=False, **extra):
    """flash-attn's packed varlen variant: q (total_q, H, D), kv (total_k, 2, Hkv, D)."""
    _check_packed(kv, 2, "kv", "(total, 2, heads, headdim)", "flash_attn_varlen_kvpacked_func", packed_dim=1)
    _check_packed_width(q, kv, "flash_attn_varlen_kvpacked_func")
    return flash_attn_varlen_func(q, kv[:, 0], kv[:, 1], cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k,
                                  dropout_p, softmax_scale, causal, window_size, softcap, alibi_slopes, deterministic,
                                  return_attn_probs, **extra)


warned_fallbacks = set()  # the fallback reasons warned about in this process (clear it to warn again)


def _warn_once(reason):
    if reason not in warned_fallbacks:
        warned_fallbacks.add(reason)
        warnings.warn(f"cpattn.scaled_dot_product_attention: {reason}; falling back to "
                      "torch.nn.functional.scaled_dot_product_attention", stacklevel=3)


def _sdpa_views(query, key, value, enable_gqa, where):
    """Torch SDPA's shapes (..., H, L, E) / (N, L, E) as 4-D flash-layout views (B, L, H, E),
    leading dimensions broadcast and flattened, heads broadcast unless GQA applies.
    Returns the views and the leading shape of the output."""
    for name, t in (("query", query), ("key", key), ("value", value)):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{where}: {name} must be a torch.Tensor, got {type(t).__name__}")
        if t.dim() < 3:
            raise ValueError(f"{where}: {name} must have at least 3 dimensions (..., L, E), got shape "
                             f"{tuple(t.shape)}")
    if len({query.dim(), key.dim(), value.dim()}) != 1:
        raise ValueError(f"{where}: query, key, value must have the same number of dimensions, got "
                         f"{query.dim()}, {key.dim()}, {value.dim()}")
    if query.dim() == 3:  # (N, L, E): one head
        query, key, value = query.unsqueeze(-3), key.unsqueeze(-3), value.unsqueeze(-3)
    try:
        lead = torch.broadcast_shapes(query.shape[:-3], key.shape[:-3], value.shape[:-3])
    except RuntimeError:
        raise ValueError(f"{where}: leading (batch) dimensions do not broadcast: query {tuple(query.shape)}, "
                         f"key {tuple(key.shape)}, value {tuple(value.shape)}") from None
    heads_q, heads_k, heads_v = query.shape[-3], key.shape[-3], value.shape[-3]
    if heads_k != heads_v:
        raise ValueError(f"{where}: key and value head counts differ: {heads_k} vs {heads_v}")
    if heads_k == 0 and heads_q > 0:
        # As in torch: key/value without heads hold no keys, so every query row sees none (out 0).
        # Their zero elements take the shape of no keys for each query head; gradients flow back.
        key, value = (t.expand(*lead, *t.shape[-3:]).reshape(*lead, heads_q, 0, t.shape[-1]) for t in (key, value))
        heads_k = heads_v = heads_q
    elif heads_q != heads_k and not enable_gqa:
        if heads_k != 1 and heads_q != 1:
            raise ValueError(f"{where}: query has {heads_q} heads but key/value have {heads_k}; "
                             "pass enable_gqa=True for grouped-query attention")
        heads = heads_k if heads_q == 1 else heads_q  # a single head broadcasts (to 0 heads too), as in torch
        heads_q = heads_k = heads_v = heads

    def flash(t, heads):
        t = t.expand(*lead, heads, *t.shape[-2:])
        # (explicit batch size: reshape cannot infer -1 when a dimension is 0)
        return t.reshape(math.prod(lead), *t.shape[-3:]).transpose(1, 2)  # a view unless broadcasting forced a copy

    return flash(query, heads_q), flash(key, heads_k), flash(value, heads_v), lead


def scaled_dot_product_attention(query, key, value, attn_mask=None, dropout_p=0.0, is_causal=False,
                                 scale=None, enable_gqa=False, *, window_size=(-1, -1), softcap=0.0, sinks=None):
    """Drop-in for ``torch.nn.functional.scaled_dot_product_attention``: (..., H, L, E) inputs.

    Same semantics as torch: ``is_causal`` with L != S is top-left aligned (query i sees
    keys j <= i); leading dimensions broadcast; 3-D inputs (N, L, E) are one head; the
    value head dim Ev may differ from the query's E (the kernels take it as it is);
    differing head counts need ``enable_gqa=True``; autocast casts like torch's; every zero
    size torch accepts (batch, heads, lengths, head dims) gives torch's result.
    An explicit ``attn_mask``, ``dropout_p > 0`` or float64 inputs are not accelerated:
    they go to torch's own SDPA, with a one-time warning.

    cpattn keyword extras (not torch arguments): ``window_size=(left, right)`` (positions
    as above, -1 unbounded), ``softcap``, and ``sinks`` (H,) as in ``flash_attn_func``.
    """
    where = "scaled_dot_product_attention"
    fallback = None
    if attn_mask is not None:
        fallback = "an explicit attn_mask is not accelerated"
    elif dropout_p and dropout_p > 0.0:
        fallback = "dropout is not accelerated"
    elif all(isinstance(t, torch.Tensor) and t.dtype == torch.float64 for t in (query, key, value)):
        fallback = "float64 is not accelerated"
    if fallback is not None:
        if tuple(window_size) != (-1, -1) or softcap or sinks is not None:
            raise NotImplementedError(f"{where}: window_size, softcap and sinks cannot be combined with the torch "
                                      f"fallback ({fallback})")
        _warn_once(fallback)
        kwargs = {"enable_gqa": enable_gqa} if enable_gqa else {}
        return F.scaled_dot_product_attention(query, key, value, attn_mask=attn_mask, dropout_p=dropout_p,
                                              is_causal=is_causal, scale=scale, **kwargs)

    q, k, v, lead = _sdpa_views(query, key, value, enable_gqa, where)
    q, k, v = _autocast(q, k, v)
    *_, heads, _, head_dim = check_qkv(q, k, v, where, same_value_dim=False, allow_no_heads=True, min_head_dim=0)
    scale = check_scale(scale, where)
    if scale is None:  # with head dim 0 every logit is 0 whatever the scale: torch weighs the keys alike
        scale = 1.0 / math.sqrt(head_dim) if head_dim else 1.0
    mask = MaskSpec(bool(is_causal), check_window(window_size, where))
    # E and Ev as they are: q.k over E columns (none at E = 0: every logit 0), out with Ev columns.
    # E and Ev as they are: q.k over E columns (none at E = 0: every logit 0), out with Ev columns.
    out, _ = _call_kernels(q, k, v, where, scale, mask, softcap, sinks, heads)
    out = out.transpose(1, 2)
    out = out.reshape(*lead, *out.shape[-3:])  # splits the flattened batch again: a view
    return out.squeeze(-3) if query.dim() == 3 else out
