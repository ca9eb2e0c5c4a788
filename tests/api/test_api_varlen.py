"""Packed documents (flash_attn_varlen_func and its packed variants) against per-document
float64 attention: forward, lse, gradients, GQA, causal and not, empty documents, and bad
cu_seqlens."""
import pytest
import torch

import cpattn
from reference import reference_varlen, rel_err


def _packed(lens_q, lens_k, heads=4, heads_kv=2, head_dim=40, seed=0):
    gen = torch.Generator().manual_seed(seed)
    cu_q = torch.tensor([0] + torch.tensor(lens_q).cumsum(0).tolist(), dtype=torch.int32)
    cu_k = torch.tensor([0] + torch.tensor(lens_k).cumsum(0).tolist(), dtype=torch.int32)
    q = torch.randn(int(cu_q[-1]), heads, head_dim, generator=gen)
    k = torch.randn(int(cu_k[-1]), heads_kv, head_dim, generator=gen)
    v = torch.randn(int(cu_k[-1]), heads_kv, head_dim, generator=gen)
    return q, k, v, cu_q, cu_k


# documents of length 1, 7, 64, 129, 300 mixed, empty ones (repeats in cu_seqlens), q shorter/longer than k
PACKINGS = [
    ([1, 7, 64, 129, 300], [1, 7, 64, 129, 300]),
    ([7, 0, 64, 0], [7, 0, 64, 0]),
    ([5, 40, 1], [17, 40, 70]),
    ([30, 3], [10, 0]),
]


@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("lens_q,lens_k", PACKINGS, ids=lambda x: str(x))
def test_varlen_matches_per_document_attention(lens_q, lens_k, causal):
    q, k, v, cu_q, cu_k = _packed(lens_q, lens_k)
    leaves = [t.clone().requires_grad_() for t in (q, k, v)]
    out, lse, _ = cpattn.flash_attn_varlen_func(*leaves, cu_q, cu_k, max(lens_q) + 3, max(lens_k) + 3,
                                                causal=causal, return_attn_probs=True)
    assert out.shape == q.shape and lse.shape == (q.shape[1], q.shape[0]) and lse.dtype == torch.float32
    dout = torch.randn_like(out)
    grads = torch.autograd.grad(out, leaves, dout)
    ref_leaves = [t.double().requires_grad_() for t in (q, k, v)]
    ref_out, ref_lse = reference_varlen(*ref_leaves, cu_q, cu_k, causal=causal)
    ref_grads = torch.autograd.grad(ref_out, ref_leaves, dout.double())
    assert rel_err(out, ref_out) < 1e-4
    assert torch.equal(torch.isinf(lse), torch.isinf(ref_lse)) and rel_err(lse, ref_lse) < 1e-4
    for got, want in zip(grads, ref_grads):
        assert rel_err(got, want, floor=1e-2) < 1e-3


def test_varlen_with_window_softcap_and_packed_variants():
    q, k, v, cu, _ = _packed([20, 45, 9], [20, 45, 9], heads=2, heads_kv=2)
    kw = dict(causal=True, window_size=(6, 0), softcap=10.0)
    out = cpattn.flash_attn_varlen_func(q, k, v, cu, cu, 45, 45, **kw)
    ref, _ = reference_varlen(q, k, v, cu, cu, causal=True, window_size=(6, 0), softcap=10.0)
    assert rel_err(out, ref) < 1e-4
    qkv = torch.stack([q, k, v], dim=1)
    assert torch.equal(cpattn.flash_attn_varlen_qkvpacked_func(qkv, cu, 45, **kw), out)
    assert torch.equal(cpattn.flash_attn_varlen_kvpacked_func(q, qkv[:, 1:], cu, cu, 45, 45, **kw), out)


@pytest.mark.parametrize("cu_q,max_q,exc,match", [
    (torch.tensor([1, 5, 10], dtype=torch.int32), 5, ValueError, "must start at 0"),
    (torch.tensor([0, 6, 5, 10], dtype=torch.int32), 6, ValueError, "non-decreasing"),
    (torch.tensor([0, 5, 9], dtype=torch.int32), 5, ValueError, "ends at 9 but there are 10 tokens"),
    (torch.tensor([0, 5, 10], dtype=torch.int64), 5, TypeError, "must be int32"),
    (torch.tensor([0, 2, 10], dtype=torch.int32), 5, ValueError, "longer than max_seqlen 5"),
    ([0, 5, 10], 5, TypeError, "must be an int32 tensor"),
])
def test_bad_cu_seqlens(cu_q, max_q, exc, match):
    q, k, v, _, cu_k = _packed([5, 5], [5, 5])
    with pytest.raises(exc, match=match):
        cpattn.flash_attn_varlen_func(q, k, v, cu_q, cu_k, max_q, 5)


def test_varlen_refuses_mismatched_documents_and_packed_keys_with_block_table():
    q, k, v, cu, _ = _packed([5, 5], [5, 5])
    with pytest.raises(ValueError, match="2 documents but cu_seqlens_k 1"):
        cpattn.flash_attn_varlen_func(q, k, v, cu, torch.tensor([0, 10], dtype=torch.int32), 5, 10)
    # With a block table k and v are a page pool (tests/api/test_api_flash_kvcache.py), not packed keys.
    with pytest.raises(ValueError, match=r"k must be 4-D \(num_blocks, page_block_size"):
        cpattn.flash_attn_varlen_func(q, k, v, cu, cu, 5, 5, block_table=torch.zeros(2, 1, dtype=torch.int32))
