"""The packed-document dispatch (cpattn/dispatch.py): which ring rank holds which tokens.

Pure-Python properties over random packings (every token on exactly one rank,
tokens per rank <= 1.02 x mean + 1, work per ring rank <= 1.05 x mean when the
mean share is at least 64 tokens, documents that fit kept whole, positions right,
the same answer every time), the planner's calls and the rows that travel for such layouts, and the
ring simulator on up to 8 ranks against float64 per-document attention.
Multi-rank runs with windows are in test_cp_varlen.py.
"""
import itertools
import random

import pytest
import torch

from cpattn.dispatch import cut_window, dispatch
from cpattn.kernels import MaskSpec
from cpattn.layout import Layout, doc_positions
from cpattn.work_report import context_parallel_work
from cpattn.ring import ring_schedule, simulate_ring_attention, simulate_ring_attention_backward, travelling_rows
from reference import reference_varlen, rel_err

TOKEN_SLACK, WORK_BOUND, WORK_BOUND_FROM = 1.02, 1.05, 64
FWD_TOL, GRAD_TOL = 1e-4, 1e-3


def random_packings(count, seed=0):
    """(document lengths, ring degree, window left): lengths 0 to 3 x the per-rank share, 1 to 300
    documents, ring degrees 1 to 8, no window or one of a few."""
    rng = random.Random(seed)
    for _ in range(count):
        ring_degree, documents = rng.randint(1, 8), rng.choice([1, 2, 5, 40, 300])
        share = rng.choice([1, 8, 64, 300, 2000])
        lengths = [rng.randint(0 if rng.random() < 0.05 else 1, 3 * share) for _ in range(documents)]
        if sum(lengths):
            yield lengths, ring_degree, rng.choice([-1, -1, 0, 7, 100, 1000])


def test_random_packings_balance_tokens_and_work():
    worst = (0.0, None)
    for lengths, ring_degree, left in random_packings(120):
        cu = [0, *itertools.accumulate(lengths)]
        loads = context_parallel_work(cu, ring_degree, (left, 0))
        mean_tokens = cu[-1] / ring_degree
        assert sum(loads.tokens) == cu[-1] and max(loads.tokens) <= TOKEN_SLACK * mean_tokens + 1, loads.tokens
        covered = torch.cat([torch.arange(s, s + n) for ranges in dispatch(tuple(cu), ring_degree,
                                                                           cut_window(tuple(cu), left))
                             for s, n in ranges])
        assert torch.equal(covered.sort().values, torch.arange(cu[-1])), "every token on exactly one rank"
        if mean_tokens >= WORK_BOUND_FROM:
            balance = max(loads.work) * ring_degree / sum(loads.work)
            worst = max(worst, (balance, (len(lengths), ring_degree, left, round(mean_tokens))))
            assert balance <= WORK_BOUND, (lengths, ring_degree, left, loads.work)
    print(f"worst work max/mean: {worst[0]:.4f} (documents, ring degree, window, mean share) = {worst[1]}")


def test_documents_that_fit_stay_whole():
    # Documents no longer than a share stay whole: no kv transfer at all (one ring step).
    for lengths, ring_degree in (([16] * 4, 4), ([5, 9, 2, 8, 7, 1], 2), ([100] * 16, 8)):
        cu = tuple(itertools.accumulate([0, *lengths]))
        loads = context_parallel_work(cu, ring_degree)
        assert loads.steps == 1 and loads.bytes_sent == [0] * ring_degree, (lengths, loads)
        assert max(loads.tokens) - min(loads.tokens) <= 1
    # one 256-token document: the dispatch gives what the plain zigzag split gives, 1.00 and 1.00
    loads = context_parallel_work([0, 256], 8)
    assert loads.tokens == [32] * 8 and max(loads.work) == min(loads.work)
    # with a 32-token window the shares go zigzag too, work within the bound (the old cut: 1.87)
    loads = context_parallel_work([0, 256], 8, (32, 0))
    assert loads.tokens == [32] * 8 and max(loads.work) * 8 <= WORK_BOUND * sum(loads.work)


def test_first_step_is_one_varlen_call_when_documents_stay_whole():
    cu = tuple(itertools.accumulate([0, 6, 4, 10, 3, 7, 10]))  # {10, 6, 4} and {10, 7, 3}: 20 tokens, 86 and 89 pairs
    for ring_index, steps in enumerate(ring_schedule(40, 2, "zigzag", causal=True, packing=cu)):
        assert len(steps) == 1
        ((_, (call,)),) = steps
        held = dispatch(cu, 2)[ring_index]
        assert call.q_lo == call.k_lo == 0 and call.q_hi == call.k_hi == sum(n for _, n in held)
        assert call.mask.cu_seqlens_q == call.mask.cu_seqlens_k and len(call.mask.cu_seqlens_q) >= 3, "every local document in one varlen call"


