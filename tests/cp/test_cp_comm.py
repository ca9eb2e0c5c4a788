"""Communicators, the per-signature agreement cache and the topology-aware mesh, on gloo ranks.

* 50 ContextParallels over one group share one set of process groups; close()
  and the context manager give them back; a closed object refuses calls.
* The cross-rank agreement runs once per distinct call signature (no
  collective in steady state), every call with check_across_ranks="always",
  never with False.
* ulysses_degree="auto" learns the nodes from the ranks (LOCAL_RANK per rank
  simulates two nodes): a context-parallel group strided across nodes (tensor
  parallelism on the neighbouring ranks) keeps its Ulysses groups inside nodes,
  and a group whose nodes interleave gets a permuted mesh that still computes
  the right attention.
"""
import os

import pytest
import torch
import torch.distributed as dist

import cpattn
import cpattn.agreement as agreement_module
from cpattn.comm import live_groups
from cpattn.testing import run_ranks
from reference import rel_err, sdpa_with_grads


def qkv(seq_len, heads=4, kv_heads=2, head_dim=16, seed=0):
    gen = torch.Generator().manual_seed(seed)
    return [torch.randn(1, seq_len, h, head_dim, generator=gen) for h in (heads, kv_heads, kv_heads, heads)]


def run_communicators(rank, world_size):
    made = []
    original = dist.new_group

    def counting_new_group(*args, **kwargs):
        made.append(args[0] if args else kwargs.get("ranks"))
        return original(*args, **kwargs)

    dist.new_group = counting_new_group
    try:
        many = [cpattn.ContextParallel(ulysses_degree=(1, 2, 4)[i % 3]) for i in range(50)]
        made_by_many, shared = list(made), sorted(live_groups().items())
        q, k, v, _ = qkv(32)
        out = many[-1].attention(*(many[-1].shard(t) for t in (q, k, v)), causal=True)
        for cp in many:
            cp.close()
        after_close = live_groups()
        with cpattn.ContextParallel(ulysses_degree=2) as cp:
            inside = len(live_groups())
        try:
            cp.attention(*(cp.shard(t) for t in (q, k, v)))
            closed_call = "no error"
        except RuntimeError as exc:
            closed_call = str(exc)
    finally:
        dist.new_group = original
    return made_by_many, shared, after_close, inside, len(live_groups()), closed_call, out.shape


def test_constructions_share_one_set_of_groups():
    for made, shared, after_close, inside, after_with, closed_call, shape in run_ranks(run_communicators, 4):
        # the whole group (also the Ulysses group of degree 4) and the two Ulysses groups of degree 2
        assert sorted(map(sorted, made)) == [[0, 1], [0, 1, 2, 3], [2, 3]]
        # every rank holds both Ulysses groups of degree 2 (new_group is collective over the world);
        # the 16 objects of degree 4 use the whole group twice
        assert [(ranks, users) for (_, ranks, _), users in shared] == [((0, 1), 17), ((0, 1, 2, 3), 50 + 16),
                                                                       ((2, 3), 17)]
        assert after_close == {} and inside > 0 and after_with == 0
        assert "closed" in closed_call and shape == (1, 8, 4, 16)


def run_signature_cache(rank, world_size):
    calls = []
    original = agreement_module.gather_rows

    def counting_gather_rows(*args, **kwargs):
        calls.append(1)
        return original(*args, **kwargs)

    agreement_module.gather_rows = counting_gather_rows
    counts = {}
    q, k, v, _ = qkv(32)
    try:
        for mode in (True, "always", False):
            cp = cpattn.ContextParallel(ulysses_degree=2, check_across_ranks=mode)
            local = [cp.shard(t) for t in (q, k, v)]
            for name, call in (("first", lambda: cp.attention(*local, causal=True)),
                               ("same", lambda: cp.attention(*local, causal=True)),
                               ("same again", lambda: cp.attention(*local, causal=True)),
                               ("causal differs", lambda: cp.attention(*local)),
                               ("with lse", lambda: cp.attention(*local, return_lse=True)),
                               ("shorter", lambda: cp.attention(*(t[:, :4] for t in local))),
                               ("shorter again", lambda: cp.attention(*(t[:, :4] for t in local)))):
                before = len(calls)
                call()
                counts[(mode, name)] = len(calls) - before
            cp.close()
    finally:
        agreement_module.gather_rows = original
    return counts


