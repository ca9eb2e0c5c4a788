"""ContextParallel under torch.compile, on gloo ranks (cpattn/cp_ops.py).

Each algorithm runs inside a small model (projections, context-parallel
attention, output projection) compiled whole with inductor, forward and
backward, against the same model in eager mode: ring, zigzag and Ulysses on 2
ranks, USP on 4 (2 x 2, the smallest two-dimensional mesh). The cases vary
what else the call does: both methods (flash and SDPA layout), GQA and MQA,
causal and a window, sinks, lse, packed documents (uneven shards), and one
model with a graph break next to the call (``fullgraph=False``). Then, on 2
ranks: bad arguments and disagreeing ranks raise on every rank, a fault inside
a compiled call makes every rank raise within the timeout, and decode_step
compiles with inductor across ranks.
"""
import time

import torch

import cpattn
from cpattn.faults import inject_faults
from cpattn.testing import run_ranks
from fault_scenarios import check_outcomes, fault_hook, outcome

SEQ_LEN, HEAD_DIM = 24, 16  # 12 tokens per rank on 2 ranks, 6 on 4; zigzag chunks of 6 and 3
DOCS = torch.tensor([0, 5, 17, 24], dtype=torch.int32)  # packed documents: shards of uneven lengths


def ring_call(cp, q, k, v, sinks):
    out, lse = cp.attention(q, k, v, causal=True, return_lse=True, sinks=sinks)
    return out + lse.transpose(1, 2)[..., None] * 0.1  # lse is not differentiable: this adds a constant


def zigzag_call(cp, q, k, v, sinks):
    torch._dynamo.graph_break()  # the model also compiles around graph breaks
    return cp.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), is_causal=True,
                                           enable_gqa=True).transpose(1, 2)


def ulysses_call(cp, q, k, v, sinks):
    return cp.attention(q, k, v, causal=True, window_size=(7, 0), cu_seqlens=DOCS)


def usp_call(cp, q, k, v, sinks):
    return cp.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), is_causal=True,
                                           enable_gqa=True, softcap=5.0).transpose(1, 2)


# name -> (ulysses degree, ring impl, heads, kv heads, the call, packed documents, fullgraph)
ALGORITHMS = {
    "ring": (1, "ring", 2, 2, ring_call, None, True),
    "zigzag": (1, "zigzag", 4, 2, zigzag_call, None, False),
    "ulysses": (2, "zigzag", 4, 2, ulysses_call, DOCS, True),
    "usp": (2, "zigzag", 2, 1, usp_call, None, True),
}


class Block(torch.nn.Module):
    """x -> q, k, v projections -> context-parallel attention -> output projection, plus x."""

    def __init__(self, cp, call, heads, kv_heads):
        super().__init__()
        gen = torch.Generator().manual_seed(0)  # the same weights on every rank
        width = heads * HEAD_DIM
        self.cp, self.call, self.heads, self.kv_heads = cp, call, heads, kv_heads
        self.qkv = torch.nn.Parameter(torch.randn(width, (heads + 2 * kv_heads) * HEAD_DIM, generator=gen) * 0.2)
        self.proj = torch.nn.Parameter(torch.randn(width, width, generator=gen) * 0.2)
        self.sinks = torch.nn.Parameter(torch.randn(heads, generator=gen))

    def forward(self, x):
        batch, length, width = x.shape
        q, k, v = (x @ self.qkv).view(batch, length, -1, HEAD_DIM).split([self.heads, self.kv_heads, self.kv_heads], 2)
        return x + self.call(self.cp, q, k, v, self.sinks).reshape(batch, length, width) @ self.proj


def outputs_and_grads(model, x):
    x = x.clone().requires_grad_()
    out = model(x)
    gen = torch.Generator().manual_seed(1)
    grads = torch.autograd.grad((out * torch.randn(out.shape, generator=gen)).sum(), [x, *model.parameters()],
                                allow_unused=True)
    return [out.detach(), *(torch.zeros(()) if g is None else g for g in grads)]


def run_algorithms(rank, world_size, names):
    """{name: [max |compiled - eager| of out, dx, and each parameter's gradient]}."""
    diffs = {}
    for name in names:
        degree, ring_impl, heads, kv_heads, call, docs, fullgraph = ALGORITHMS[name]
        cp = cpattn.ContextParallel(ulysses_degree=degree, ring_impl=ring_impl)
        x = cp.shard(torch.randn(1, SEQ_LEN, heads * HEAD_DIM, generator=torch.Generator().manual_seed(2)),
                     cu_seqlens=docs)
        model = Block(cp, call, heads, kv_heads)
        eager = outputs_and_grads(model, x)
        compiled = outputs_and_grads(torch.compile(model, fullgraph=fullgraph), x)  # inductor
        diffs[name] = [float((a - b).abs().max()) for a, b in zip(compiled, eager)]
        cp.close()
    if world_size == 2:
        diffs["decode_step"] = decode_step_diffs()
    return diffs