def test_layout_positions_and_window_cut():
    cu = (0, 1, 7, 7, 84, 213, 300)  # documents of 1, 6, 0 (empty), 77, 129, 87
    for ring_degree, ulysses_degree, left in ((2, 1, -1), (4, 2, -1), (8, 1, 16), (3, 1, 500)):
        layout = Layout(ring_degree, ulysses_degree, "zigzag")
        order = layout.order(300, packing=cu, window_left=left)
        assert torch.equal(order.sort().values, torch.arange(300))
        lengths = layout.local_lengths(300, cu, left)
        assert max(lengths) - min(lengths) <= 1 + (ulysses_degree > 1)
        in_doc = doc_positions(cu)
        for rank in range(layout.world_size):
            mine = layout.positions(300, rank, cu, left)
            assert torch.equal(in_doc[mine], in_doc[order[sum(lengths[:rank]):sum(lengths[:rank + 1])]])
    # a window no shorter than every document is no window: the same cut
    assert cut_window(cu, 128) == cut_window(cu, 5000) == -1 and cut_window(cu, 127) == 127
    assert dispatch(cu, 4, -1) is dispatch(cu, 4, cut_window(cu, 4000)), "one cache entry, the same on every call"


# (document lengths, ring degree, causal, window, kv heads): odd lengths, one token, an empty document, one
# longer than a share, GQA, 8 ranks (test_cp_varlen.py simulates more packings, all through the dispatch)
SIM_CASES = [([1, 7, 77, 129], 2, True, (-1, -1), 1), ([19, 1, 3, 0, 9], 8, True, (4, 0), 2)]


@pytest.mark.parametrize("case", range(len(SIM_CASES)))
def test_simulated_dispatch_is_exact(case):
    lengths, ring_degree, causal, window, kv_heads = SIM_CASES[case]
    cu = torch.tensor([0, *itertools.accumulate(lengths)], dtype=torch.int32)
    seq_len = sum(lengths)
    gen = torch.Generator().manual_seed(case)
    q, dout = (torch.randn(1, seq_len, 2, 16, generator=gen) for _ in range(2))
    k, v = (torch.randn(1, seq_len, kv_heads, 16, generator=gen) for _ in range(2))
    out, lse = simulate_ring_attention(q, k, v, ring_degree, "zigzag", causal=causal, window_size=window,
                                       cu_seqlens=cu)
    grads = simulate_ring_attention_backward(dout, q, k, v, out, lse, ring_degree, "zigzag", causal=causal,
                                             window_size=window, cu_seqlens=cu)
    leaves = [t[0].double().requires_grad_() for t in (q, k, v)]
    ref_out, ref_lse = reference_varlen(*leaves, cu, cu, causal=causal, window_size=window)
    ref_grads = torch.autograd.grad(ref_out, leaves, dout[0].double())
    errors = [rel_err(out[0], ref_out), rel_err(lse[0], ref_lse)] + [rel_err(g[0], r) for g, r in zip(grads, ref_grads)]
    assert max(errors[:2]) < FWD_TOL and max(errors[2:]) < GRAD_TOL, (lengths, errors)


def test_report_checks_its_arguments():
    with pytest.raises(ValueError, match="ring_degree"):
        context_parallel_work([0, 5], 0)
    with pytest.raises(ValueError, match="scheme"):
        context_parallel_work([0, 5], 2, scheme="balanced")
    with pytest.raises(ValueError, match="cu_seqlens"):
        context_parallel_work([1, 5], 2)


def test_only_rows_other_ranks_read_travel():
    # 8 whole documents and one spread over 4 ranks: each rank's message carries the spread document's
    # rows only (the dispatch puts them last), far fewer than its piece.
    cu = tuple(itertools.accumulate([0, 400] + [50] * 8))
    layout, mask = Layout(4, 1, "zigzag"), MaskSpec(causal=True)
    travelling = travelling_rows(layout, cu[-1], mask, cu)
    pieces = [layout.piece_length(r, cu[-1], cu) for r in range(4)]
    assert all(0 <= lo < hi == piece for (lo, hi), piece in zip(travelling, pieces))
    assert max(hi - lo for lo, hi in travelling) <= 100 < min(pieces) == 200
    assert context_parallel_work(cu, 4).bytes_sent == [3 * max(hi - lo for lo, hi in travelling)] * 4
