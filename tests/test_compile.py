"""torch.compile(fullgraph=True) traces through cpattn (the kernels are custom operators),
and the operators pass torch.library.opcheck."""
import pytest
import torch

import cpattn
from cpattn import _ops


def _opcheck_inputs():
    gen = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(1, 9, 2, 16, generator=gen, requires_grad=True) for _ in range(3))
    return q, k, v


@pytest.mark.parametrize("window,softcap,with_sinks", [((-1, 0), 0.0, False), ((3, 2), 5.0, True)])
def test_opcheck_forward_op(window, softcap, with_sinks):
    q, k, v = _opcheck_inputs()
    sinks = torch.zeros(2, requires_grad=True) if with_sinks else None
    args = (q, k, v, 0.25, *window, 0, 0, softcap, sinks, None, None, None, None, 0, 0)
    torch.library.opcheck(_ops.attention_fwd, args)


def test_opcheck_backward_and_delta_ops():
    q, k, v = (t.detach() for t in _opcheck_inputs())
    out, lse = _ops.attention_fwd(q, k, v, 0.25, -1, 0, 0, 0, 0.0, None, None, None, None, None, 0, 0)
    dout = torch.randn_like(out)
    torch.library.opcheck(_ops.attention_delta, (out, dout))
    delta = _ops.attention_delta(out, dout)
    for flags in ((True, True), (True, False), (False, True)):
        torch.library.opcheck(_ops.attention_bwd, (dout, q, k, v, out, delta, lse, 0.25, -1, 0, 0, 0, 0.0,
                                                   None, None, None, None, 0, 0, *flags))
    # What autograd runs: delta and the base-2 lse from one pass, passed on to the backward.
    torch.library.opcheck(_ops.attention_row_stats, (out, dout, lse))
    row_delta, lse_log2 = _ops.attention_row_stats(out, dout, lse)
    torch.testing.assert_close(row_delta, delta, rtol=0, atol=0)
    torch.testing.assert_close(lse_log2, lse * 1.4426950408889634, rtol=0, atol=0)
    torch.library.opcheck(_ops.attention_bwd, (dout, q, k, v, out, delta, lse, 0.25, -1, 0, 0, 0, 0.0,
                                               None, None, None, None, 0, 0, True, True, False, lse_log2))


class TinyBlock(torch.nn.Module):
    def __init__(self, dim=32, heads=2, use_sdpa=True):
        super().__init__()
        self.qkv = torch.nn.Linear(dim, 3 * dim)
        self.proj = torch.nn.Linear(dim, dim)
        self.heads, self.use_sdpa = heads, use_sdpa

    def forward(self, x):
        b, s, d = x.shape
        q, k, v = self.qkv(x).view(b, s, 3, self.heads, d // self.heads).unbind(2)
        if self.use_sdpa:
            y = cpattn.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2),
                                                    is_causal=True).transpose(1, 2)
        else:
            y = cpattn.flash_attn_func(q, k, v, causal=True, window_size=(5, 0))
        return x + self.proj(y.reshape(b, s, d))


def test_compiled_two_layer_model_matches_eager():
    torch.manual_seed(0)
    model = torch.nn.Sequential(TinyBlock(use_sdpa=True), TinyBlock(use_sdpa=False))
    x = torch.randn(2, 19, 32)
    eager_out = model(x)
    eager_grads = torch.autograd.grad(eager_out.square().sum(), list(model.parameters()))
    compiled = torch.compile(model, fullgraph=True)  # inductor
    out = compiled(x)
    grads = torch.autograd.grad(out.square().sum(), list(model.parameters()))
    torch.testing.assert_close(out, eager_out, rtol=1e-5, atol=1e-5)
    for got, want in zip(grads, eager_grads):
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)
