"""Kernel-level tests: forward, backward and merge against the float64 reference,
at arbitrary global positions (the rule every context-parallel step relies on)."""
import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from cpattn.kernels import attention_backward, attention_backward_delta, attention_forward, merge_attention
from reference import devices, reference_attention, reference_merge, rel_err

FWD_TOL, GRAD_TOL = 1e-4, 1e-3
GRAD_FLOOR = 1e-2  # gradients with RMS below this count as zero (see rel_err)


def make_qkv(batch, seqlen_q, seqlen_k, heads, heads_kv, head_dim, device, dtype=torch.float32, seed=0):
    gen = torch.Generator().manual_seed(seed)
    q = torch.randn(batch, seqlen_q, heads, head_dim, generator=gen)
    k = torch.randn(batch, seqlen_k, heads_kv, head_dim, generator=gen)
    v = torch.randn(batch, seqlen_k, heads_kv, head_dim, generator=gen)
    return [t.to(device, dtype) for t in (q, k, v)]


# (seqlen_q, seqlen_k, q_start, k_start): ring-step-like offsets, chunks in the past,
# in the future, straddling the diagonal, and a query chunk before all keys.
POSITION_CASES = [
    (64, 64, 64, 0),     # keys entirely in the past: no mask needed
    (64, 64, 0, 64),     # keys entirely in the future: nothing visible
    (77, 50, 30, 10),    # straddles the diagonal
    (33, 129, 100, 0),   # query chunk inside a long key range
    (50, 17, 200, 500),  # keys in the future again, odd sizes
    (1, 40, 39, 0),      # one decode-like row
]


@pytest.mark.parametrize("device", devices())
@pytest.mark.parametrize("seqlen_q,seqlen_k,q_start,k_start", POSITION_CASES)
def test_forward_backward_at_global_positions(device, seqlen_q, seqlen_k, q_start, k_start):
    q, k, v = make_qkv(2, seqlen_q, seqlen_k, 4, 2, 32, device)
    ref_out, ref_lse = reference_attention(q, k, v, causal=True, q_start=q_start, k_start=k_start)
    out, lse = attention_forward(q, k, v, causal=True, q_start=q_start, k_start=k_start)
    assert rel_err(out, ref_out) < FWD_TOL
    assert rel_err(lse, ref_lse) < FWD_TOL
    # rows with no visible key: lse -inf exactly, out exactly 0
    empty = torch.isinf(ref_lse)
    assert torch.equal(torch.isinf(lse), empty)
    assert (out.transpose(1, 2)[empty] == 0).all()

    qd, kd, vd = (t.double().requires_grad_() for t in (q, k, v))
    ref_out, _ = reference_attention(qd, kd, vd, causal=True, q_start=q_start, k_start=k_start)
    dout = torch.randn_like(out)
    ref_grads = torch.autograd.grad(ref_out, (qd, kd, vd), dout.double())
    grads = attention_backward(dout, q, k, v, out, lse, causal=True, q_start=q_start, k_start=k_start)
    for got, want in zip(grads, ref_grads):
        assert torch.isfinite(got).all()
        assert rel_err(got, want, floor=GRAD_FLOOR) < GRAD_TOL


@pytest.mark.parametrize("device", devices())
# 48: pointer tiles, both epilogues fused; 128: the forward's fused epilogue through tensor descriptors, the
# backward's add outside; 160: both above their fused-accumulate bounds, merged outside
@pytest.mark.parametrize("head_dim", [48, 128, 160])
def test_forward_accumulate_and_backward_accumulate(device, head_dim):
    """Two calls on disjoint key ranges, accumulated in place, equal one call on all keys."""
    q, k, v = make_qkv(1, 70, 90, 4, 1, head_dim, device)
    full_out, full_lse = attention_forward(q, k, v, causal=True, q_start=40)
    out = torch.zeros(q.shape, dtype=torch.float32, device=device)
    lse = torch.full((1, 4, 70), float("-inf"), device=device)
    for lo, hi in [(50, 90), (0, 50)]:
        attention_forward(q, k[:, lo:hi], v[:, lo:hi], causal=True, q_start=40, k_start=lo,
                          out=out, lse=lse, accumulate=True)
    assert rel_err(out, full_out) < FWD_TOL and rel_err(lse, full_lse) < FWD_TOL

    dout = torch.randn_like(q)
    full_grads = attention_backward(dout, q, k, v, full_out, full_lse, causal=True, q_start=40)
    dq = torch.zeros_like(q)
    dk, dv = torch.zeros_like(k), torch.zeros_like(v)
    for lo, hi in [(0, 50), (50, 90)]:
        attention_backward(dout, q, k[:, lo:hi], v[:, lo:hi], full_out, full_lse, causal=True, q_start=40,
                           k_start=lo, dq=dq, dk=dk[:, lo:hi], dv=dv[:, lo:hi], accumulate=True)
    for got, want in zip((dq, dk, dv), full_grads):
        assert rel_err(got, want, floor=GRAD_FLOOR) < GRAD_TOL


