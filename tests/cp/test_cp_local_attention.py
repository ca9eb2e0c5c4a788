"""Sliding windows, softcap and sinks under context parallelism: the single-process ring
simulator for many windows, the ring plan's skipped steps and transfers, and real gloo
ranks for every algorithm (ring, zigzag, Ulysses, USP) against float64 attention."""
import pytest
import torch

import cpattn
from cpattn.ring import ring_schedule, simulate_ring_attention, simulate_ring_attention_backward
from cpattn.testing import run_ranks
from reference import reference_attention, rel_err

SEQ_LEN = 64


def _inputs(seq_len=SEQ_LEN, heads=4, kv_heads=2, head_dim=32, seed=0):
    gen = torch.Generator().manual_seed(seed)
    q = torch.randn(1, seq_len, heads, head_dim, generator=gen)
    k, v = (torch.randn(1, seq_len, kv_heads, head_dim, generator=gen) for _ in range(2))
    return q, k, v, torch.randn(1, seq_len, heads, head_dim, generator=gen)


def _reference(q, k, v, dout, sinks=None, **kw):
    leaves = [t.double().requires_grad_() for t in (q, k, v)] + ([sinks.double().requires_grad_()] if sinks is not None else [])
    out, _ = reference_attention(*leaves[:3], sinks=leaves[3] if sinks is not None else None, **kw)
    return [out.detach(), *torch.autograd.grad(out, leaves, dout.double())]


# (ring degree, impl, causal, window): windows shorter than a piece, longer than two, asymmetric
SIM_CASES = [(4, "ring", True, (5, 0)), (4, "zigzag", True, (5, 0)), (3, "ring", False, (3, 9)),
             (2, "zigzag", False, (40, 40)), (4, "ring", True, (20, -1)), (4, "zigzag", False, (-1, 6))]


@pytest.mark.parametrize("degree,impl,causal,window", SIM_CASES, ids=str)
def test_simulated_ring_with_window_and_softcap(degree, impl, causal, window):
    q, k, v, dout = _inputs(seq_len=48)
    out, lse = simulate_ring_attention(q, k, v, degree, impl, causal, window_size=window, softcap=8.0)
    grads = simulate_ring_attention_backward(dout, q, k, v, out, lse, degree, impl, causal, window_size=window,
                                             softcap=8.0)
    ref = _reference(q, k, v, dout, causal=causal, window_size=window, softcap=8.0)
    assert rel_err(out, ref[0]) < 1e-4
    for got, want in zip(grads, ref[1:]):
        assert rel_err(got, want, floor=1e-2) < 1e-3


def test_window_skips_steps_and_transfers():
    """Window 4k of 128k on 8 ranks, in pieces of 16k: the plain ring needs 2 of 8 steps (its
    own piece and the previous one), so 1 kv transfer instead of 7; zigzag puts neighbouring
    positions on both neighbours, so it keeps every step but makes fewer calls."""
    ring = ring_schedule(128 * 1024, 8, "ring", causal=True, window_size=(4096, 0))
    assert all(len(steps) == 2 for steps in ring)
    assert sum(len(calls) for _, calls in ring[0]) == 1  # rank 0 has nobody before it
    assert all(sum(len(calls) for _, calls in steps) == 2 for steps in ring[1:])
    full = ring_schedule(128 * 1024, 8, "ring", causal=True)
    assert all(len(steps) == 8 for steps in full)
    zigzag = ring_schedule(128 * 1024, 8, "zigzag", causal=True, window_size=(4096, 0))
    calls = [sum(len(c) for _, c in steps) for steps in zigzag]
    assert max(calls) <= 4 < min(sum(len(c) for _, c in s) for s in ring_schedule(128 * 1024, 8, "zigzag", causal=True))


def run_cases(rank, world_size, ulysses_degree, ring_impl, cases):
    results = []
    for i, (causal, window, softcap, with_sinks) in enumerate(cases):
        cp = cpattn.ContextParallel(ulysses_degree=ulysses_degree, ring_impl=ring_impl)
        q, k, v, dout = _inputs(seed=i)
        sinks = (torch.linspace(-1.0, 2.0, 4) if with_sinks else None)
        local = [cp.shard(t).requires_grad_() for t in (q, k, v)]
        leaf_sinks = sinks.clone().requires_grad_() if sinks is not None else None
        out = cp.attention(*local, causal=causal, window_size=window, softcap=softcap, sinks=leaf_sinks)
        out.backward(cp.shard(dout))
        got = [cp.gather(t) for t in (out.detach(), *(t.grad for t in local))]
        if sinks is not None:  # each rank holds its share of d sinks: the group sum is the gradient
            torch.distributed.all_reduce(leaf_sinks.grad)
            got.append(leaf_sinks.grad)
        ref = _reference(q, k, v, dout, sinks=sinks, causal=causal, window_size=window, softcap=softcap)
        results.append([rel_err(g, r, floor=1e-2) for g, r in zip(got, ref)])
    return results


# (causal, window, softcap, sinks): windows below one rank's piece and above two pieces
CASES = [(True, (5, 0), 0.0, True), (False, (40, 3), 10.0, False), (True, (-1, -1), 5.0, True)]
ALGOS = [(2, 1, "ring"), (4, 1, "ring"), (4, 1, "zigzag"), (4, 4, "zigzag"), (4, 2, "zigzag")]


@pytest.mark.parametrize("world_size,ulysses_degree,ring_impl", ALGOS, ids=lambda x: str(x))
def test_context_parallel_local_attention(world_size, ulysses_degree, ring_impl):
    per_rank = run_ranks(run_cases, world_size, ulysses_degree, ring_impl, CASES, timeout=300)
    for rank, results in enumerate(per_rank):
        for case, errors in zip(CASES, results):
            assert errors[0] < 1e-4, f"rank {rank} case {case}: forward {errors[0]:.2e}"
            assert max(errors[1:]) < 1e-3, f"rank {rank} case {case}: gradients {errors[1:]}"
            assert len(errors) == (5 if case[3] else 4)


def _bad_window(rank, world_size):
    cp = cpattn.ContextParallel()
    q = torch.randn(1, 8, 2, 16)
    try:
        cp.attention(q, q, q, window_size=(-3, 0) if rank == 0 else (2, 0))
    except ValueError as exc:
        return str(exc)
    return None


def test_bad_window_on_one_rank_raises_on_every_rank():
    messages = run_ranks(_bad_window, 2, timeout=120)
    assert "window_size left must be >= 0" in messages[0]
    assert messages[1] is not None and "rank(s) [0]" in messages[1]
