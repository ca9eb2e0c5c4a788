"""Single-process pieces of context parallelism: shard order, step plans, the
ring simulator against SDPA, the "auto" Ulysses degree and the argparse options."""
import argparse

import pytest
import torch

import cpattn
from cpattn.kernels import MaskSpec
from cpattn.layout import Layout
from cpattn.ring import plan_step, ring_schedule, simulate_ring_attention, simulate_ring_attention_backward
from reference import rel_err, sdpa_with_grads

MESHES = [(1, 1, "zigzag"), (2, 1, "ring"), (2, 1, "zigzag"), (3, 1, "zigzag"), (4, 1, "ring"), (4, 1, "zigzag"),
          (1, 4, "zigzag"), (2, 2, "zigzag"), (2, 2, "ring"), (4, 2, "zigzag")]


@pytest.mark.parametrize("ring_degree,ulysses_degree,ring_impl", MESHES)
def test_layout_positions(ring_degree, ulysses_degree, ring_impl):
    layout = Layout(ring_degree, ulysses_degree, ring_impl)
    seq_len = 2 * ring_degree * ulysses_degree * 3
    order = layout.order(seq_len)
    assert torch.equal(order.sort().values, torch.arange(seq_len)), "every token on exactly one rank"
    zigzag = ring_impl == "zigzag" and ring_degree > 1
    chunk_len = seq_len // (2 * ring_degree if zigzag else ring_degree)
    for ring_index in range(ring_degree):
        # The Ulysses ranks of a ring rank hold, in order, its piece: chunk r (and 2R-1-r for zigzag).
        piece = torch.cat([layout.positions(seq_len, ring_index * ulysses_degree + u) for u in range(ulysses_degree)])
        chunks = [ring_index, 2 * ring_degree - 1 - ring_index] if zigzag else [ring_index]
        assert torch.equal(piece, torch.cat([torch.arange(c * chunk_len, (c + 1) * chunk_len) for c in chunks]))
        starts = [start for start, _ in layout.ring_chunks(ring_index, seq_len)]
        assert starts == [c * chunk_len for c in chunks]


def test_zigzag_balances_causal_work():
    layout = Layout(4, 1, "zigzag")
    # Causal work of a rank: the number of (query, visible key) pairs of its queries.
    work = [(layout.positions(64, r) + 1).sum().item() for r in range(4)]
    assert len(set(work)) == 1
    ring_work = [(Layout(4, 1, "ring").positions(64, r) + 1).sum().item() for r in range(4)]
    assert len(set(ring_work)) == 4


def test_layout_rejects_bad_lengths_and_names():
    for bad in (0, -3, 2.0, True):
        with pytest.raises(ValueError, match="positive int"):
            Layout(2, 2, "ring").check_seq_len(bad, "test")
    with pytest.raises(ValueError, match="ring_impl"):
        Layout(2, 1, "helix")
    with pytest.raises(ValueError, match="ring_degree"):
        Layout(0, 1, "ring")


def test_every_kernel_call_gets_the_attention_mask_cut_to_its_block():
    # One mask description from the call to the kernel: each call's MaskSpec is the attention's window
    # at the call's first positions (or no window where every query sees every key), never a new rule.
    attention = MaskSpec(True, (20, -1))
    unmasked = 0
    for ring_impl, packing in (("zigzag", None), ("ring", None), ("zigzag", (0, 30, 31, 100, 128))):
        for steps in ring_schedule(128, 4, ring_impl, causal=True, offset=0 if packing else 5, window_size=(20, -1),
                                   packing=packing):
            for _, calls in steps:
                for call in calls:
                    mask = call.mask
                    assert isinstance(mask, MaskSpec) and mask.window in (attention.window, (-1, -1))
                    if not mask.varlen and mask.window == (-1, -1):  # dropped only where the attention's sees all
                        unmasked += 1
                        assert attention.sees(mask.q_start, mask.q_start + call.q_hi - call.q_lo - 1,
                                              mask.k_start, mask.k_start + call.k_hi - call.k_lo - 1) == (True, True)
    assert unmasked > 0


def test_plan_skips_future_and_merges_visible_pairs():
    # ring, causal: kv from a later rank is all in the future; from an earlier one all visible.
    assert plan_step([(0, 16)], [(16, 16)], MaskSpec(causal=True)) == []
    (call,) = plan_step([(16, 16)], [(0, 16)], MaskSpec(causal=True))
    assert (call.q_lo, call.q_hi, call.k_lo, call.k_hi, call.mask.window) == (0, 16, 0, 16, (-1, -1))
    (diagonal,) = plan_step([(16, 16)], [(16, 16)], MaskSpec(causal=True))
    assert diagonal.mask.window == (-1, 0) and diagonal.mask.q_start == diagonal.mask.k_start == 16
    # zigzag R=4, rank 1: chunks 1 and 6 (of 8). After step 0 every step is one half-size call.
    schedule = ring_schedule(64, 4, "zigzag", causal=True)
    for ring_index, steps in enumerate(schedule):
        kv_index, first = steps[0]
        assert kv_index == ring_index and len(first) == 3  # two diagonals and one fully visible pair
        for kv_index, calls in steps[1:]:
            (call,) = calls
            assert call.mask.window == (-1, -1)
            rows, cols = call.q_hi - call.q_lo, call.k_hi - call.k_lo
            assert rows * cols == 16 * 8  # half of the 16 x 16 local square
            assert (cols == 8) == (kv_index < ring_index)  # earlier kv: its early chunk, all queries
    # not causal: one call over everything
    (full,) = plan_step([(0, 8), (56, 8)], [(8, 8), (48, 8)], MaskSpec())
    assert (full.q_lo, full.q_hi, full.k_lo, full.k_hi, full.mask.window) == (0, 16, 0, 16, (-1, -1))