@pytest.mark.parametrize("device", devices())
@pytest.mark.parametrize("pieces", [1, 2, 3, 5, 8])
@pytest.mark.parametrize("causal", [False, True])
def test_merge_of_key_pieces_equals_full_attention(device, pieces, causal):
    seqlen_q, seqlen_k = 45, 100
    q, k, v = make_qkv(2, seqlen_q, seqlen_k, 3, 3, 40, device, seed=pieces)
    # uneven cut points, including empty pieces at both ends and in the middle
    gen = torch.Generator().manual_seed(pieces)
    inner = sorted(torch.randint(0, seqlen_k + 1, (pieces - 1,), generator=gen).tolist())
    if pieces >= 3:
        inner[1] = inner[0]  # an empty piece
    cuts = [0] + inner + [seqlen_k]
    out, lse = None, None
    for lo, hi in zip(cuts[:-1], cuts[1:]):
        o, l = attention_forward(q, k[:, lo:hi], v[:, lo:hi], causal=causal, q_start=seqlen_k - seqlen_q, k_start=lo)
        out, lse = (o, l) if out is None else merge_attention(out, lse, o, l)
    ref_out, ref_lse = reference_attention(q, k, v, causal=causal, q_start=seqlen_k - seqlen_q)
    assert rel_err(out, ref_out) < FWD_TOL
    assert rel_err(lse, ref_lse) < FWD_TOL


@pytest.mark.parametrize("device", devices())
def test_merge_inplace_and_empty_partials(device):
    out_a = torch.randn(1, 20, 2, 16, device=device)
    lse_a = torch.randn(1, 2, 20, device=device)
    out_b = torch.randn_like(out_a)
    lse_b = torch.randn_like(lse_a)
    # make some rows empty in a, some in b, some in both
    lse_a[:, :, :5] = float("-inf")
    out_a.transpose(1, 2)[:, :, :5] = 0
    lse_b[:, :, 3:8] = float("-inf")
    out_b.transpose(1, 2)[:, :, 3:8] = 0
    a_copy, la_copy = out_a.clone(), lse_a.clone()
    b_copy, lb_copy = out_b.clone(), lse_b.clone()

    out, lse = merge_attention(out_a, lse_a, out_b, lse_b)
    assert torch.equal(out_a, a_copy) and torch.equal(lse_a, la_copy), "out-of-place merge modified its input"
    assert torch.equal(out_b, b_copy) and torch.equal(lse_b, lb_copy)
    expect_lse = torch.logaddexp(lse_a, lse_b)
    w_a = torch.exp(lse_a - expect_lse).nan_to_num(0.0).transpose(1, 2)[..., None]
    w_b = torch.exp(lse_b - expect_lse).nan_to_num(0.0).transpose(1, 2)[..., None]
    expect_out = out_a * w_a + out_b * w_b
    assert not torch.isnan(out).any() and not torch.isnan(lse).any()
    assert torch.isinf(lse[:, :, 3:5]).all() and (out[:, 3:5] == 0).all(), "two empty partials must stay empty"
    torch.testing.assert_close(lse, expect_lse)
    torch.testing.assert_close(out, expect_out)

    out2, lse2 = merge_attention(out_a, lse_a, out_b, lse_b, inplace=True)
    assert out2.data_ptr() == out_a.data_ptr() and lse2.data_ptr() == lse_a.data_ptr()
    torch.testing.assert_close(out_a, expect_out)
    torch.testing.assert_close(lse_a, expect_lse)


