"""Helpers the tests share: error measures, torch SDPA with gradients, the devices to run on.

The float64 reference attention itself is ``cpattn.kernels.reference`` (one reference for
tests, benchmarks and docs); its functions are re-exported here so that every test file
imports its helpers from one module.
"""
import torch

from cpattn.kernels.reference import (reference_attention, reference_decode, reference_merge,  # noqa: F401
                                      reference_varlen)


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
