"""A failure on one rank inside a context-parallel call makes every rank raise, in bounded time.

4 gloo ranks run one scenario after another in the same process group. In
each, one rank fails (``cpattn.faults.inject_faults``) at one place: every ring
step of the forward and of the backward, between the two Ulysses all-to-alls
(forward and backward), inside a USP mesh with an out-of-memory error, with an
input that turns bad on one rank after the signature was agreed, and a rank
that hangs instead of raising. The failing rank must raise its own error, every
other rank PeerFailure naming it (or, for the hang, the collective that timed
out), within the timeout; afterwards a new ContextParallel on the same group
computes the right answer, and no process is left running.
"""
import multiprocessing
import time

import torch

import cpattn
from cpattn.faults import inject_faults
from cpattn.testing import run_ranks
from fault_scenarios import check_outcomes, fault_hook, outcome
from reference import rel_err, sdpa_with_grads

WORLD, SEQ_LEN, HEADS, HEAD_DIM = 4, 32, 4, 16
TIMEOUT = 6.0  # the bound given to ContextParallel(timeout=...)
# A rank raises at its next communication after the fault: a few kernel calls later at most, which on a
# loaded 2-core machine (the interpreter, up to 8 processes) can take seconds.
COMPUTE_SLACK = 8.0

# name -> (ulysses degree, fault place, step (None: any), failing rank, what it does)
SCENARIOS = {
    **{f"ring forward step {s}": (1, "ring forward", s, 1, "raise") for s in range(WORLD)},
    **{f"ring backward step {s}": (1, "ring backward", s, 2, "raise") for s in range(WORLD)},
    "ulysses forward, between the all-to-alls": (WORLD, "ulysses forward", None, 3, "raise"),
    "ulysses backward, between the all-to-alls": (WORLD, "ulysses backward", None, 0, "raise"),
    "usp 2x2, out of memory at ring forward step 1": (2, "ring forward", 1, 3, "oom"),
    "input turns bad on one rank after agreement": (1, None, None, 2, "bad input"),
    "a rank hangs at ring forward step 1": (1, "ring forward", 1, 1, "hang"),
}


def inputs(seed=0):
    gen = torch.Generator().manual_seed(seed)
    return [torch.randn(1, SEQ_LEN, HEADS, HEAD_DIM, generator=gen) for _ in range(4)]  # q, k, v, dout


def run_scenarios(rank, world_size):
    full = inputs()
    with cpattn.ContextParallel() as warm:  # first calls of the interpreter, under the default timeout
        warm.attention(*(warm.shard(t) for t in full[:3]), causal=True)
    outcomes = {}
    for name, (degree, place, step, culprit, action) in SCENARIOS.items():
        cp = cpattn.ContextParallel(ulysses_degree=degree, timeout=TIMEOUT)
        q, k, v, dout = (cp.shard(t) for t in full)
        local = [t.requires_grad_() for t in (q, k, v)]
        fault = {}

        def call():
            nonlocal local
            with inject_faults(fault_hook(rank, place, step, culprit, action, TIMEOUT, fault)):
                if action == "bad input":
                    cp.attention(*local, causal=True)  # agreed: the next call skips the exchange
                    if rank == culprit:
                        fault["time"] = time.time()
                        # k/v one token short of q: locally invalid (a shorter q, k and v together
                        # is a valid uneven length, which this rank cannot tell from a bad one)
                        local = [local[0], *(t[:, :-1] for t in local[1:])]
                cp.attention(*local, causal=True).backward(dout)

        outcomes[name] = (*outcome(call), time.time(), fault.get("time"))
        cp.close()
    # The group is fine: a new ContextParallel gives the right answer.
    cp = cpattn.ContextParallel(ulysses_degree=2, timeout=TIMEOUT)
    local = [cp.shard(t).requires_grad_() for t in full[:3]]
    out = cp.attention(*local, causal=True)
    out.backward(cp.shard(full[3]))
    after = [cp.gather(t) for t in (out.detach(), *(t.grad for t in local))]
    errors = [rel_err(a, b) for a, b in zip(after, sdpa_with_grads(*full[:3], full[3], True))]
    return outcomes, errors


def test_every_rank_raises_within_the_timeout():
    per_rank = run_ranks(run_scenarios, WORLD, timeout=300)
    assert not multiprocessing.active_children(), "a rank process is still running"
    for name, (_, _, _, culprit, action) in SCENARIOS.items():
        check_outcomes([outcomes[name][:4] for outcomes, _ in per_rank], per_rank[culprit][0][name][4], culprit,
                       action, TIMEOUT + COMPUTE_SLACK, "ring exchange", "ContextParallel.attention", name)
    for rank, (_, errors) in enumerate(per_rank):
        assert max(errors) < 1e-3, f"rank {rank}: a ContextParallel built after the faults is wrong: {errors}"
