"""Online softmax pieces shared by the forward, backward and decode kernels.

Notation follows the FlashAttention papers: ``m_i`` running row max, ``l_i``
running row sum, ``acc`` unnormalised output. We work in base 2 (exp2) with the
softmax scale folded in; the lse the kernels return is in natural log.
"""
import torch
import triton
import triton.language as tl

LOG2_E = 1.4426950408889634


@triton.jit
def tanh(x):
    # exp2-based, so the interpreter and every GPU target run the same code; saturates to +-1.
    return 1.0 - 2.0 / (tl.math.exp2(x * 2.8853900817779268) + 1.0)  # 2 * log2(e)


@triton.jit
def scores(qk, softmax_scale, softcap, SOFTCAP: tl.constexpr):
    """Base-2 scores from raw products q.k, with flash-attn's logit softcap
    ``softcap * tanh(scale * q.k / softcap)`` when SOFTCAP. Also returns the tanh
    (the backward needs 1 - tanh**2); without a softcap it is unused."""
    if SOFTCAP:
        t = tanh(qk * (softmax_scale / softcap))
        return t * (softcap * 1.4426950408889634), t
    else:
        return qk * (softmax_scale * 1.4426950408889634), qk


@triton.jit
def online_softmax_step(x, m_i, l_i, x_scale):
    """Fold a tile into the running max and sum, where the tile's base-2 scores are
    ``x * x_scale`` (``x_scale > 0``; invisible entries of ``x`` are -inf).

    The forward passes raw products q.k with ``x_scale = softmax_scale * log2(e)``:
    the row max is taken on the raw products and scaled once per row, so each score
    costs one FMA (``x * x_scale - m``) before exp2 instead of a multiply and a
    subtract. Callers with scores already in base 2 pass ``x_scale = 1.0``.
    Returns (p, alpha, m_i, l_i): the tile's unnormalised probabilities, the factor
    that rescales what was accumulated so far, and the new max and sum (base 2).
    """
    m_new = tl.maximum(m_i, tl.max(x, 1) * x_scale)
    # A row that has seen no visible key yet keeps m = -inf; shift it by 0 to avoid NaN.
    m_shift = tl.where(m_new == float("-inf"), 0.0, m_new)
    p = tl.math.exp2(x * x_scale - m_shift[:, None])
    alpha = tl.math.exp2(m_i - m_shift)
    return p, alpha, m_new, l_i * alpha + tl.sum(p, 1)


@triton.jit
def finish_softmax(acc, l_i, m_i):
    """Normalise: (out, lse in natural log). A row with no visible key gives out 0
    and lse -inf, the identity of the merge."""
    has_keys = l_i > 0.0
    l_safe = tl.where(has_keys, l_i, 1.0)
    out = acc * tl.where(has_keys, 1.0 / l_safe, 0.0)[:, None]
    lse = tl.where(has_keys, (m_i + tl.math.log2(l_safe)) * 0.6931471805599453, float("-inf"))  # x ln 2
    return out, lse


def dot_precision(dtype):
    """fp32 inputs get exact fp32 products unless the user allowed TF32 for float32 matmuls
    (``torch.backends.cuda.matmul.allow_tf32`` or ``torch.set_float32_matmul_precision``):
    "highest" -> "ieee", "high" -> "tf32x3", "medium" -> "tf32". fp16/bf16 use tensor cores."""
    if dtype != torch.float32:
        return "tf32"
    precision = torch.get_float32_matmul_precision()
    if precision == "highest" and not torch.backends.cuda.matmul.allow_tf32:
        return "ieee"
    return "tf32x3" if precision == "high" else "tf32"