def decode_step_diffs():
    """decode_step compiled with inductor (a functional all-gather, the merge operator) against eager."""
    gen = torch.Generator().manual_seed(3)
    caches = [cpattn.ShardedKVCache(2, 64, 2, HEAD_DIM, page_size=16) for _ in range(2)]
    prompt = [torch.randn(2, 20, h, HEAD_DIM, generator=gen) for h in (4, 2, 2)]
    for cache in caches:
        cpattn.prefill(cache, *(t[:, cache.rank * 10:(cache.rank + 1) * 10] for t in prompt),
                       token_index=torch.arange(cache.rank * 10, (cache.rank + 1) * 10))
        cache.reserve(2)
    compiled = torch.compile(cpattn.decode_step, fullgraph=True)
    diffs = []
    for _ in range(2):
        q, k, v = (torch.randn(2, 1, h, HEAD_DIM, generator=gen) for h in (4, 2, 2))
        want = cpattn.decode_step(caches[0], q, k, v, softcap=8.0)
        diffs.append(float((compiled(caches[1], q, k, v, softcap=8.0) - want).abs().max()))
    return diffs


def check(per_rank, names):
    for rank, diffs in enumerate(per_rank):
        for name in names:
            labels = ["out", "dx", "d qkv weight", "d proj weight", "d sinks"]
            for label, diff in zip(labels, diffs[name]):
                assert diff < 1e-5, f"rank {rank} {name}: {label} differs from eager by {diff:.2e}"
        if "decode_step" in diffs:
            assert max(diffs["decode_step"]) == 0.0, f"rank {rank}: decode_step {diffs['decode_step']}"


def test_ring_zigzag_and_ulysses_compile_on_two_ranks():
    names = ["ring", "zigzag", "ulysses"]
    check(run_ranks(run_algorithms, 2, names, timeout=400), names)


def test_usp_compiles_on_four_ranks():
    check(run_ranks(run_algorithms, 4, ["usp"], timeout=400), ["usp"])


# ----------------------------------------------------------------------------- errors and faults

TIMEOUT = 6.0  # ContextParallel(timeout=...) of the fault scenarios
COMPUTE_SLACK = 8.0  # as in test_cp_faults.py: a loaded 2-core machine running the interpreter


def run_errors_and_faults(rank, world_size):
    gen = torch.Generator().manual_seed(4)
    full = [torch.randn(1, 16, 2, HEAD_DIM, generator=gen) for _ in range(4)]  # q, k, v, dout
    cp = cpattn.ContextParallel(ring_impl="ring")
    q, k, v, dout = (cp.shard(t) for t in full)

    def compiled(fn, fullgraph=True):
        return torch.compile(fn, fullgraph=fullgraph, backend="aot_eager")

    outcomes = {
        # The traced checks raise while compiling; with graph breaks allowed, dynamo then runs the function
        # eagerly, whose checks and agreement make the other rank (already in the compiled call) raise too.
        "one rank's window is invalid": outcome(lambda: compiled(
            lambda q: cp.attention(q, k, v, window_size=(-5, 0) if rank == 0 else (3, 0)), fullgraph=False)(q)),
        "one rank's causal differs": outcome(lambda: compiled(lambda q: cp.attention(q, k, v, causal=rank == 0))(q)),
        "one rank compiles, one does not": outcome(
            lambda: (compiled(lambda q: cp.attention(q, k, v)) if rank else lambda q: cp.attention(q, k, v))(q)),
    }
    cp.close()

    faults = {}
    for place, culprit in (("ring forward", 1), ("ring backward", 0)):
        cp = cpattn.ContextParallel(ring_impl="zigzag", timeout=TIMEOUT)
        q, k, v, dout = (cp.shard(t).requires_grad_() for t in full)
        step = compiled(lambda q, k, v: cp.attention(q, k, v, causal=True))
        step(q, k, v)  # compiled and agreed before the fault
        fault = {}

        def call():
            with inject_faults(fault_hook(rank, place, 1, culprit, "raise", TIMEOUT, fault)):
                torch.autograd.grad(step(q, k, v), (q, k, v), dout)
        faults[place] = (*outcome(call), time.time(), fault.get("time"), culprit)
        cp.close()
    # The group still works (and no rank leaves before the others have read the failure records): a new
    # ContextParallel's compiled call, forward and backward, equals eager.
    cp = cpattn.ContextParallel(ring_impl="ring")
    q, k, v, dout = (cp.shard(t) for t in full)
    leaf = q.clone().requires_grad_()
    out = compiled(lambda q: cp.attention(q, k, v, causal=True))(leaf)
    (dq,) = torch.autograd.grad(out, leaf, dout)
    eager_leaf = q.clone().requires_grad_()
    eager_out = cp.attention(eager_leaf, k, v, causal=True)
    (eager_dq,) = torch.autograd.grad(eager_out, eager_leaf, dout)
    good = max(float((out - eager_out).abs().max()), float((dq - eager_dq).abs().max()))
    return outcomes, good, faults


def test_errors_and_faults_under_compile_raise_on_every_rank():
    per_rank = run_ranks(run_errors_and_faults, 2, timeout=300)
    for rank, (outcomes, good, _) in enumerate(per_rank):
        kind, _, message = outcomes["one rank's window is invalid"]
        assert kind == "ValueError" and ("window_size left" if rank == 0 else "rank(s) [0]") in message, (rank, message)
        for name in ("one rank's causal differs", "one rank compiles, one does not"):
            kind, _, message = outcomes[name]
            assert kind == "ValueError" and "disagree" in message, (rank, name, kind, message)
        assert good == 0.0, f"rank {rank}: a good compiled call after the faults differs from eager by {good}"
    for place in ("ring forward", "ring backward"):
        culprit = per_rank[0][2][place][-1]
        check_outcomes([faults[place][:4] for _, _, faults in per_rank], per_rank[culprit][2][place][4], culprit,
                       "raise", TIMEOUT + COMPUTE_SLACK, "ring exchange", "ContextParallel.attention",
                       f"compiled, fault at {place}")
