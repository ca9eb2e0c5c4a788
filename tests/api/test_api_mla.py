"""A value head dim of its own (Dv != D, e.g. MLA's D = 192, Dv = 128) through every kernel and entry
point, against float64: the flash-attn functions, the SDPA drop-in, the custom operators' fakes, the
decode kernel and its latent form (v the keys' first columns), the simulated ring, and real gloo ranks
(ring, zigzag, Ulysses, USP). Pairs kept CPU-friendly: (40, 32), (96, 64), (192, 128) at tiny lengths,
and one with Dv > D."""
import pytest
import torch
import torch.nn.functional as F

import cpattn
from cpattn.kernels import decode as decode_module
from cpattn.kernels import decode_attention, flash_fwd
from cpattn.ring import simulate_ring_attention, simulate_ring_attention_backward
from cpattn.cp_ops import compiled_attention
from cpattn.cp_calls import AttentionArgs
from cpattn.testing import run_ranks
from fake_check import FakeMatchesReal
from reference import reference_attention, reference_decode, reference_varlen, rel_err

FWD_TOL, GRAD_TOL = 1e-4, 1e-3
GRAD_FLOOR = 1e-2  # gradients with RMS below this count as zero (see rel_err)


def _qkv(gen, batch, seqlen_q, seqlen_k, heads, heads_kv, head_dim, value_dim):
    return (torch.randn(batch, seqlen_q, heads, head_dim, generator=gen),
            torch.randn(batch, seqlen_k, heads_kv, head_dim, generator=gen),
            torch.randn(batch, seqlen_k, heads_kv, value_dim, generator=gen))


def _leaves(*tensors):
    return [t.detach().clone().requires_grad_() for t in tensors]


def _reference(q, k, v, dout, reference=reference_attention, **kwargs):
    """(out, lse, [dq, dk, dv]) of ``reference`` in float64."""
    leaves = _leaves(*(t.double() for t in (q, k, v)))
    out, lse = reference(*leaves, **kwargs)
    return out, lse, torch.autograd.grad(out, leaves, dout.double())


def _assert_close(out, lse, grads, ref_out, ref_lse, ref_grads):
    assert out.shape == ref_out.shape and rel_err(out, ref_out) < FWD_TOL
    assert rel_err(lse, ref_lse) < FWD_TOL and torch.equal(torch.isinf(lse), torch.isinf(ref_lse))
    for got, want in zip(grads, ref_grads):
        assert got.shape == want.shape and rel_err(got, want, floor=GRAD_FLOOR) < GRAD_TOL


@pytest.fixture
def launches(monkeypatch):
    """The constexprs of every forward launch: the kernels must take Dv as it is, no padded copy."""
    seen = []
    real = flash_fwd.launch
    monkeypatch.setattr(flash_fwd, "launch", lambda kernel, grid, args, constants, *rest, **kw: (
        seen.append(constants), real(kernel, grid, args, constants, *rest, **kw)))
    return seen


# (D, Dv, Sq, Sk, H, Hkv, causal): odd lengths, q shorter and longer than kv, GQA and MQA.
CASES = [
    (40, 32, 77, 129, 4, 2, True),
    (40, 32, 129, 7, 4, 1, False),
    (96, 64, 1, 77, 6, 2, True),
    (96, 64, 77, 77, 2, 2, False),
    (192, 128, 7, 17, 2, 1, True),
    (32, 48, 17, 7, 4, 2, True),  # a value head dim above the query's
]


@pytest.mark.parametrize("case", CASES, ids=lambda c: "D{}-Dv{}-{}x{}-H{}/{}-{}".format(
    *c[:6], "causal" if c[6] else "full"))
