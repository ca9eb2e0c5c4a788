"""Context parallelism over any sequence length and over packed documents, on every algorithm.

Layout for many lengths and meshes (every token on exactly one rank, parts
differing by at most a token), the work balance of packed documents, the
single-process ring simulator against a float64 reference (plain and packed),
and ContextParallel on 2 and 4 gloo ranks (ring, zigzag, Ulysses, USP) for
lengths not divisible by 2 x ring degree or the group size, with and without
cu_seqlens, and bad packings raising on every rank.
"""
import random

import pytest
import torch

import cpattn
from cpattn.layout import Layout, doc_positions
from cpattn.work_report import context_parallel_work
from cpattn.ring import ring_schedule, simulate_ring_attention, simulate_ring_attention_backward
from cpattn.testing import run_ranks
from reference import reference_attention, reference_varlen, rel_err


def packing(lengths):
    """cu_seqlens (int32) of documents of these lengths."""
    return torch.tensor([0, *torch.tensor(lengths).cumsum(0).tolist()], dtype=torch.int32)

LENGTHS = [1, 2, 3, 5, 7, 8, 13, 97, 130, 301]
MESHES = [(2, 1, "ring"), (2, 1, "zigzag"), (4, 1, "zigzag"), (3, 1, "zigzag"), (1, 4, "zigzag"), (2, 2, "zigzag"),
          (2, 2, "ring"), (4, 2, "zigzag")]
FWD_TOL, GRAD_TOL = 1e-4, 1e-3


@pytest.mark.parametrize("ring_degree,ulysses_degree,ring_impl", MESHES)
def test_layout_any_length(ring_degree, ulysses_degree, ring_impl):
    layout = Layout(ring_degree, ulysses_degree, ring_impl)
    for seq_len in LENGTHS:
        lengths = layout.local_lengths(seq_len)
        assert torch.equal(layout.order(seq_len).sort().values, torch.arange(seq_len)), "every token once"
        assert [layout.positions(seq_len, r).numel() for r in range(layout.world_size)] == lengths
        # Pieces differ by at most one token per chunk, parts of a piece by at most one.
        pieces = [layout.piece_length(r, seq_len) for r in range(ring_degree)]
        assert max(pieces) - min(pieces) <= len(layout.ring_chunk_ids(0))
        for r in range(ring_degree):
            parts = layout.ulysses_parts(r, seq_len)
            assert max(parts) - min(parts) <= 1


def simulated_case(ring_degree, ring_impl, causal, seq_len, seed):
    gen = torch.Generator().manual_seed(seed)
    q = torch.randn(1, seq_len, 2, 16, generator=gen)
    k, v = (torch.randn(1, seq_len, 1, 16, generator=gen) for _ in range(2))
    dout = torch.randn(1, seq_len, 2, 16, generator=gen)
    out, lse = simulate_ring_attention(q, k, v, ring_degree, ring_impl, causal=causal)
    grads = simulate_ring_attention_backward(dout, q, k, v, out, lse, ring_degree, ring_impl, causal=causal)
    leaves = [t.double().requires_grad_() for t in (q, k, v)]
    ref_out, ref_lse = reference_attention(*leaves, causal=causal)
    ref_grads = torch.autograd.grad(ref_out, leaves, dout.double())
    return [rel_err(out, ref_out), rel_err(lse, ref_lse)], [rel_err(g, r) for g, r in zip(grads, ref_grads)]


@pytest.mark.parametrize("ring_degree,ring_impl", [(2, "zigzag"), (3, "zigzag"), (4, "ring"), (4, "zigzag")])
def test_simulated_ring_uneven(ring_degree, ring_impl):
    for i, seq_len in enumerate((1, 7, 97) if ring_degree == 2 else (7, 30)):
        fwd, grads = simulated_case(ring_degree, ring_impl, i % 2 == 0, seq_len, seq_len + ring_degree)
        assert max(fwd) < FWD_TOL and max(grads) < GRAD_TOL, (seq_len, fwd, grads)


def varlen_reference(q, k, v, dout, cu, causal, window_size=(-1, -1)):
    """[out, lse, dq, dk, dv] of per-document float64 attention of the packed (1, S, H, D) inputs."""
    leaves = [t[0].double().requires_grad_() for t in (q, k, v)]
    out, lse = reference_varlen(*leaves, cu, cu, causal=causal, window_size=window_size)
    return [out[None], lse[None], *(g[None] for g in torch.autograd.grad(out, leaves, dout[0].double()))]