@pytest.mark.parametrize("device", devices())
def test_merge_reads_plus_inf_as_empty(device):
    """+inf is the empty-row marker of flash-attn and vLLM: such a row adds nothing (as vLLM reads it), never NaN."""
    gen = torch.Generator().manual_seed(3)
    outs, lses = torch.randn(2, 1, 12, 2, 8, generator=gen), torch.randn(2, 1, 2, 12, generator=gen)
    lses[0, :, :, :4] = float("inf")  # a empty by +inf ...
    lses[1, :, :, 2:6] = float("inf")  # ... b too, both in rows 2, 3
    lses[1, :, :, 6:8] = float("-inf")  # and -inf with +inf in the same merge
    lses[0, :, :, 7] = float("inf")
    outs, lses = outs.to(device), lses.to(device)
    out, lse = merge_attention(outs[0], lses[0], outs[1], lses[1])
    ref_out, ref_lse = reference_merge(outs, lses)
    assert not out.isnan().any() and not lse.isnan().any()
    assert (lse[..., 2:4] == float("-inf")).all() and (lse[..., 7] == float("-inf")).all()
    assert (out[:, 2:4] == 0).all() and (out[:, 7] == 0).all()
    torch.testing.assert_close(lse.double(), ref_lse)
    torch.testing.assert_close(out.double(), ref_out)


@pytest.mark.parametrize("device", devices())
def test_merge_rounds_bfloat16_to_nearest(device):
    """A bf16 out is the fp32 result rounded to nearest even (the GPU's cvt.rn), on CPU too; truncating
    it instead would differ in this data."""
    gen = torch.Generator().manual_seed(4)
    outs = torch.randn(2, 1, 64, 2, 32, generator=gen).bfloat16().to(device)
    lses = torch.randn(2, 1, 2, 64, generator=gen).to(device)
    out, lse = merge_attention(outs[0], lses[0], outs[1], lses[1])
    out32, lse32 = merge_attention(outs[0].float(), lses[0], outs[1].float(), lses[1])
    truncated = (out32.view(torch.int32) & -65536).view(torch.float32).bfloat16()  # the low 16 bits dropped
    assert out.dtype == torch.bfloat16 and not torch.equal(truncated, out32.bfloat16())
    assert torch.equal(out, out32.bfloat16())
    assert torch.equal(lse, lse32)


def test_merge_rejects_bad_partials():
    out = torch.zeros(1, 4, 2, 8)
    lse = torch.zeros(1, 2, 4)
    with pytest.raises(ValueError, match="lse must have shape"):
        merge_attention(out, lse.transpose(1, 2), out, lse)
    with pytest.raises(TypeError, match="float32"):
        merge_attention(out, lse.double(), out, lse)
    with pytest.raises(ValueError, match="differ in shape"):
        merge_attention(out, lse, torch.zeros(1, 4, 2, 4), lse)


@settings(max_examples=25, deadline=None)
@given(seqlen=st.integers(1, 40), head_dim=st.sampled_from([8, 16, 24, 64]),
       empty_a=st.floats(0.0, 1.0), empty_b=st.floats(0.0, 1.0), seed=st.integers(0, 2**16))
def test_merge_is_commutative_and_matches_logaddexp(seqlen, head_dim, empty_a, empty_b, seed):
    gen = torch.Generator().manual_seed(seed)
    out_a, out_b = (torch.randn(1, seqlen, 2, head_dim, generator=gen) for _ in range(2))
    lse_a, lse_b = (torch.randn(1, 2, seqlen, generator=gen) * 20 for _ in range(2))
    lse_a[torch.rand(lse_a.shape, generator=gen) < empty_a] = float("-inf")
    lse_b[torch.rand(lse_b.shape, generator=gen) < empty_b] = float("-inf")
    out_ab, lse_ab = merge_attention(out_a, lse_a, out_b, lse_b)
    out_ba, lse_ba = merge_attention(out_b, lse_b, out_a, lse_a)
    assert not torch.isnan(out_ab).any() and not torch.isnan(lse_ab).any()
    torch.testing.assert_close(lse_ab, torch.logaddexp(lse_a, lse_b))
    torch.testing.assert_close(out_ab, out_ba)
    torch.testing.assert_close(lse_ab, lse_ba)


