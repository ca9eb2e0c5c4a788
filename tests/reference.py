"""Float64 reference attention for the tests, in flash layout (B, S, H, D).

Causality uses the global-position rule of DESIGN.md: key j (position
k_start + j) is visible to query i (position q_start + i) iff
k_start + j <= q_start + i. Rows with no visible key give out 0, lse -inf.
"""
import math

import torch


def reference_attention(q, k, v, softmax_scale=None, causal=False, q_start=0, k_start=0):
    """Returns (out (B, Sq, H, D) float64, lse (B, H, Sq) float64); differentiable."""
    scale = 1.0 / math.sqrt(q.shape[-1]) if softmax_scale is None else softmax_scale
    group = q.shape[2] // k.shape[2]
    qd = q.double().transpose(1, 2)
    kd = k.double().transpose(1, 2).repeat_interleave(group, dim=1)
    vd = v.double().transpose(1, 2).repeat_interleave(group, dim=1)
    scores = qd @ kd.transpose(-1, -2) * scale
    if causal:
        q_pos = q_start + torch.arange(q.shape[1], device=q.device)
        k_pos = k_start + torch.arange(k.shape[1], device=q.device)
        scores = scores.masked_fill(k_pos[None, :] > q_pos[:, None], float("-inf"))
    lse = torch.logsumexp(scores, dim=-1)
    probs = torch.exp(scores - lse[..., None].masked_fill(torch.isinf(lse)[..., None], 0.0))
    return (probs @ vd).transpose(1, 2), lse


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