# (ring_degree, ring_impl, causal, heads, kv_heads, head_dim, seq_len): odd ring sizes,
# chunks that do not fill a kernel block, GQA/MQA, head dim 80.
SIM_CASES = [(1, "zigzag", True, 2, 1, 16, 40), (2, "ring", True, 4, 2, 32, 64), (3, "zigzag", True, 2, 2, 16, 48),
             (3, "ring", False, 4, 1, 32, 48), (4, "zigzag", True, 4, 1, 80, 96), (4, "ring", True, 2, 2, 16, 40),
             (4, "zigzag", False, 4, 4, 32, 64), (2, "zigzag", True, 8, 2, 32, 72)]


@pytest.mark.parametrize("ring_degree,ring_impl,causal,heads,kv_heads,head_dim,seq_len", SIM_CASES)
def test_simulated_ring_matches_sdpa(ring_degree, ring_impl, causal, heads, kv_heads, head_dim, seq_len):
    gen = torch.Generator().manual_seed(seq_len + ring_degree)
    q = torch.randn(2, seq_len, heads, head_dim, generator=gen)
    k, v = (torch.randn(2, seq_len, kv_heads, head_dim, generator=gen) for _ in range(2))
    dout = torch.randn(2, seq_len, heads, head_dim, generator=gen)
    out, lse = simulate_ring_attention(q, k, v, ring_degree, ring_impl, causal)
    grads = simulate_ring_attention_backward(dout, q, k, v, out, lse, ring_degree, ring_impl, causal)
    ref = sdpa_with_grads(q, k, v, dout, causal)
    assert rel_err(out, ref[0]) < 1e-4
    for name, got, want in zip(("dq", "dk", "dv"), grads, ref[1:]):
        assert rel_err(got, want) < 1e-3, name
    # lse is the log-sum-exp of the scaled scores over the visible keys
    scores = torch.einsum("bqhd,bkhd->bhqk", q, k.repeat_interleave(heads // kv_heads, dim=2)) / head_dim ** 0.5
    if causal:
        scores = scores.masked_fill(torch.ones(seq_len, seq_len, dtype=torch.bool).triu(1), float("-inf"))
    assert torch.allclose(lse, scores.logsumexp(-1), rtol=1e-5, atol=1e-5)


def test_simulator_rejects_bad_length():
    q = torch.randn(1, 0, 2, 16)  # any positive length lays out (tests/cp/test_cp_varlen.py), none does not
    with pytest.raises(ValueError, match="positive int"):
        simulate_ring_attention(q, q, q, 4, "zigzag")


@pytest.mark.parametrize("world,heads,kv_heads,local,expected", [
    (8, 32, 8, 8, 8), (8, 12, 12, 8, 4), (8, 32, 8, 4, 4), (4, 12, 3, 4, 1), (6, 8, 8, 6, 2), (4, 8, 1, 4, 4),
    (16, 32, 8, 8, 8), (4, 8, 2, 1, 1)])
def test_auto_ulysses_degree(world, heads, kv_heads, local, expected):
    assert cpattn.auto_ulysses_degree(world, heads, kv_heads, local_world_size=local) == expected


def test_argparse_options():
    parser = cpattn.add_context_parallel_args(argparse.ArgumentParser())
    args = parser.parse_args(["--context-parallel-size", "4", "--context-parallel-algo", "hybrid_cp_algo",
                              "--ulysses-degree-in-cp", "2"])
    parsed = (args.context_parallel_size, args.context_parallel_algo, args.ulysses_degree_in_cp)
    assert parsed == (4, "hybrid_cp_algo", 2)
    assert parser.parse_args(["--ulysses-degree-in-cp", "auto"]).ulysses_degree_in_cp == "auto"
    defaults = parser.parse_args([])
    assert (defaults.context_parallel_size, defaults.context_parallel_algo, defaults.ulysses_degree_in_cp) == \
        (None, "ulysses_cp_algo", None)
    for bad in (["--context-parallel-algo", "ring_cp_algo"], ["--ulysses-degree-in-cp", "two"],
                ["--ulysses-degree-in-cp", "0"]):
        with pytest.raises(SystemExit):
            parser.parse_args(bad)


def test_needs_an_initialised_process_group():
    with pytest.raises(RuntimeError, match="init_process_group"):
        cpattn.ContextParallel()