def test_accumulate_without_buffers_is_refused():
    q = torch.randn(1, 4, 1, 16)
    with pytest.raises(ValueError, match="running out and lse"):
        attention_forward(q, q, q, accumulate=True)
    with pytest.raises(ValueError, match="dq, dk and dv"):
        attention_backward(q, q, q, q, q, torch.zeros(1, 1, 4), accumulate=True)


def test_backward_reads_delta_through_strides():
    """A row slice of a longer delta (as the ring backward passes) gives the same gradients."""
    q, k, v = make_qkv(1, 40, 30, 2, 1, 16, "cpu")
    dout = torch.randn_like(q)
    out, lse = attention_forward(q, k, v, causal=True, q_start=20)
    expected = attention_backward(dout, q, k, v, out, lse, causal=True, q_start=20)
    wide = torch.randn(1, 2, 70)  # garbage around the rows that matter
    wide[:, :, 10:50] = attention_backward_delta(out, dout)
    got = attention_backward(dout, q, k, v, out, lse, causal=True, q_start=20, delta=wide[:, :, 10:50])
    for a, b in zip(got, expected):
        torch.testing.assert_close(a, b)
    with pytest.raises(ValueError, match="delta must have lse's shape"):
        attention_backward(dout, q, k, v, out, lse, delta=wide)


def test_backward_row_stats_give_the_lse_in_base_2():
    """attention_backward_delta(out, dout, lse) also writes the lse the gradient kernels read (base 2,
    +inf for rows that saw no key, through lse's strides); the torch conversion used when only delta is
    given agrees bit for bit, and the gradients are the same whichever of the two the caller passes."""
    from cpattn.kernels.flash_bwd import lse_in_base_2
    q, k, v = make_qkv(1, 40, 30, 2, 1, 16, "cpu")
    dout = torch.randn_like(q)
    out, lse = attention_forward(q, k, v, causal=True, q_start=-5)  # rows 0-4 see no key: lse -inf
    assert torch.isneginf(lse[:, :, :5]).all() and torch.isfinite(lse[:, :, 5:]).all()
    wide = torch.randn(1, 2, 70)
    wide[:, :, 10:50] = lse
    delta, lse_log2 = attention_backward_delta(out, dout, wide[:, :, 10:50])
    assert torch.equal(delta, attention_backward_delta(out, dout))
    assert torch.isposinf(lse_log2[:, :, :5]).all()
    assert torch.equal(lse_log2, lse_in_base_2(lse))
    torch.testing.assert_close(lse_log2[:, :, 5:], lse[:, :, 5:].double() / math.log(2), check_dtype=False)
    expected = attention_backward(dout, q, k, v, out, lse, causal=True, q_start=-5)
    for given in ({"delta": delta}, {"lse_log2": lse_log2}, {"delta": delta, "lse_log2": lse_log2}):
        got = attention_backward(dout, q, k, v, out, lse, causal=True, q_start=-5, **given)
        for a, b in zip(got, expected):
            assert torch.equal(a, b)


def test_mask_spec_host_form_is_hashable_and_runs_like_tensors():
    # The planners' form of a packed mask (tuples) compares and hashes by value, so plans can be cached by
    # mask; on a device it is the tensor form, and the kernel gives the same bits from either.
    from cpattn.kernels import MaskSpec
    host = MaskSpec(True, (3, -1)).documents((0, 2), (0, 0), (0, 5, 12), (0, 7, 14))
    again = MaskSpec(window_size=(3, 0)).documents([0, 2], [0, 0], [0, 5, 12], [0, 7, 14])
    assert host == again and hash(host) == hash(again) and host.window == (3, 0)
    assert (host.max_seqlen_q, host.max_seqlen_k) == (7, 7) and host.num_seqs(1) == 2
    assert host != MaskSpec(window_size=(2, 0)).documents((0, 2), (0, 0), (0, 5, 12), (0, 7, 14))
    dev = host.on("cpu")
    assert dev is host.on("cpu") and dev.cu_seqlens_q.dtype == torch.int32 and dev.cu_seqlens_q.tolist() == [0, 5, 12]
    assert dev == dev and dev != MaskSpec(window_size=(3, 0), q_start=dev.q_start, k_start=dev.k_start,
                                          cu_seqlens_q=dev.cu_seqlens_q.clone(), cu_seqlens_k=dev.cu_seqlens_k)
    q, k, v = (torch.randn(1, n, 2, 16, generator=torch.Generator().manual_seed(n)) for n in (12, 14, 14))
    out_host, lse_host = attention_forward(q, k, v, mask=host)
    out_dev, lse_dev = attention_forward(q, k, v, mask=dev)
    assert torch.equal(out_host, out_dev) and torch.equal(lse_host, lse_dev)
    # the planners' questions, on the same window
    assert host.sees(10, 12, 13, 20) == (False, False) and host.sees(10, 12, 7, 10) == (True, False)
    assert host.sees(10, 10, 7, 10) == (True, True)
    assert host.at(5, 2) == MaskSpec(window_size=(3, 0), q_start=5, k_start=2)
    assert host.at(5, 2, every=True).window == (-1, -1)