# (document lengths, causal, window): totals 7, 97, 70, 301; a document longer than a rank's share,
# documents of one token, an empty document (a repeated cu_seqlens entry)
SIM_PACKINGS = [([3, 1, 3], True, (-1, -1)), ([80, 1, 0, 16], True, (-1, -1)), ([5, 40, 1, 24], False, (-1, -1)),
                ([200, 7, 64, 30], True, (-1, -1)), ([60, 37], True, (8, 0))]


@pytest.mark.parametrize("case", range(len(SIM_PACKINGS)))
def test_simulated_ring_packed_documents(case):
    lengths, causal, window = SIM_PACKINGS[case]
    ring_degree, ring_impl = [(2, "zigzag"), (3, "ring"), (4, "zigzag")][case % 3]
    cu, seq_len = packing(lengths), sum(lengths)
    gen = torch.Generator().manual_seed(case)
    q, dout = (torch.randn(1, seq_len, 2, 16, generator=gen) for _ in range(2))
    k, v = (torch.randn(1, seq_len, 1, 16, generator=gen) for _ in range(2))
    out, lse = simulate_ring_attention(q, k, v, ring_degree, ring_impl, causal=causal, window_size=window,
                                              cu_seqlens=cu)
    grads = simulate_ring_attention_backward(dout, q, k, v, out, lse, ring_degree, ring_impl, causal=causal,
                                                    window_size=window, cu_seqlens=cu)
    ref = varlen_reference(q, k, v, dout, cu, causal, window)
    errors = [rel_err(g, r) for g, r in zip((out, lse, *grads), ref)]
    assert max(errors[:2]) < FWD_TOL and max(errors[2:]) < GRAD_TOL, (lengths, errors)


def test_documents_that_share_no_chunk_make_no_call():
    # Four documents, each exactly one rank's piece (equal work): no step after the first has a call,
    # so the plan ends there and no kv travels at all.
    docs = tuple(packing([16, 16, 16, 16]).tolist())
    schedule = ring_schedule(64, 4, "ring", causal=True, packing=docs)
    assert all(len(steps) == 1 for steps in schedule)
    # One chunk holding several documents: one varlen call for all of them.
    (steps,) = ring_schedule(24, 1, "ring", causal=True, packing=(0, 5, 6, 24))
    (_, (call,)), = steps
    assert call.mask.cu_seqlens_q == call.mask.cu_seqlens_k == (0, 5, 6, 24)
    assert call.mask.q_start == call.mask.k_start == (0, 0, 0)


def realistic_packings():
    rng = random.Random(0)
    one_long = [24576] + [rng.randint(32, 1024) for _ in range(40)]
    rng.shuffle(one_long)
    long_tailed = [max(1, int(rng.paretovariate(1.1) * 100)) for _ in range(300)]
    return {"one long + many short": one_long, "long-tailed": long_tailed,
            "long last": [rng.randint(1, 300) for _ in range(100)] + [9000], "odd single": [100003]}


