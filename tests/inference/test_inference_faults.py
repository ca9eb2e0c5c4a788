"""A failure on one rank inside prefill or decode makes every rank raise, in bounded time.

4 gloo ranks run the scenarios one after another. In each, a fresh cache
(``timeout=TIMEOUT``) is prefilled and then decoded; one rank fails at one
place (``cpattn.faults.inject_faults``): in a pass-Q prefill before the
all-to-all of the partials, at every ring step of a pass-KV prefill, in decode
before the cross-rank merge, and in decode by hanging instead of raising. The
failing rank must raise its own error, every other rank ``PeerFailure`` naming
it (for the hang: the merge that timed out), within the bound; the caches
sharing the failed process group refuse the next call; a cache built afterwards
is exact; no process is left running. Also: a constructor argument bad on one
rank only raises on every rank.
"""
import multiprocessing
import time

import torch

import cpattn
from cpattn.faults import inject_faults
from cpattn.testing import run_ranks
from fault_scenarios import check_outcomes, fault_hook, outcome
from test_inference import sdpa_rows

WORLD, H, HKV, D, CHUNK = 4, 4, 2, 16, 32
TIMEOUT = 6.0
COMPUTE_SLACK = 8.0  # the kernels a rank runs before its next communication, on a loaded 2-core machine

# name -> (prefill strategy, fault place, step (None: any), failing rank, what it does)
SCENARIOS = {
    "prefill pass-q, before the all-to-all": ("pass-q", "prefill", None, 1, "raise"),
    **{f"prefill pass-kv, ring step {s}": ("pass-kv", "prefill", s, 2, "raise") for s in range(WORLD)},
    "decode, before the merge": ("pass-q", "decode", None, 3, "raise"),
    "decode, out of memory": ("pass-kv", "decode", None, 0, "oom"),
    "decode, a rank hangs": ("pass-q", "decode", None, 1, "hang"),
}


def inputs(seed=0):
    gen = torch.Generator().manual_seed(seed)
    q = torch.randn(1, CHUNK + 1, H, D, generator=gen)
    k, v = (torch.randn(1, CHUNK + 1, HKV, D, generator=gen) for _ in range(2))
    return q, k, v


def prefill_then_decode(cache, rank, strategy, full):
    """Prefill the first CHUNK tokens (this rank's contiguous piece), then decode the next one."""
    q, k, v = full
    piece = CHUNK // WORLD
    mine = slice(rank * piece, (rank + 1) * piece)
    cpattn.prefill(cache, q[:, mine], k[:, mine], v[:, mine], strategy=strategy)
    return cpattn.decode(cache, q[:, CHUNK:], k[:, CHUNK:], v[:, CHUNK:])


def run_scenarios(rank, world_size):
    full = inputs()
    # Construction is collective: a bad argument on one rank raises on every rank (none is left waiting).
    bad_construction = outcome(lambda: cpattn.ShardedKVCache(1, CHUNK + 1, HKV, D, page_size=15 if rank == 1 else 16,
                                                             timeout=TIMEOUT))
    outcomes = {"bad construction": bad_construction}
    for name, (strategy, place, step, culprit, action) in SCENARIOS.items():
        cache = cpattn.ShardedKVCache(1, CHUNK + 1, HKV, D, page_size=16, timeout=TIMEOUT)
        fault = {}

        def call():
            with inject_faults(fault_hook(rank, place, step, culprit, action, TIMEOUT, fault)):
                prefill_then_decode(cache, rank, strategy, full)

        raised = outcome(call)
        # The cache can no longer communicate: its next collective call says so at once.
        _, _, refused = outcome(lambda: cpattn.decode(cache, *(t[:, CHUNK:] for t in full)))
        outcomes[name] = (*raised, time.time(), fault.get("time"), refused)
        cache.close()
    # The group is fine: a new cache gives the right answer.
    with cpattn.ShardedKVCache(1, CHUNK + 1, HKV, D, page_size=16, timeout=TIMEOUT) as cache:
        out = prefill_then_decode(cache, rank, "auto", full)
    q, k, v = full
    error = (out - sdpa_rows(q[:, CHUNK:], k, v, CHUNK)).abs().max().item()
    return outcomes, error


def test_every_rank_raises_within_the_timeout():
    per_rank = run_ranks(run_scenarios, WORLD, timeout=300)
    assert not multiprocessing.active_children(), "a rank process is still running"
    for rank, (outcomes, _) in enumerate(per_rank):
        kind, _, message = outcomes["bad construction"]
        expected = "page_size must be a power of two" if rank == 1 else "rank(s) [1] of the context-parallel group"
        assert kind == "ValueError" and expected in message, f"rank {rank}: {kind}: {message}"
    for name, (_, place, _, culprit, action) in SCENARIOS.items():
        check_outcomes([outcomes[name][:4] for outcomes, _ in per_rank], per_rank[culprit][0][name][4], culprit,
                       action, TIMEOUT + COMPUTE_SLACK, "decode merge", place, name)
        for rank, (outcomes, _) in enumerate(per_rank):
            assert "build a new ShardedKVCache" in outcomes[name][5], \
                f"{name}, rank {rank}: the call after the failure gave {outcomes[name][5]!r}"
    for rank, (_, error) in enumerate(per_rank):
        assert error < 1e-4, f"rank {rank}: a cache built after the faults is wrong: {error}"
