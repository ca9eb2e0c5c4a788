"""torch.compile(fullgraph=True) traces through cpattn (the kernels are custom operators),
the operators pass torch.library.opcheck, their fake implementations give the real layouts,
and every single-device entry point compiles with inductor, forward and backward, equal to
eager. (Context parallelism under torch.compile: test_cp_compile.py.)"""
import pytest
import torch

import cpattn
from cpattn import ops
from fake_check import FakeMatchesReal


@pytest.fixture(autouse=True)
def fresh_dynamo():
    """Each test compiles its own functions: no cache entry or recompile count carries over."""
    yield
    torch._dynamo.reset()


def _opcheck_inputs():
    gen = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(1, 9, 2, 16, generator=gen, requires_grad=True) for _ in range(3))
    return q, k, v


@pytest.mark.parametrize("window,softcap,with_sinks", [((-1, 0), 0.0, False), ((3, 2), 5.0, True)])
def test_opcheck_forward_op(window, softcap, with_sinks):
    q, k, v = _opcheck_inputs()
    sinks = torch.zeros(2, requires_grad=True) if with_sinks else None
    args = (q, k, v, 0.25, *window, 0, 0, softcap, sinks, None, None, None, None, 0, 0)
    torch.library.opcheck(ops.attention_fwd, args)


