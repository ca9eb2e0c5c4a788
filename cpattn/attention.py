"""Single-device attention: the autograd Function over the Triton kernels, and
the two drop-in entry points (flash-attn layout and torch SDPA layout)."""
import warnings

import torch

from cpattn.kernels import attention_backward, attention_forward

from ._checks import check_qkv, check_scale


def _kernel_dtype(t):
    # Triton's CPU interpreter computes with numpy, which has no bfloat16 matmul:
    # on CPU, bf16 inputs run the same kernels in float32 and are rounded back.
    if t.device.type == "cpu" and t.dtype == torch.bfloat16:
        return torch.float32
    return t.dtype


class FlashAttnFunction(torch.autograd.Function):
    """out, lse = attention(q, k, v) at given global positions; flash layout.

    ``q_start`` / ``k_start`` are the global positions of the first query row
    and key column (see DESIGN.md). lse is returned but not differentiable.
    """

    @staticmethod
    def forward(ctx, q, k, v, softmax_scale, causal, q_start, k_start):
        dtype = _kernel_dtype(q)
        qc, kc, vc = (t.to(dtype) for t in (q, k, v))
        out, lse = attention_forward(qc, kc, vc, softmax_scale, causal, q_start, k_start)
        ctx.save_for_backward(qc, kc, vc, out, lse)
        ctx.args = (softmax_scale, causal, q_start, k_start)
        ctx.mark_non_differentiable(lse)
        return out.to(q.dtype), lse

    @staticmethod
    def backward(ctx, dout, _dlse):
        q, k, v, out, lse = ctx.saved_tensors
        softmax_scale, causal, q_start, k_start = ctx.args
        dq, dk, dv = attention_backward(dout.to(q.dtype), q, k, v, out, lse, softmax_scale, causal, q_start, k_start)
        dtype = dout.dtype
        return dq.to(dtype), dk.to(dtype), dv.to(dtype), None, None, None, None


def flash_attn_func(q, k, v, causal=False, softmax_scale=None, return_lse=False):
    """Attention in flash-attn's layout: q (B, Sq, H, D), k and v (B, Sk, Hkv, D).

    Hkv may divide H (GQA/MQA). ``causal`` with Sq != Sk is bottom-right aligned
    as in flash-attn: query row i sees keys j <= i + Sk - Sq. Returns out
    (B, Sq, H, D) in q's dtype, and with ``return_lse=True`` also lse (B, H, Sq)
    float32 in natural log (-inf for rows that see no key).
    """
    _, seqlen_q, seqlen_k, *_ = check_qkv(q, k, v, "flash_attn_func")
    softmax_scale = check_scale(softmax_scale, "flash_attn_func")
    out, lse = FlashAttnFunction.apply(q, k, v, softmax_scale, bool(causal), seqlen_k - seqlen_q, 0)
    return (out, lse) if return_lse else out


_warned = set()


def _warn_once(reason):
    if reason not in _warned:
        _warned.add(reason)
        warnings.warn(f"cpattn.scaled_dot_product_attention: {reason}; falling back to "
                      "torch.nn.functional.scaled_dot_product_attention", stacklevel=3)


def scaled_dot_product_attention(query, key, value, attn_mask=None, dropout_p=0.0, is_causal=False,
                                 scale=None, enable_gqa=False):
    """Drop-in for ``torch.nn.functional.scaled_dot_product_attention``, layout (B, H, L, D).

    Same semantics as torch: ``is_causal`` with L != S is top-left aligned
    (query i sees keys j <= i); differing head counts need ``enable_gqa=True``.
    An explicit ``attn_mask``, ``dropout_p > 0`` or float64 inputs are not
    accelerated: they go to torch's own SDPA, with a one-time warning.
    """
    fallback = None
    if attn_mask is not None:
        fallback = "an explicit attn_mask is not accelerated"
    elif dropout_p and dropout_p > 0.0:
        fallback = "dropout is not accelerated"
    elif all(isinstance(t, torch.Tensor) and t.dtype == torch.float64 for t in (query, key, value)):
        fallback = "float64 is not accelerated"
    if fallback is not None:
        _warn_once(fallback)
        kwargs = {"enable_gqa": enable_gqa} if enable_gqa else {}
        return torch.nn.functional.scaled_dot_product_attention(
            query, key, value, attn_mask=attn_mask, dropout_p=dropout_p, is_causal=is_causal, scale=scale, **kwargs)

    _, _, _, heads, heads_kv, _ = check_qkv(query, key, value, "scaled_dot_product_attention", layout="sdpa")
    if heads != heads_kv and not enable_gqa:
        raise ValueError(f"scaled_dot_product_attention: query has {heads} heads but key/value have {heads_kv}; "
                         "pass enable_gqa=True for grouped-query attention")
    scale = check_scale(scale, "scaled_dot_product_attention")
    # (B, H, L, D) -> (B, L, H, D) is a view: the kernels read any strides, no copy.
    out, _ = FlashAttnFunction.apply(query.transpose(1, 2), key.transpose(1, 2), value.transpose(1, 2),
                                     scale, bool(is_causal), 0, 0)
    return out.transpose(1, 2)
