"""Float64 reference attention for the tests, in flash layout (B, S, H, D).

Causality uses the global-position rule of DESIGN.md: key j (position
k_start + j) is visible to query i (position q_start + i) iff
k_start + j <= q_start + i. Rows with no visible key give out 0, lse -inf.
"""
import math

import torch


def reference_attention(q, k, v, softmax_scale=None, causal=False, q_start=0, k_start=0, window_size=(-1, -1),
                        softcap=0.0, sinks=None):
    """Returns (out (B, Sq, H, D) float64, lse (B, H, Sq) float64); differentiable.

    Visibility: key position k is visible to query position q when
    q - left <= k <= q + right (-1: unbounded; causal: right = 0). ``softcap`` caps the
    scaled scores with softcap * tanh(s / softcap); ``sinks`` (H,) add exp(sink_h) to
    every row's denominator (and to its lse).
    """
    scale = 1.0 / math.sqrt(q.shape[-1]) if softmax_scale is None else softmax_scale
    group = q.shape[2] // k.shape[2]
    qd = q.double().transpose(1, 2)
    kd = k.double().transpose(1, 2).repeat_interleave(group, dim=1)
    vd = v.double().transpose(1, 2).repeat_interleave(group, dim=1)
    scores = qd @ kd.transpose(-1, -2) * scale
    if softcap:
        scores = softcap * torch.tanh(scores / softcap)
    left, right = window_size
    if causal:
        right = 0
    q_pos = q_start + torch.arange(q.shape[1], device=q.device)[:, None]
    k_pos = k_start + torch.arange(k.shape[1], device=q.device)[None, :]
    hidden = torch.zeros(q.shape[1], k.shape[1], dtype=torch.bool, device=q.device)
    if left >= 0:
        hidden |= k_pos < q_pos - left
    if right >= 0:
        hidden |= k_pos > q_pos + right
    scores = scores.masked_fill(hidden, float("-inf"))
    if sinks is not None:
        sink_col = sinks.double()[None, :, None, None].expand(*scores.shape[:-1], 1)
        scores = torch.cat([scores, sink_col], dim=-1)
        vd = torch.cat([vd, vd.new_zeros(*vd.shape[:-2], 1, vd.shape[-1])], dim=-2)
    lse = torch.logsumexp(scores, dim=-1)
    probs = torch.exp(scores - lse[..., None].masked_fill(torch.isinf(lse)[..., None], 0.0))
    return (probs @ vd).transpose(1, 2), lse


def reference_varlen(q, k, v, cu_seqlens_q, cu_seqlens_k, causal=False, **kwargs):
    """Packed documents one by one: q (total_q, H, D); flash-attn's bottom-right alignment
    per document. Returns (out (total_q, H, D), lse (H, total_q)) in float64."""
    outs, lses = [], []
    bounds_q, bounds_k = cu_seqlens_q.tolist(), cu_seqlens_k.tolist()
    for (q0, q1), (k0, k1) in zip(zip(bounds_q, bounds_q[1:]), zip(bounds_k, bounds_k[1:])):
        out, lse = reference_attention(q[None, q0:q1], k[None, k0:k1], v[None, k0:k1], causal=causal,
                                       q_start=(k1 - k0) - (q1 - q0), **kwargs)
        outs.append(out[0])
        lses.append(lse[0])
    return torch.cat(outs), torch.cat(lses, dim=-1)


def reference_merge(outs, lses):
    """float64 merge of N partials stacked on dim 0: outs (N, B, S, H, D), lses (N, B, H, S).

    An lse of +inf or -inf is an empty partial; rows with no non-empty partial give (0, -inf).
    """
    lses = lses.double().masked_fill(lses == float("inf"), float("-inf"))
    lse = torch.logsumexp(lses, dim=0)
    weights = torch.exp(lses - lse.masked_fill(torch.isinf(lse), 0.0))  # 0 for empty partials
    return (outs.double() * weights.transpose(-1, -2)[..., None]).sum(dim=0), lse


def sdpa_with_grads(q, k, v, dout, causal):
    """[out, dq, dk, dv] of torch SDPA on flash-layout (B, S, H, D) inputs (GQA allowed)."""
    q, k, v = (t.detach().clone().requires_grad_() for t in (q, k, v))
    out = torch.nn.functional.scaled_dot_product_attention(
        q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), is_causal=causal, enable_gqa=True).transpose(1, 2)
    return [out.detach(), *torch.autograd.grad(out, (q, k, v), dout)]


def rel_err(x, ref, floor=0.0):
    """Relative Frobenius error ||x - ref|| / ||ref|| over the finite reference entries.

    ``floor`` is an RMS value below which the reference counts as "zero": the
    denominator is at least floor * sqrt(n), so a gradient that is exactly zero in
    theory (e.g. dq when each row sees one key) is compared absolutely instead of
    dividing rounding noise by rounding noise.
    """
    x, ref = x.double(), ref.double()
    finite = torch.isfinite(ref)
    num = (x[finite] - ref[finite]).norm()
    den = max(ref[finite].norm().item(), floor * max(1, int(finite.sum())) ** 0.5)
    return num.item() / den if den > 0 else num.item()


def devices():
    return ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
