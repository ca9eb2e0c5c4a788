"""The drop-ins behave like the functions they replace: flash-attn 2's argument order and
returns, torch SDPA's shapes, broadcasting, value head dim, scale=0 and autocast; fp32
matmul precision settings; backward skips gradients nobody asked for; gradients through lse."""
import pytest
import torch
import torch.nn.functional as F

import cpattn
from cpattn.kernels.softmax import dot_precision
from reference import reference_attention, rel_err


def _t(*shape, seed=0):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


def test_flash_attn_func_positional_order_and_refusals():
    q, k, v = _t(1, 9, 2, 16), _t(1, 9, 2, 16, seed=1), _t(1, 9, 2, 16, seed=2)
    with pytest.raises(NotImplementedError, match="dropout_p=0.1"):
        cpattn.flash_attn_func(q, k, v, 0.1)  # flash-attn's 4th argument is dropout_p, never causal
    with pytest.raises(NotImplementedError, match="alibi_slopes"):
        cpattn.flash_attn_func(q, k, v, alibi_slopes=torch.zeros(2))
    out, lse, probs = cpattn.flash_attn_func(q, k, v, 0.0, 0.5, True, (-1, -1), 0.0, None, True, True)
    ref, ref_lse = reference_attention(q, k, v, softmax_scale=0.5, causal=True)
    assert probs is None and rel_err(out, ref) < 1e-5 and rel_err(lse, ref_lse) < 1e-5


def test_packed_variants_are_views_of_the_same_computation():
    qkv = _t(2, 13, 3, 4, 16).requires_grad_()
    out = cpattn.flash_attn_qkvpacked_func(qkv, causal=True)
    assert torch.equal(out, cpattn.flash_attn_func(qkv[:, :, 0], qkv[:, :, 1], qkv[:, :, 2], causal=True))
    out.sum().backward()
    assert qkv.grad.shape == qkv.shape and qkv.grad.abs().sum() > 0
    q, kv = _t(2, 5, 4, 16), _t(2, 13, 2, 2, 16)
    assert torch.equal(cpattn.flash_attn_kvpacked_func(q, kv), cpattn.flash_attn_func(q, kv[:, :, 0], kv[:, :, 1]))
    with pytest.raises(ValueError, match=r"\(batch, seqlen, 3, heads, headdim\)"):
        cpattn.flash_attn_qkvpacked_func(_t(2, 13, 2, 4, 16))


SDPA_SHAPES = [  # (query, key, value) shapes, enable_gqa, is_causal
    ((3, 7, 16), (3, 11, 16), (3, 11, 16), False, True),                 # 3-D: one head
    ((2, 3, 4, 7, 16), (2, 3, 2, 9, 16), (2, 3, 2, 9, 16), True, False),  # two leading dims, GQA
    ((2, 4, 7, 16), (1, 4, 9, 16), (1, 4, 9, 16), False, True),           # batch broadcasts
    ((2, 4, 7, 16), (2, 1, 9, 16), (2, 1, 9, 16), False, False),          # one kv head broadcasts
    ((2, 4, 7, 40), (2, 4, 9, 40), (2, 4, 9, 24), False, True),           # Ev < E
    ((2, 2, 7, 16), (2, 2, 9, 16), (2, 2, 9, 80), False, False),          # Ev > E
]


@pytest.mark.parametrize("shapes", SDPA_SHAPES, ids=lambda s: str(s[:3]))
def test_sdpa_shapes_like_torch(shapes):
    *shape_qkv, gqa, causal = shapes
    leaves = [_t(*s, seed=i).requires_grad_() for i, s in enumerate(shape_qkv)]
    ref_leaves = [t.detach().double().requires_grad_() for t in leaves]
    extra = {"enable_gqa": True} if gqa else {}
    out = cpattn.scaled_dot_product_attention(*leaves, is_causal=causal, **extra)
    ref = F.scaled_dot_product_attention(*ref_leaves, is_causal=causal, **extra)
    assert out.shape == ref.shape and out.dtype == leaves[0].dtype
    assert rel_err(out, ref) < 1e-5
    dout = torch.randn_like(out)
    for got, want in zip(torch.autograd.grad(out, leaves, dout), torch.autograd.grad(ref, ref_leaves, dout.double())):
        assert got.shape == want.shape and rel_err(got, want, floor=1e-2) < 1e-4


def test_sdpa_scale_zero_is_uniform_attention():
    q, k, v = _t(1, 2, 5, 16), _t(1, 2, 8, 16, seed=1), _t(1, 2, 8, 16, seed=2)
    out = cpattn.scaled_dot_product_attention(q, k, v, scale=0.0)
    assert torch.allclose(out, v.mean(dim=2, keepdim=True).expand_as(out), atol=1e-6)


def test_autocast_casts_like_torch():
    q, k, v = _t(1, 2, 9, 16), _t(1, 2, 9, 16, seed=1), _t(1, 2, 9, 16, seed=2)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        ours = cpattn.scaled_dot_product_attention(q, k, v, is_causal=True)
        theirs = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        flash = cpattn.flash_attn_func(q.transpose(1, 2), k.transpose(1, 2), v.half().transpose(1, 2))
    assert ours.dtype == theirs.dtype == flash.dtype == torch.bfloat16
    assert rel_err(ours, theirs) < 2e-2


def test_float32_matmul_precision_selects_the_dot_precision():
    before = torch.get_float32_matmul_precision()
    try:
        assert dot_precision(torch.float32) == "ieee"
        torch.set_float32_matmul_precision("high")
        assert dot_precision(torch.float32) == "tf32x3"
        torch.set_float32_matmul_precision("medium")
        assert dot_precision(torch.float32) == "tf32"
    finally:
        torch.set_float32_matmul_precision(before)
    assert dot_precision(torch.float16) == "tf32"  # ignored for fp16/bf16 inputs


def test_backward_runs_only_the_kernels_it_needs(monkeypatch):
    import cpattn.kernels.flash_bwd as bwd
    launched = []
    real_launch = bwd.launch
    monkeypatch.setattr(bwd, "launch", lambda kernel, *a, **kw: (launched.append(kernel.fn.__name__),
                                                                  real_launch(kernel, *a, **kw)))
    q = _t(1, 9, 2, 16).requires_grad_()
    k, v = _t(1, 9, 2, 16, seed=1), _t(1, 9, 2, 16, seed=2)
    cpattn.flash_attn_func(q, k, v).sum().backward()
    assert launched == ["_bwd_preprocess", "_bwd_dq_kernel"] and k.grad is None
    launched.clear()
    k.requires_grad_()
    cpattn.flash_attn_func(q.detach(), k, v).sum().backward()
    assert launched == ["_bwd_preprocess", "_bwd_dkdv_kernel"] and v.grad is None


def test_gradient_flows_through_lse():
    leaves = [_t(1, 11, 2, 16, seed=i).requires_grad_() for i in range(3)]
    out, lse = cpattn.flash_attn_func(*leaves, causal=True, return_lse=True)
    loss = (out * 0.5).sum() + (lse ** 2).sum()
    grads = torch.autograd.grad(loss, leaves)
    ref_leaves = [t.detach().double().requires_grad_() for t in leaves]
    ref_out, ref_lse = reference_attention(*ref_leaves, causal=True)
    ref_grads = torch.autograd.grad((ref_out * 0.5).sum() + (ref_lse ** 2).sum(), ref_leaves)
    for got, want in zip(grads, ref_grads):
        assert rel_err(got, want) < 1e-4
