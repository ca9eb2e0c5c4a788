"""ContextParallel on real gloo ranks against torch SDPA on the full sequence.

One run_ranks call per (world size, algorithm) runs every case inside the
same process group (start-up is the expensive part). Each rank shards the
full inputs, runs forward and backward on its shard, gathers output and the
three gradients, and compares them with SDPA in fp32.
"""
import os

import pytest
import torch

import cpattn
from cpattn.testing import run_ranks
from reference import rel_err, sdpa_with_grads

SEQ_LEN = 64
FWD_TOL, GRAD_TOL = 1e-4, 1e-3

# (causal, heads, kv_heads, head_dim, use the SDPA-layout method): every head layout
# appears causal, each head dim and both methods appear causal and not.
CASES = [
    (True, 8, 8, 32, False),
    (True, 8, 2, 80, False),
    (True, 8, 1, 32, True),
    (False, 8, 1, 80, False),
    (False, 8, 2, 32, True),
]

# algorithm -> (ulysses_degree, ring impls cycled over the cases, LOCAL_WORLD_SIZE for "auto")
ALGOS = {
    "ring": (1, ("ring",), None),
    "zigzag": (1, ("zigzag",), None),
    "ulysses": ("all", ("zigzag",), None),
    "usp": (2, ("zigzag", "ring"), None),
    "auto": ("auto", ("zigzag", "ring"), 2),
}
EXPECTED_DEGREE = {"ring": lambda ws: 1, "zigzag": lambda ws: 1, "ulysses": lambda ws: ws,
                   "usp": lambda ws: 2, "auto": lambda ws: 2}


def check_layout(cp):
    """shard/gather round trips (flash and SDPA sequence dims) and positions == what shard takes."""
    x = torch.randn(2, SEQ_LEN, 3, 5)
    tokens = torch.arange(SEQ_LEN)
    return (torch.equal(cp.gather(cp.shard(x)), x)
            and torch.equal(cp.gather(cp.shard(x.transpose(1, 2), seq_dim=-2), seq_dim=-2), x.transpose(1, 2))
            and torch.equal(cp.shard(tokens, seq_dim=0), cp.positions(SEQ_LEN))
            and cp.positions(SEQ_LEN).numel() == SEQ_LEN // cp.world_size)


def run_cases(rank, world_size, ulysses_degree, ring_impls, local_world_size):
    if local_world_size is not None:
        os.environ["LOCAL_WORLD_SIZE"] = str(local_world_size)  # a forked rank: the test process is unaffected
    degree = world_size if ulysses_degree == "all" else ulysses_degree
    results = []
    for i, (causal, heads, kv_heads, head_dim, sdpa) in enumerate(CASES):
        cp = cpattn.ContextParallel(ulysses_degree=degree, ring_impl=ring_impls[i % len(ring_impls)],
                                    num_heads=heads, num_kv_heads=kv_heads)
        gen = torch.Generator().manual_seed(i)
        q = torch.randn(1, SEQ_LEN, heads, head_dim, generator=gen)
        k, v = (torch.randn(1, SEQ_LEN, kv_heads, head_dim, generator=gen) for _ in range(2))
        dout = torch.randn(1, SEQ_LEN, heads, head_dim, generator=gen)
        local = [cp.shard(t) for t in (q, k, v)]
        originals = [t.clone() for t in local]
        for t in local:
            t.requires_grad_()
        if sdpa:
            out = cp.scaled_dot_product_attention(*(t.transpose(1, 2) for t in local), is_causal=causal,
                                                  enable_gqa=True).transpose(1, 2)
        else:
            out = cp.attention(*local, causal=causal)
        out.backward(cp.shard(dout))
        got = [cp.gather(t) for t in (out.detach(), *(t.grad for t in local))]
        errors = [rel_err(g, r) for g, r in zip(got, sdpa_with_grads(q, k, v, dout, causal))]
        results.append({"case": (causal, heads, kv_heads, head_dim, sdpa), "cp": repr(cp),
                        "degree": cp.ulysses_degree, "errors": errors,
                        "inputs_unchanged": all(torch.equal(a, b.detach()) for a, b in zip(originals, local)),
                        "layout_ok": check_layout(cp)})
    return results


PARAMS = [(2, "ring"), (2, "zigzag"), (2, "ulysses"), (2, "auto"),
          (4, "ring"), (4, "zigzag"), (4, "ulysses"), (4, "usp"), (4, "auto")]


@pytest.mark.parametrize("world_size,algo", PARAMS, ids=[f"{a}-{w}ranks" for w, a in PARAMS])
def test_matches_sdpa_on_full_sequence(world_size, algo):
    ulysses_degree, ring_impls, local_world_size = ALGOS[algo]
    per_rank = run_ranks(run_cases, world_size, ulysses_degree, ring_impls, local_world_size, timeout=400)
    assert len(per_rank) == world_size
    for rank, results in enumerate(per_rank):
        assert len(results) == len(CASES)
        for r in results:
            label = f"rank {rank} {r['cp']} case (causal, H, Hkv, D, sdpa)={r['case']}"
            assert r["degree"] == EXPECTED_DEGREE[algo](world_size), label
            fwd, *grads = r["errors"]
            assert fwd < FWD_TOL, f"{label}: forward rel error {fwd:.2e}"
            for name, err in zip(("dq", "dk", "dv"), grads):
                assert err < GRAD_TOL, f"{label}: {name} rel error {err:.2e}"
            assert r["inputs_unchanged"], f"{label}: an input shard was modified"
            assert r["layout_ok"], f"{label}: shard/gather/positions disagree"