def test_agreement_once_per_signature():
    for counts in run_ranks(run_signature_cache, 2):
        for name, expected in (("first", 1), ("same", 0), ("same again", 0), ("causal differs", 1),
                               ("with lse", 1), ("shorter", 1), ("shorter again", 0)):
            assert counts[(True, name)] == expected, (name, counts)
            assert counts[("always", name)] == 1, (name, counts)
            assert counts[(False, name)] == 0, (name, counts)


def run_strided_nodes(rank, world_size):
    """8 ranks on two simulated nodes of 4; tensor parallelism pairs (0,1), (2,3)...; context
    parallelism over every other rank, so each node holds 2 ranks of each context-parallel group."""
    os.environ["LOCAL_RANK"], os.environ["LOCAL_WORLD_SIZE"] = str(rank % 4), "4"
    groups = [dist.new_group([r for r in range(8) if r % 2 == parity]) for parity in (0, 1)]
    with cpattn.ContextParallel(groups[rank % 2], ulysses_degree="auto", num_heads=8, num_kv_heads=8) as cp:
        return cp.describe()


def run_interleaved_nodes(rank, world_size):
    """4 ranks, nodes interleaved: ranks 0 and 2 on one node, 1 and 3 on the other."""
    os.environ["LOCAL_RANK"] = str(rank - rank % 2)  # node of rank r starts at global rank r % 2
    q, k, v, dout = qkv(32)
    with cpattn.ContextParallel(ulysses_degree="auto", num_heads=4, num_kv_heads=2) as cp:
        local = [cp.shard(t).requires_grad_() for t in (q, k, v)]
        out = cp.attention(*local, causal=True)
        out.backward(cp.shard(dout))
        got = [cp.gather(t) for t in (out.detach(), *(t.grad for t in local))]
        errors = [rel_err(a, b) for a, b in zip(got, sdpa_with_grads(q, k, v, dout, True))]
        positions_ok = torch.equal(cp.shard(torch.arange(32), seq_dim=0), cp.positions(32))
        return cp.describe(), errors, positions_ok


@pytest.mark.parametrize("layout", ["strided", "interleaved"])
def test_auto_keeps_ulysses_inside_nodes(layout):
    if layout == "strided":
        for rank, d in enumerate(run_ranks(run_strided_nodes, 8)):
            parity = rank % 2
            assert d["ulysses_degree"] == 2 and d["ring_degree"] == 2, d
            assert d["ulysses_groups"] == [[parity, parity + 2], [parity + 4, parity + 6]], d
            assert "2 node(s)" in d["why"] and "inside one node" in d["why"], d["why"]
            assert d["node_of_rank"] == {parity: 0, parity + 2: 0, parity + 4: 1, parity + 6: 1}
    else:
        for rank, (d, errors, positions_ok) in enumerate(run_ranks(run_interleaved_nodes, 4)):
            assert d["ulysses_groups"] == [[0, 2], [1, 3]] and d["rings"] == [[0, 1], [2, 3]], d
            assert d["mesh_rank"] == [0, 2, 1, 3][rank]
            assert errors[0] < 1e-4 and max(errors[1:]) < 1e-3, errors
            assert positions_ok


def test_explicit_degree_says_when_ulysses_spans_nodes():
    plan = cpattn.mesh.plan_mesh(4, [0, 0, 1, 1, 0, 0, 1, 1])
    assert plan.order == tuple(range(8)) and "2 Ulysses group(s) span nodes" in plan.reason
    auto = cpattn.mesh.plan_mesh("auto", ["a", "a", "b", "b", "a", "a", "b", "b"], num_heads=8)
    assert auto.ulysses_degree == 4 and auto.ulysses_groups() == [[0, 1, 4, 5], [2, 3, 6, 7]]
    uneven = cpattn.mesh.plan_mesh("auto", ["a", "a", "a", "a", "b", "b"], num_heads=6)
    assert uneven.ulysses_degree == 2 and uneven.ulysses_groups() == [[0, 1], [2, 3], [4, 5]]