def test_flash_attn_func(case, launches):
    head_dim, value_dim, seqlen_q, seqlen_k, heads, heads_kv, causal = case
    gen = torch.Generator().manual_seed(head_dim + seqlen_q)
    batch = 1 if max(seqlen_q, seqlen_k) > 64 else 2  # the interpreter's time grows with the programs
    q, k, v = _leaves(*_qkv(gen, batch, seqlen_q, seqlen_k, heads, heads_kv, head_dim, value_dim))
    out, lse = cpattn.flash_attn_func(q, k, v, causal=causal, return_lse=True)
    assert (launches[-1]["HEAD_DIM"], launches[-1]["HEAD_DIM_V"]) == (head_dim, value_dim)
    dout = torch.randn(out.shape, generator=gen)
    grads = torch.autograd.grad(out, (q, k, v), dout)
    # flash-attn's bottom-right alignment; the scale is 1/sqrt(D), q's head dim
    _assert_close(out, lse, grads, *_reference(q, k, v, dout, causal=causal, q_start=seqlen_k - seqlen_q))


def test_5_gemm_backward_and_explicit_scale():
    """atomic_dq (dq summed in the dk/dv kernel) with a caller's scale, as MLA passes its own."""
    gen = torch.Generator().manual_seed(3)
    q, k, v = _leaves(*_qkv(gen, 1, 33, 40, 4, 2, 96, 64))
    out, lse = cpattn.flash_attn_func(q, k, v, softmax_scale=0.3, causal=True, return_lse=True, atomic_dq=True)
    dout = torch.randn(out.shape, generator=gen)
    grads = torch.autograd.grad(out, (q, k, v), dout)
    _assert_close(out, lse, grads, *_reference(q, k, v, dout, softmax_scale=0.3, causal=True, q_start=7))


def test_varlen():
    gen = torch.Generator().manual_seed(4)
    cu_q = torch.tensor([0, 1, 8, 85], dtype=torch.int32)    # documents of 1, 7 and 77 queries
    cu_k = torch.tensor([0, 7, 14, 143], dtype=torch.int32)  # ... over 7, 7 and 129 keys
    q, k, v = (t[0] for t in _qkv(gen, 1, 85, 143, 4, 2, 40, 32))
    q, k, v = _leaves(q, k, v)
    out, lse = cpattn.flash_attn_varlen_func(q, k, v, cu_q, cu_k, 77, 129, causal=True, return_lse=True)
    dout = torch.randn(out.shape, generator=gen)
    grads = torch.autograd.grad(out, (q, k, v), dout)
    _assert_close(out, lse, grads, *_reference(q, k, v, dout, reference_varlen, cu_seqlens_q=cu_q,
                                               cu_seqlens_k=cu_k, causal=True))


def test_sdpa_takes_the_value_head_dim_as_it_is(launches):
    """No zero-padded copy: the kernel gets E and Ev; torch's float64 SDPA is the reference."""
    gen = torch.Generator().manual_seed(5)
    query, key, value = (torch.randn(*shape, generator=gen) for shape in ((2, 4, 9, 40), (2, 2, 13, 40),
                                                                          (2, 2, 13, 24)))
    leaves, ref_leaves = _leaves(query, key, value), _leaves(*(t.double() for t in (query, key, value)))
    out = cpattn.scaled_dot_product_attention(*leaves, is_causal=True, enable_gqa=True)
    assert (launches[-1]["HEAD_DIM"], launches[-1]["HEAD_DIM_V"]) == (40, 24)
    ref = F.scaled_dot_product_attention(*ref_leaves, is_causal=True, enable_gqa=True)
    assert out.shape == ref.shape and rel_err(out, ref) < FWD_TOL
    dout = torch.randn(out.shape, generator=gen)
    for got, want in zip(torch.autograd.grad(out, leaves, dout), torch.autograd.grad(ref, ref_leaves, dout.double())):
        assert got.shape == want.shape and rel_err(got, want, floor=GRAD_FLOOR) < GRAD_TOL


def test_packed_variants_refuse_a_q_of_another_width():
    """kv packs k and v at one head dim: with q wider (MLA) the packed functions name the unpacked way."""
    q, kv = torch.randn(1, 5, 2, 48), torch.randn(1, 5, 2, 2, 32)
    with pytest.raises(ValueError, match="kv packs k and v with one head dim"):
        cpattn.flash_attn_kvpacked_func(q, kv)
    cu = torch.tensor([0, 5], dtype=torch.int32)
    with pytest.raises(ValueError, match="kv packs k and v with one head dim"):
        cpattn.flash_attn_varlen_kvpacked_func(q[0], kv[0], cu, cu, 5, 5)


