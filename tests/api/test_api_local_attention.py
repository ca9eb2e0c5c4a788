"""Sliding windows, logit softcap and attention sinks on one device, against the float64
reference with an explicit mask: forward, lse and the gradients of q, k, v and sinks."""
import pytest
import torch

import cpattn
from reference import reference_attention, rel_err

FWD_TOL, GRAD_TOL, FLOOR = 1e-4, 1e-3, 1e-2


def _inputs(seqlen_q, seqlen_k, heads=4, heads_kv=2, head_dim=40, scale=1.0, seed=0):
    gen = torch.Generator().manual_seed(seed)
    q = torch.randn(2, seqlen_q, heads, head_dim, generator=gen) * scale
    k = torch.randn(2, seqlen_k, heads_kv, head_dim, generator=gen) * scale
    v = torch.randn(2, seqlen_k, heads_kv, head_dim, generator=gen)
    dout = torch.randn(2, seqlen_q, heads, head_dim, generator=gen)
    return q, k, v, dout


def _check(q, k, v, dout, sinks=None, **kw):
    leaves = [t.clone().requires_grad_() for t in (q, k, v)] + ([sinks.clone().requires_grad_()] if sinks is not None else [])
    out, lse = cpattn.flash_attn_func(*leaves[:3], sinks=leaves[3] if sinks is not None else None,
                                      return_lse=True, **kw)
    grads = torch.autograd.grad(out, leaves, dout)
    ref_leaves = [t.double().requires_grad_() for t in leaves]
    causal = kw.pop("causal", False)
    ref_out, ref_lse = reference_attention(*ref_leaves[:3], causal=causal, q_start=k.shape[1] - q.shape[1],
                                           sinks=ref_leaves[3] if sinks is not None else None, **kw)
    ref_grads = torch.autograd.grad(ref_out, ref_leaves, dout.double())
    assert rel_err(out, ref_out) < FWD_TOL
    assert torch.equal(torch.isinf(lse), torch.isinf(ref_lse)) and rel_err(lse, ref_lse) < FWD_TOL
    for got, want in zip(grads, ref_grads):
        assert rel_err(got, want, floor=FLOOR) < GRAD_TOL


# (Sq, Sk, window, causal): windows 0, 1, 17, 64, wider than the sequence, asymmetric, with and without causal
WINDOWS = [
    (77, 77, (0, 0), False),
    (77, 77, (1, 1), False),
    (129, 129, (17, -1), True),
    (77, 129, (64, 3), False),
    (129, 77, (5, 40), False),
    (70, 70, (300, 300), False),
    (70, 70, (-1, 17), False),
    (33, 100, (17, 0), True),
    (1, 77, (7, -1), True),
]


@pytest.mark.parametrize("seqlen_q,seqlen_k,window,causal", WINDOWS, ids=lambda x: str(x))
def test_sliding_window_matches_reference(seqlen_q, seqlen_k, window, causal):
    _check(*_inputs(seqlen_q, seqlen_k), window_size=window, causal=causal)


@pytest.mark.parametrize("softcap", [30.0, 50.0])
def test_softcap_with_large_logits(softcap):
    # scale 4: raw scores reach several hundred, so the cap really bends them
    q, k, v, dout = _inputs(65, 90, scale=4.0)
    _check(q, k, v, dout, softcap=softcap, causal=True)
    uncapped = cpattn.flash_attn_func(q, k, v, causal=True)
    assert rel_err(cpattn.flash_attn_func(q, k, v, causal=True, softcap=softcap), uncapped) > 1e-2


@pytest.mark.parametrize("sink_value", [-3.0, 0.5, 40.0])
def test_sinks_small_large_and_dominant(sink_value):
    q, k, v, dout = _inputs(50, 70)
    sinks = torch.full((4,), sink_value) + torch.arange(4.0) * 0.3
    _check(q, k, v, dout, sinks=sinks, causal=True)
    if sink_value == 40.0:  # the sink takes nearly all the probability mass
        assert cpattn.flash_attn_func(q, k, v, sinks=sinks).abs().max() < 1e-10


def test_all_three_together_and_through_sdpa():
    q, k, v, dout = _inputs(60, 60)
    sinks = torch.linspace(-1, 1, 4)
    _check(q, k, v, dout, sinks=sinks, softcap=20.0, window_size=(9, 0), causal=True)
    sdpa = cpattn.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2),
                                               enable_gqa=True, window_size=(9, 0), softcap=20.0, sinks=sinks)
    ref, _ = reference_attention(q, k, v, window_size=(9, 0), softcap=20.0, sinks=sinks)
    assert rel_err(sdpa.transpose(1, 2), ref) < FWD_TOL


def test_window_skips_invisible_blocks():
    """A window narrower than a tile visits only the blocks around the diagonal: the result
    with garbage (NaN) keys far outside every window is unaffected."""
    q, k, v, _ = _inputs(128, 128)
    k_bad, v_bad = k.clone(), v.clone()
    k_bad[:, :32] = float("nan")  # keys 0..31: outside the window of queries 96..127
    v_bad[:, :32] = float("nan")
    out = cpattn.flash_attn_func(q[:, 96:], k_bad, v_bad, window_size=(8, 0), causal=True)
    ref = cpattn.flash_attn_func(q[:, 96:], k, v, window_size=(8, 0), causal=True)
    assert torch.isfinite(out).all() and torch.equal(out, ref)


@pytest.mark.parametrize("kwargs,exc,match", [
    ({"window_size": (-2, 0)}, ValueError, "window_size left must be >= 0, or -1"),
    ({"window_size": (3,)}, TypeError, "pair"),
    ({"window_size": (1.5, 0)}, TypeError, "must be an int"),
    ({"softcap": -1.0}, ValueError, "softcap must be a finite value >= 0"),
    ({"softcap": "30"}, TypeError, "softcap must be a float"),
    ({"sinks": torch.zeros(3)}, ValueError, r"sinks must have shape \(4,\)"),
    ({"sinks": torch.zeros(4, dtype=torch.int32)}, TypeError, "sinks must be float32"),
    ({"sinks": [0.0] * 4}, TypeError, "sinks must be a tensor"),
])
def test_bad_local_attention_arguments(kwargs, exc, match):
    q, k, v, _ = _inputs(8, 8)
    with pytest.raises(exc, match=match):
        cpattn.flash_attn_func(q, k, v, **kwargs)