def test_opcheck_backward_and_row_stats_ops():
    q, k, v = (t.detach() for t in _opcheck_inputs())
    out, lse = ops.attention_fwd(q, k, v, 0.25, -1, 0, 0, 0, 0.0, None, None, None, None, None, 0, 0)
    dout = torch.randn_like(out)
    # What autograd runs: delta and the base-2 lse from one pass, passed on to the backward.
    torch.library.opcheck(ops.attention_row_stats, (out, dout, lse))
    delta, lse_log2 = ops.attention_row_stats(out, dout, lse)
    torch.testing.assert_close(delta, (out.double() * dout.double()).sum(-1).transpose(1, 2).float(),
                               rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(lse_log2, lse * 1.4426950408889634, rtol=0, atol=0)
    for flags in ((True, True), (True, False), (False, True)):
        torch.library.opcheck(ops.attention_bwd, (dout, q, k, v, out, delta, lse, 0.25, -1, 0, 0, 0, 0.0,
                                                   None, None, None, None, 0, 0, *flags))
    torch.library.opcheck(ops.attention_bwd, (dout, q, k, v, out, delta, lse, 0.25, -1, 0, 0, 0, 0.0,
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


def _entry_point_inputs():
    """Leaves for ``_every_entry_point``: odd lengths (7, 12, 40), head dims 32 and 40, q shorter and
    longer than kv, MHA, GQA and MQA."""
    gen = torch.Generator().manual_seed(0)

    def leaf(*shape):
        return torch.randn(*shape, generator=gen).requires_grad_()
    return {
        "sdpa_q": leaf(1, 4, 40, 32), "sdpa_k": leaf(1, 4, 40, 32), "sdpa_v": leaf(1, 4, 40, 32),
        "q7": leaf(1, 7, 4, 40), "k12": leaf(1, 12, 2, 40), "v12": leaf(1, 12, 2, 40),
        "q12": leaf(2, 12, 4, 40), "k7": leaf(2, 7, 2, 40), "v7": leaf(2, 7, 2, 40), "sinks": leaf(4),
        "qkv": leaf(1, 12, 3, 4, 40), "kv_mqa": leaf(1, 12, 2, 1, 40),
        "packed_q": leaf(12, 4, 40), "packed_qkv": leaf(12, 3, 4, 40), "packed_kv": leaf(12, 2, 2, 40),
    }


CU_SEQLENS = torch.tensor([0, 3, 7, 12], dtype=torch.int32)  # documents of 3, 4 and 5 tokens


def _every_entry_point(x):
    """One call of each public single-device function, in the layouts it is documented for; a dict of outputs."""
    t = {name: x[name].transpose(1, 2) for name in ("q7", "k12", "v12")}  # SDPA layout as views of flash tensors
    cu = CU_SEQLENS
    out = {
        "sdpa": cpattn.scaled_dot_product_attention(x["sdpa_q"], x["sdpa_k"], x["sdpa_v"], is_causal=True) * 1.5,
        "sdpa views, gqa": cpattn.scaled_dot_product_attention(t["q7"], t["k12"], t["v12"], enable_gqa=True),
        "flash, q longer, window, sinks": cpattn.flash_attn_func(x["q12"], x["k7"], x["v7"], causal=True,
                                                                 window_size=(5, 0), sinks=x["sinks"]),
        "kvpacked, mqa, softcap": cpattn.flash_attn_kvpacked_func(x["q7"], x["kv_mqa"], softcap=3.0),
        "varlen": cpattn.flash_attn_varlen_func(x["packed_q"], x["packed_kv"][:, 0], x["packed_kv"][:, 1], cu, cu,
                                                5, 5, causal=True),
        "varlen qkvpacked": cpattn.flash_attn_varlen_qkvpacked_func(x["packed_qkv"], cu, 5),
        "varlen kvpacked": cpattn.flash_attn_varlen_kvpacked_func(x["packed_q"], x["packed_kv"], cu, cu, 5, 5,
                                                                  causal=True, window_size=(2, 1)),
    }
    out["qkvpacked"], out["qkvpacked lse"], _ = cpattn.flash_attn_qkvpacked_func(x["qkv"], causal=True,
                                                                                 return_attn_probs=True)
    return out


def _outputs_and_grads(fn, inputs):
    outs = fn(inputs)
    gen = torch.Generator().manual_seed(1)  # a weighted sum: every output element gets its own gradient
    loss = sum((o * torch.randn(o.shape, generator=gen)).sum() for o in outs.values())
    return outs, dict(zip(inputs, torch.autograd.grad(loss, list(inputs.values()))))


def test_every_entry_point_compiles_with_inductor():
    inputs = _entry_point_inputs()
    with FakeMatchesReal() as check:
        eager_outs, eager_grads = _outputs_and_grads(_every_entry_point, inputs)
    # Inductor lays its buffers out from the fake implementations: they must give the real strides.
    assert not check.mismatches, f"(operator, output, real layout, fake layout): {check.mismatches}"
    assert {"cpattn::attention_fwd", "cpattn::attention_row_stats", "cpattn::attention_bwd"} <= check.seen
    compiled = torch.compile(_every_entry_point, fullgraph=True)  # the default backend: inductor
    outs, grads = _outputs_and_grads(compiled, inputs)
    for name, want in {**eager_outs, **eager_grads}.items():
        got = outs[name] if name in eager_outs else grads[name]
        assert got.shape == want.shape, name
        torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-6, msg=lambda m: f"{name}: {m}")


@pytest.mark.parametrize("latent", [False, True], ids=["gqa", "latent"])
def test_decode_step_compiles_with_inductor(latent):
    """decode_step (one process: no collective) over a paged cache, compiled once for three steps; also
    over an MLA latent cache (one kv head of 40 whose first 32 entries are the value, v=None)."""
    gen = torch.Generator().manual_seed(2)
    batch, heads, heads_kv, head_dim, prompt = 2, 4, 1 if latent else 2, 40, 21
    layout = dict(v_head_dim=32, latent=True) if latent else {}
    caches = [cpattn.ShardedKVCache(batch, 64, heads_kv, head_dim, page_size=16, **layout) for _ in range(2)]
    prompt_q = torch.randn(batch, prompt, heads, head_dim, generator=gen)
    prompt_kv = [torch.randn(batch, prompt, heads_kv, head_dim, generator=gen) for _ in range(2)]
    if latent:
        prompt_kv[1] = None
    for cache in caches:
        cpattn.prefill(cache, prompt_q, *prompt_kv)
        cache.reserve(3)
    compiled = torch.compile(cpattn.decode_step, fullgraph=True)
    options = dict(window_size=(16, 0), softcap=10.0, sinks=torch.tensor([0.5, -1.0, 2.0, 0.0]))
    for step in range(3):
        q = torch.randn(batch, 1, heads, head_dim, generator=gen)
        k, v = (torch.randn(batch, 1, heads_kv, head_dim, generator=gen) for _ in range(2))
        v = None if latent else v
        want = cpattn.decode_step(caches[0], q, k, v, **options)
        with torch.compiler.set_stance("fail_on_recompile" if step else "default"):
            got = compiled(caches[1], q, k, v, **options)
        torch.testing.assert_close(got, want, rtol=0, atol=0)
    assert caches[1].seqlens.tolist() == [prompt + 3] * batch
    assert torch.equal(caches[0].k, caches[1].k) and torch.equal(caches[0].v, caches[1].v)