def test_fake_implementations_give_the_real_layouts():
    """What inductor plans from: every cpattn operator's fake output layout (out with Dv) equals the real one,
    for flash layout and transposed SDPA views, forward and backward, and the decode operator."""
    gen = torch.Generator().manual_seed(6)
    q, k, v = _leaves(*_qkv(gen, 2, 9, 11, 4, 2, 40, 24))
    with FakeMatchesReal() as check:
        out = cpattn.flash_attn_func(q, k, v, causal=True)
        out.backward(torch.randn(out.shape, generator=gen))
        sdpa = cpattn.scaled_dot_product_attention(*(t.transpose(1, 2) for t in (q, k, v)), enable_gqa=True)
        sdpa.sum().backward()
        cache = torch.randn(2, 16, 2, 40, generator=gen)
        lens = torch.tensor([16, 5], dtype=torch.int32)
        for values in (cache[..., :24], torch.randn(2, 16, 2, 24, generator=gen)):
            torch.ops.cpattn.decode_attention(q[:, :1].detach(), cache, values, lens, (lens - 1)[:, None], None,
                                              None, 0.2, -1, 0, 0.0, [1, 1, 0], 1, torch.float32)
    assert not check.mismatches, f"(operator, output, real layout, fake layout): {check.mismatches}"
    assert {"cpattn::attention_fwd", "cpattn::attention_bwd", "cpattn::decode_attention"} <= check.seen
    torch.library.opcheck(cpattn.ops.attention_fwd, (q, k, v, 0.25, -1, 0, 2, 0, 0.0, None, None, None, None,
                                                      None, 0, 0))


def test_config_lists_for_two_head_dims():
    """The list of the pair of tiles where there is one (e.g. MLA's (256, 128)), else that of the wider tile;
    the shared-memory estimate counts value tiles at their own width."""
    from cpattn.kernels import autotune as tune
    for name in ("_fwd_kernel", "_bwd_dkdv_kernel", "_bwd_dq_kernel", "_decode_kernel"):
        table = tune.SPECS[name][0]
        for fam, capability in (("sm_80", 80), ("sm_90", 90)):
            for pair, wider in (((256, 128), 256), ((128, 64), 128), ((64, 128), 128), ((32, 16), 64)):
                got = tune.candidate_configs(name, pair[0], capability, "", pair[1])
                assert got is table.get((fam, pair), table[(fam, wider)]), (name, fam, pair)
            assert tune.candidate_configs(name, 256, capability, "", 256) is table[(fam, 256)]
    assert ("sm_90", (256, 128)) in tune.SPECS["_fwd_kernel"][0]
    kept = tune.keep_configs("_fwd_kernel", 256, 2, 90, 227 * 1024, {"BLOCK_DV": 128, "EDGES": True})
    assert kept == tune.SPECS["_fwd_kernel"][0][("sm_90", (256, 128))]
    config = kept[0]  # 128 x 64, 2 stages: q (128 x 256) + 2 x (k (64 x 256) + v (64 x 128)), bf16
    estimate = tune.smem_estimate("_fwd_kernel", config, 256, 2, {"BLOCK_DV": 128})
    assert estimate == 1024 + 1024 + 128 * 256 * 2 + 2 * 64 * (256 + 128) * 2
    # MLA's latent decode (576, 512): its own list, and q and k counted at the 512 + 64 columns the kernel
    # holds (one key tile, also the value tile), not at the 1024 above 576 plus a value tile.
    latent = {"BLOCK_DV": 512, "BLOCK_DR": 64, "LATENT": True}
    kept = tune.keep_configs("_decode_kernel", 1024, 2, 90, 227 * 1024, latent)
    assert kept == tune.SPECS["_decode_kernel"][0][("sm_90", (1024, 512))] and len(kept) == 4
    config = kept[0]  # 16 x 64, 2 stages: q (16 x 576) + 2 x k (64 x 576), bf16
    assert tune.smem_estimate("_decode_kernel", config, 1024, 2, latent) == 1024 + 16 * 576 * 2 + 2 * 64 * 576 * 2