def test_warp_specialized_forward_configs_have_two_stages():
    """On an H200 (triton 3.6.0) every warp-specialized forward config with 3 stages returned NaN and
    every one with 2 matched SDPA (bench/results/NVIDIA_H200/fwd_configs.json): no list may hold one
    with more than 2 stages until a GPU run shows otherwise."""
    from cpattn.kernels import autotune
    for rows in autotune.SPECS["_fwd_kernel"][0].values():
        for config in rows:
            if config.kwargs.get("WARP_SPECIALIZE"):
                assert config.num_stages <= 2, config


def test_autotune_limit_keeps_the_first_distinct_tiles(monkeypatch):
    from cpattn.kernels import autotune
    configs = autotune.candidate_configs("_fwd_kernel", 128, 90)
    monkeypatch.delenv("CPATTN_AUTOTUNE", raising=False)
    assert autotune.autotune_limit() is None and autotune.limit_configs(configs, None) == configs
    monkeypatch.setenv("CPATTN_AUTOTUNE", "2")
    kept = autotune.limit_configs(configs, autotune.autotune_limit())
    tiles = [(c.kwargs["BLOCK_M"], c.kwargs["BLOCK_N"], c.num_warps) for c in kept]
    assert len(kept) == 2 and len(set(tiles)) == 2 and kept[0] is configs[0]
    # the second kept config is the first in the list with another tile
    assert kept[1] is next(c for c in configs if (c.kwargs["BLOCK_M"], c.kwargs["BLOCK_N"], c.num_warps) != tiles[0])
    for bad in ("0", "-1", "fast"):
        monkeypatch.setenv("CPATTN_AUTOTUNE", bad)
        with pytest.raises(ValueError, match="CPATTN_AUTOTUNE"):
            autotune.autotune_limit()


# The 5-GEMM backward (atomic_dq): dq summed with atomics inside the dk/dv kernel.
# (seqlen_q, seqlen_k, heads, heads_kv, head_dim, causal, q_start, window)
ATOMIC_CASES = [
    (77, 129, 4, 2, 40, True, 52, (-1, -1)),   # GQA, odd sizes, bottom-right causal
    (33, 64, 4, 1, 64, False, 0, (-1, -1)),    # MQA, q shorter than kv
    (129, 7, 2, 2, 96, True, 0, (-1, -1)),     # q longer than kv: most rows see no key
    (70, 70, 2, 1, 80, True, 0, (17, 0)),      # sliding window
]


@pytest.mark.parametrize("device", devices())
@pytest.mark.parametrize("seqlen_q,seqlen_k,heads,heads_kv,head_dim,causal,q_start,window", ATOMIC_CASES)
def test_atomic_dq_backward_matches_float64(device, seqlen_q, seqlen_k, heads, heads_kv, head_dim, causal,
                                            q_start, window):
    from cpattn.kernels import MaskSpec
    q, k, v = make_qkv(2, seqlen_q, seqlen_k, heads, heads_kv, head_dim, device, seed=seqlen_q)
    mask = MaskSpec(causal, window, q_start=q_start)
    out, lse = attention_forward(q, k, v, mask=mask, softcap=20.0 if head_dim == 80 else 0.0)
    qd, kd, vd = (t.double().requires_grad_() for t in (q, k, v))
    ref_out, _ = reference_attention(qd, kd, vd, causal=causal, q_start=q_start, window_size=window,
                                     softcap=20.0 if head_dim == 80 else 0.0)
    dout = torch.randn_like(out)
    ref_grads = torch.autograd.grad(ref_out, (qd, kd, vd), dout.double())
    grads = attention_backward(dout, q, k, v, out, lse, mask=mask, softcap=20.0 if head_dim == 80 else 0.0,
                               atomic_dq=True)
    for got, want in zip(grads, ref_grads):
        assert torch.isfinite(got).all()
        assert rel_err(got, want, floor=GRAD_FLOOR) < GRAD_TOL