@pytest.mark.parametrize("ring_degree", [2, 4, 8])
def test_packed_tokens_and_work_are_balanced(ring_degree):
    for name, lengths in realistic_packings().items():
        loads = context_parallel_work(packing(lengths), ring_degree)
        mean_tokens, mean_work = sum(lengths) / ring_degree, sum(loads.work) / ring_degree
        assert max(loads.tokens) <= 1.02 * mean_tokens + 1, (name, loads.tokens)
        assert max(loads.work) <= 1.05 * mean_work, (name, loads.work)
        assert sum(loads.work) == sum(n * (n + 1) // 2 for n in lengths), "every causal pair counted once"
    lengths = realistic_packings()["one long + many short"]
    contiguous = context_parallel_work(packing(lengths), ring_degree, scheme="contiguous").work
    assert max(contiguous) > 1.2 * sum(contiguous) / ring_degree, "the unbalanced baseline is unbalanced"
    with pytest.raises(ValueError, match="scheme"):
        context_parallel_work(packing(lengths), ring_degree, scheme="spiral")
    with pytest.raises(ValueError, match="cu_seqlens"):
        context_parallel_work([0, 5, 3], ring_degree)


# world size -> [(algorithm, ulysses degree, ring impl, seq_len or document lengths, causal)]
DIST_CASES = {
    2: [("ring", 1, "ring", 7, True), ("zigzag", 1, "zigzag", 130, True),
        ("ulysses", 2, "zigzag", 97, False), ("ulysses", 2, "zigzag", 7, True),
        ("zigzag", 1, "zigzag", [70, 1, 26], True), ("ring", 1, "ring", [3, 4], False),
        ("ring", 1, "ring", [33, 1, 50, 7], True, (8, 0)),
        ("ulysses", 2, "zigzag", [5, 120, 0, 5], True)],
    4: [("zigzag", 1, "zigzag", 7, True), ("ring", 1, "ring", 130, False), ("ulysses", 4, "zigzag", 97, True),
        ("usp", 2, "zigzag", 97, True), ("usp", 2, "ring", 7, False),
        ("zigzag", 1, "zigzag", [250, 9, 1, 41], True), ("usp", 2, "zigzag", [11, 80, 6], True),
        ("ulysses", 4, "zigzag", [2, 3, 2], False), ("ring", 1, "ring", [60, 37], True),
        ("zigzag", 1, "zigzag", [129, 7, 1, 0, 77], True, (16, 0))],
}


def run_uneven(rank, world_size):
    results = []
    for i, (algo, degree, ring_impl, lengths, causal, *window) in enumerate(DIST_CASES[world_size]):
        window = window[0] if window else (-1, -1)  # packed shards cut for the attention's window
        cp = cpattn.ContextParallel(ulysses_degree=degree, ring_impl=ring_impl)
        cu = packing(lengths) if isinstance(lengths, list) else None
        seq_len = lengths if cu is None else sum(lengths)
        gen = torch.Generator().manual_seed(i)
        q = torch.randn(1, seq_len, 4, 16, generator=gen)
        k, v = (torch.randn(1, seq_len, 2, 16, generator=gen) for _ in range(2))
        dout = torch.randn(1, seq_len, 4, 16, generator=gen)
        local = [cp.shard(t, cu_seqlens=cu, window_size=window).requires_grad_() for t in (q, k, v)]
        out, lse = cp.attention(*local, causal=causal, return_lse=True, seq_len=seq_len, cu_seqlens=cu,
                                window_size=window)
        out.backward(cp.shard(dout, cu_seqlens=cu, window_size=window))
        got = [cp.gather(t, seq_len=seq_len, cu_seqlens=cu, window_size=window)
               for t in (out.detach(), *(t.grad for t in local))]
        if cu is None:
            leaves = [t.double().requires_grad_() for t in (q, k, v)]
            ref_out, ref_lse = reference_attention(*leaves, causal=causal)
            ref = [ref_out, *torch.autograd.grad(ref_out, leaves, dout.double())]
            positions_ok = True
        else:
            ref_out, ref_lse, *grads = varlen_reference(q, k, v, dout, cu, causal, window)
            ref = [ref_out, *grads]
            # positions: each local token's position inside its document, the same as sharding them
            positions_ok = torch.equal(cp.positions(seq_len, cu_seqlens=cu, window_size=window),
                                       cp.shard(doc_positions(tuple(cu.tolist())), seq_dim=0, cu_seqlens=cu,
                                                window_size=window))
            # the SDPA-layout method takes the packing too
            sdpa_out = cp.scaled_dot_product_attention(*(t.detach().transpose(1, 2) for t in local), is_causal=causal,
                                                       enable_gqa=True, cu_seqlens=cu, window_size=window)
            positions_ok = positions_ok and torch.allclose(sdpa_out, out.detach().transpose(1, 2), atol=1e-6)
        tokens = torch.arange(seq_len)
        lse_ok = rel_err(lse, ref_lse[..., cp.shard(tokens, 0, cu, window)]) < FWD_TOL
        x = torch.randn(2 if cu is None else 1, seq_len, 3)
        round_trip = torch.equal(cp.gather(cp.shard(x, cu_seqlens=cu, window_size=window), seq_len=seq_len,
                                           cu_seqlens=cu, window_size=window), x)
        results.append({"case": (algo, ring_impl, seq_len, causal), "errors": [rel_err(g, r) for g, r in zip(got, ref)],
                        "lse_ok": lse_ok, "positions_ok": positions_ok, "local": local[0].shape[1],
                        "round_trip": round_trip})
        cp.close()
    return results


# 4 ranks (USP 2 x 2 with uneven packed lengths, 30 s) runs with -m slow; 2 ranks every other algorithm.
@pytest.mark.parametrize("world_size", [2, pytest.param(4, marks=pytest.mark.slow)])
def test_uneven_lengths_every_algorithm(world_size):
    per_rank = run_ranks(run_uneven, world_size)
    for case_index, case in enumerate(per_rank[0]):
        seq_len = case["case"][2]
        assert sum(r[case_index]["local"] for r in per_rank) == seq_len, "no token dropped or duplicated"
        for r in per_rank:
            errors = r[case_index]["errors"]
            assert errors[0] < FWD_TOL and max(errors[1:]) < GRAD_TOL and r[case_index]["lse_ok"], case
            assert r[case_index]["round_trip"] and r[case_index]["positions_ok"], case


def run_bad_packings(rank, world_size):
    cp = cpattn.ContextParallel(ring_impl="zigzag", timeout=20.0)
    gen = torch.Generator().manual_seed(0)
    full = torch.randn(1, 14, 2, 8, generator=gen)
    mine = packing([5, 9] if rank == 0 else [7, 7])  # a packing that differs between ranks
    cu = packing([5, 9])
    local = cp.shard(full, cu_seqlens=mine)
    cases = {
        "packings differ": lambda: cp.attention(local, local, local, causal=True, cu_seqlens=mine),
        "gather packings differ": lambda: cp.gather(local, cu_seqlens=mine),
        "cu_seqlens longer than the shards": lambda: cp.attention(*[cp.shard(full, cu_seqlens=cu)] * 3,
                                                                  cu_seqlens=packing([5, 9, 40])),
        "one rank's cu_seqlens does not end at the length": lambda: cp.attention(
            *[cp.shard(full, cu_seqlens=cu)] * 3, cu_seqlens=cu if rank else packing([5, 30])),
        "cu_seqlens int64": lambda: cp.attention(*[cp.shard(full, cu_seqlens=cu)] * 3, cu_seqlens=cu.long()),
        "batch 2": lambda: cp.attention(*[cp.shard(full.expand(2, -1, -1, -1), cu_seqlens=cu)] * 3, cu_seqlens=cu),
        "seq_len contradicts cu_seqlens": lambda: cp.attention(*[cp.shard(full, cu_seqlens=cu)] * 3, seq_len=15,
                                                               cu_seqlens=cu),
    }
    outcomes = {}
    for name, call in cases.items():
        try:
            call()
            outcomes[name] = ("no error", "")
        except Exception as exc:
            outcomes[name] = (type(exc).__name__, str(exc))
    # Still usable: a good packed call after all that.
    out = cp.attention(*[cp.shard(full, cu_seqlens=cu)] * 3, causal=True, cu_seqlens=cu)
    ref = reference_varlen(*[full[0].double()] * 3, cu, cu, causal=True)[0]
    return outcomes, rel_err(cp.gather(out, cu_seqlens=cu)[0], ref), windows_other_than_the_shards(cp)


def windows_other_than_the_shards(cp):
    """Layers of several windows (gpt-oss, Gemma) on shards cut for one: each attention is exact (forward and
    backward) on shards cut for another window. Returns (whether the two cuts place tokens differently,
    the largest error)."""
    cu = packing([40, 2, 57, 3])
    gen = torch.Generator().manual_seed(1)
    q, k, v, dout = (torch.randn(1, 102, 2, 8, generator=gen) for _ in range(4))
    differ = not torch.equal(cp.positions(102, cu_seqlens=cu, window_size=(4, 0)), cp.positions(102, cu_seqlens=cu))
    errors = []
    for cut, window in (((4, 0), (-1, -1)), ((-1, -1), (4, 0)), ((4, 0), (9, 0))):
        local = [cp.shard(t, cu_seqlens=cu, window_size=cut).requires_grad_() for t in (q, k, v)]
        out = cp.attention(*local, causal=True, cu_seqlens=cu, window_size=window)
        out.backward(cp.shard(dout, cu_seqlens=cu, window_size=cut))
        got = [cp.gather(t, cu_seqlens=cu, window_size=cut)[0] for t in (out.detach(), *(t.grad for t in local))]
        leaves = [t[0].double().requires_grad_() for t in (q, k, v)]
        ref_out = reference_varlen(*leaves, cu, cu, causal=True, window_size=window)[0]
        ref = [ref_out, *torch.autograd.grad(ref_out, leaves, dout[0].double())]
        errors.append(max(rel_err(g, r) for g, r in zip(got, ref)))
    return differ, max(errors)


def test_bad_packings_raise_on_every_rank():
    expected = {"packings differ": "disagree", "gather packings differ": "disagree",
                "cu_seqlens longer than the shards": "tokens", "cu_seqlens int64": "int32", "batch 2": "batch 1",
                "seq_len contradicts cu_seqlens": "ends at"}
    for rank, (outcomes, error, (cuts_differ, window_error)) in enumerate(run_ranks(run_bad_packings, 2, timeout=180)):
        for name, match in expected.items():
            kind, message = outcomes[name]
            assert kind in ("ValueError", "TypeError") and match in message, (rank, name, kind, message)
        kind, message = outcomes["one rank's cu_seqlens does not end at the length"]
        assert kind == "ValueError" and ("tokens" if rank == 0 else "rank(s) [0]") in message, (rank, message)
        assert error < FWD_TOL
        assert cuts_differ and window_error < GRAD_TOL, (rank, window_error)