def _paged(cache, page_size, gen):
    """``cache`` (B, capacity, Hkv, D) scattered into shuffled pages: (pool, block table)."""
    batch, capacity = cache.shape[:2]
    per_seq = capacity // page_size
    order = torch.randperm(batch * per_seq + 2, generator=gen)[:batch * per_seq].view(batch, per_seq)
    pool = torch.full((batch * per_seq + 2, page_size, *cache.shape[2:]), float("nan"))  # unused: never read
    pool[order.flatten()] = cache.reshape(batch * per_seq, page_size, *cache.shape[2:])
    return pool, order.to(torch.int32)


# (D, Dv, new tokens, paged, extras): the latent form and separate values of their own head dim.
DECODE_CASES = [
    (40, 32, 1, False, {}),
    (96, 64, 3, True, {"window_size": (20, 0), "softcap": 5.0}),
    (192, 128, 2, True, {"sinks": True}),
]


@pytest.mark.parametrize("case", DECODE_CASES,
                         ids=lambda c: f"D{c[0]}-Dv{c[1]}-new{c[2]}-{'paged' if c[3] else 'flat'}")
def test_decode_separate_and_latent_values(case, monkeypatch):
    head_dim, value_dim, new, paged, extras = case
    gen = torch.Generator().manual_seed(head_dim + new)
    batch, heads, heads_kv, capacity = 3, 4, 2, 48
    q = torch.randn(batch, new, heads, head_dim, generator=gen)
    k = torch.randn(batch, capacity, heads_kv, head_dim, generator=gen)
    lens = torch.tensor([new, 29, 48], dtype=torch.int32)
    if extras.get("sinks"):
        extras = {"sinks": torch.randn(heads, generator=gen)}
    launched = []
    real = decode_module.launch
    monkeypatch.setattr(decode_module, "launch", lambda kernel, grid, args, constants, *rest, **kw: (
        launched.append(constants), real(kernel, grid, args, constants, *rest, **kw)))
    # Values of their own (B, capacity, Hkv, Dv), then the latent form: the keys' first Dv columns.
    for v_of, latent in ((lambda keys: torch.randn(batch, capacity, heads_kv, value_dim, generator=gen), False),
                         (lambda keys: keys[..., :value_dim], True)):
        v = v_of(k)
        ref_out, ref_lse = reference_decode(q, k, v, lens, **extras)
        if paged:
            k_pool, table = _paged(k, 16, gen)
            v_pool = k_pool[..., :value_dim] if latent else _paged(v, 16, torch.Generator().manual_seed(0))[0]
            if not latent:  # the same page order for values as for keys
                v_pool = torch.full((k_pool.shape[0], 16, heads_kv, value_dim), float("nan"))
                v_pool[table.flatten().long()] = v.reshape(-1, 16, heads_kv, value_dim)
            out, lse = decode_attention(q, k_pool, v_pool, lens, block_table=table, **extras)
        else:
            out, lse = decode_attention(q, k, v, lens, **extras)
        assert launched[0]["LATENT"] == latent and launched[0]["HEAD_DIM_V"] == value_dim
        launched.clear()
        assert out.shape == (batch, new, heads, value_dim)
        assert rel_err(out, ref_out) < FWD_TOL and rel_err(lse, ref_lse) < FWD_TOL


@pytest.mark.parametrize("ring_impl,degree,dims", [("ring", 3, (40, 32)), ("zigzag", 2, (40, 32)),
                                                   ("zigzag", 2, (192, 128))])
def test_simulated_ring(ring_impl, degree, dims):
    """Every rank's steps in one process: the fp32 running out of Dv columns, the dk/dv of their own widths."""
    gen = torch.Generator().manual_seed(degree)
    seqlen = 77 if dims[0] < 192 else 13
    q, k, v = _qkv(gen, 1, seqlen, seqlen, 4, 2, *dims)
    out, lse = simulate_ring_attention(q, k, v, degree, ring_impl, causal=True)
    dout = torch.randn(out.shape, generator=gen)
    grads = simulate_ring_attention_backward(dout, q, k, v, out, lse, degree, ring_impl, causal=True)
    _assert_close(out, lse, grads, *_reference(q, k, v, dout, causal=True))