@pytest.mark.parametrize("device", devices())
def test_atomic_dq_accumulates_like_the_deterministic_backward(device):
    """Ring-step use: two key pieces accumulated into fp32 buffers (dq added in place by the
    atomics) give the deterministic backward over all keys."""
    q, k, v = make_qkv(1, 50, 90, 4, 2, 32, device, seed=3)
    out, lse = attention_forward(q, k, v, causal=True, q_start=40)
    dout = torch.randn_like(q)
    expected = attention_backward(dout, q, k, v, out, lse, causal=True, q_start=40)
    dq, dk, dv = torch.zeros_like(q), torch.zeros_like(k), torch.zeros_like(v)
    for lo, hi in [(0, 50), (50, 90)]:
        attention_backward(dout, q, k[:, lo:hi], v[:, lo:hi], out, lse, causal=True, q_start=40, k_start=lo,
                           dq=dq, dk=dk[:, lo:hi], dv=dv[:, lo:hi], accumulate=True, atomic_dq=True)
    for got, want in zip((dq, dk, dv), expected):
        assert rel_err(got, want, floor=GRAD_FLOOR) < GRAD_TOL
    with pytest.raises(ValueError, match="atomic_dq=True computes dq inside the dk/dv kernel"):
        attention_backward(dout, q, k, v, out, lse, atomic_dq=True, compute_dq=False)


@pytest.mark.parametrize("device", devices())
def test_tensor_descriptor_and_pointer_forwards_agree(device, monkeypatch):
    """The forward reads through tensor descriptors where tiles.tma_compatible holds (on CPU the
    interpreter runs them) and through pointers otherwise or with CPATTN_FORWARD=pointers; one
    case per form: windows (masked edges), whole key blocks without a mask (the one-loop form,
    with its warp-specialized range) and an unaligned view (pointers)."""
    from cpattn.kernels import flash_fwd, tiles
    from cpattn.kernels.mask import MaskSpec
    q, k, v = make_qkv(1, 70, 256, 2, 1, 64, device, seed=5)
    assert tiles.tma_compatible(q, k, v) and not tiles.tma_compatible(q[..., :48], k, v)
    assert tiles.tma_compatible(q, k, v[..., :32].contiguous())  # each tensor's head dim fills its own tile
    odd = torch.randn(1, 70 * 2 * 64 + 1, device=device)[:, 1:].view(1, 70, 2, 64)  # base not 16-byte aligned
    assert not tiles.tma_compatible(odd)
    launched = []
    real_launch = flash_fwd.launch
    monkeypatch.setattr(flash_fwd, "launch", lambda kernel, grid, args, constants, *rest, **kw: (
        launched.append(constants), real_launch(kernel, grid, args, constants, *rest, **kw)))
    # (causal, window, q, the forms the tma setting takes: (TMA, EDGES))
    for causal, window, qq, form in [(True, (30, 0), q, (True, True)), (False, (-1, -1), q, (True, False)),
                                     (True, (-1, -1), odd, (False, True))]:
        mask = MaskSpec(causal, window, q_start=186)
        ref_out, ref_lse = reference_attention(qq, k, v, causal=causal, q_start=186, window_size=window)
        monkeypatch.setenv("CPATTN_FORWARD", "tma")
        got = attention_forward(qq, k, v, mask=mask)
        assert (launched[-1]["TMA"], launched[-1]["EDGES"]) == form
        monkeypatch.setenv("CPATTN_FORWARD", "pointers")
        old = attention_forward(qq, k, v, mask=mask)
        assert not launched[-1]["TMA"]
        for out, lse in (got, old):
            assert rel_err(out, ref_out) < FWD_TOL and rel_err(lse, ref_lse) < FWD_TOL
    monkeypatch.setenv("CPATTN_FORWARD", "fast")
    with pytest.raises(ValueError, match="CPATTN_FORWARD"):
        attention_forward(q, k, v)