SEQ_LEN = 29  # uneven shards on 2 and 4 ranks: padded ring messages and Ulysses parts


def _ranks_run(rank, world_size):
    """Every algorithm for this world size on one process group; errors against float64 per algorithm
    (out, lse, dq, dk, dv) and whether the output has v's head dim. "... op": the custom operators
    torch.compile calls (their backward sends dout, q, k, v and out, of two head dims, through one
    all-to-all), with their fake implementations checked against the real layouts."""
    algorithms = [("ring", 1, "ring"), ("zigzag", 1, "zigzag"), ("ulysses", world_size, "zigzag")]
    if world_size == 4:
        algorithms.append(("usp", 2, "ring"))
    gen = torch.Generator().manual_seed(11)
    q, k, v = _qkv(gen, 1, SEQ_LEN, SEQ_LEN, 4, 2, 40, 32)
    dout = torch.randn(1, SEQ_LEN, 4, 32, generator=gen)
    ref_out, ref_lse, ref_grads = _reference(q, k, v, dout, causal=True)
    errors, layouts = {}, []
    for i, (name, degree, ring_impl) in enumerate(algorithms):
        with cpattn.ContextParallel(ulysses_degree=degree, ring_impl=ring_impl) as cp:
            for path in ("eager", "op") if degree > 1 else ("eager",):
                local = [cp.shard(t).requires_grad_() for t in (q, k, v)]
                sdpa = [t.transpose(1, 2) for t in local]  # the SDPA layout: transposed views
                if path == "op":
                    with FakeMatchesReal() as check:
                        args = AttentionArgs(*sdpa, True, None, True, (-1, -1), 0.0, None, SEQ_LEN, None,
                                             sdpa_layout=True, enable_gqa=True)
                        out, lse = compiled_attention(cp.compiled_handle, args, cp.layout, "test_mla")
                        out.backward(cp.shard(dout))
                    layouts += check.mismatches
                elif i % 2:
                    out = cp.scaled_dot_product_attention(*sdpa, is_causal=True, enable_gqa=True,
                                                          seq_len=SEQ_LEN).transpose(1, 2)
                    lse = cp.attention(*(t.detach() for t in local), causal=True, return_lse=True,
                                       seq_len=SEQ_LEN)[1]
                    out.backward(cp.shard(dout))
                else:
                    out, lse = cp.attention(*local, causal=True, return_lse=True, seq_len=SEQ_LEN)
                    out.backward(cp.shard(dout))
                got = [cp.gather(t, seq_len=SEQ_LEN) for t in (out.detach(), *(t.grad for t in local))]
                got_lse = cp.gather(lse, seq_dim=2, seq_len=SEQ_LEN)
                label = name if path == "eager" else f"{name} op"
                errors[label] = [rel_err(got[0], ref_out), rel_err(got_lse, ref_lse)] + [
                    rel_err(g, r, floor=GRAD_FLOOR) for g, r in zip(got[1:], ref_grads)]
                errors[label].append(tuple(got[0].shape) == (1, SEQ_LEN, 4, 32))
    return errors, layouts


@pytest.mark.parametrize("world_size", [2, 4])
def test_context_parallel_on_gloo_ranks(world_size):
    for rank, (errors, layouts) in enumerate(run_ranks(_ranks_run, world_size, timeout=400)):
        assert not layouts, f"(operator, output, real layout, fake layout): {layouts}"
        assert sorted(errors) == sorted(["ring", "zigzag", "ulysses", "ulysses op"]
                                        + (["usp", "usp op"] if world_size == 4 else []))
        for name, (out_err, lse_err, *grad_errs, shape_ok) in errors.items():
            label = f"rank {rank} of {world_size}, {name}"
            assert shape_ok, label
            assert out_err < FWD_TOL and lse_err < FWD_TOL, f"{label}: out {out_err:.2e}, lse {lse_err:.2e}"
            assert max(grad_errs) < GRAD_TOL, f"{label}: dq, dk, dv errors {grad_errs}"
