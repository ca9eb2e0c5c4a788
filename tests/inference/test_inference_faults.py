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

``transfer_cache`` the same way, on 2 ranks (prefill on both, decode on rank 1)
and on 3 (prefill on 0-1, decode on 2): one rank fails after posting its
messages, or inside ``CacheTransfer.wait`` (also a sender whose messages are
all done), and every rank raises, within the timeout; a ``timeout`` or a
``batch_index`` bad on one rank raises on every rank; a transfer afterwards
moves every token and gives its process group back.
"""
import multiprocessing
import time

import pytest
import torch
import torch.distributed as dist

import cpattn
from cpattn.comm import live_groups
from cpattn.faults import inject_faults
from cpattn.testing import run_ranks
from cpattn.transfer import close_transfer_groups
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


# ----------------------------------------------------------------------------- transfer_cache

TRANSFER_LENGTHS = (40, 23)  # the source sequences' lengths: several messages per sequence, of uneven sizes
TRANSFER_TIMEOUT = 5.0
# world -> (prefill ranks, decode ranks)
TRANSFER_GROUPS = {2: ([0, 1], [1]), 3: ([0, 1], [2])}
# world -> {name: (fault place, step (None: any), failing rank, what it does)}
TRANSFER_SCENARIOS = {
    2: {"after posting, a sender": ("transfer_cache", "posted", 0, "raise"),
        "storing sequence 1, the receiver": ("CacheTransfer.wait", 1, 1, "raise")},
    3: {"after posting, the receiver": ("transfer_cache", "posted", 2, "raise"),
        "in wait, a sender whose messages are done": ("CacheTransfer.wait", None, 0, "oom")},
}
# argument -> what the rank it is bad on raises (the others: ValueError naming that rank)
BAD_ON_ONE_RANK = {"timeout": "timeout must be a positive number", "batch_index": "batch_index must be distinct"}


def transfer_scenarios(rank, world):
    prefill_ranks, decode_ranks = TRANSFER_GROUPS[world]
    prefill_group, decode_group = dist.new_group(prefill_ranks), dist.new_group(decode_ranks)
    gen = torch.Generator().manual_seed(1)
    k, v = (torch.randn(2, max(TRANSFER_LENGTHS), HKV, D, generator=gen) for _ in range(2))
    src = dst = None
    if rank in prefill_ranks:
        src = cpattn.ShardedKVCache(2, 64, HKV, D, group=prefill_group, page_size=16)
        for b, n in enumerate(TRANSFER_LENGTHS):
            src.append(k[b:b + 1, :n], v[b:b + 1, :n], batch_index=[b])
    if rank in decode_ranks:
        dst = cpattn.ShardedKVCache(2, 64, HKV, D, group=decode_group)
    # name -> (the one rank it is bad on: a decode rank, a prefill rank; what every rank raised)
    last = world - 1
    timeout, ids = (0 if rank == last else TRANSFER_TIMEOUT), ([0, 2] if rank == 0 else None)
    bad = {"timeout": (last, outcome(lambda: cpattn.transfer_cache(src, dst, timeout=timeout))),
           "batch_index": (0, outcome(lambda: cpattn.transfer_cache(src, dst, batch_index=ids,
                                                                    timeout=TRANSFER_TIMEOUT)))}
    outcomes = {}
    for name, (place, step, culprit, action) in TRANSFER_SCENARIOS[world].items():
        if dst is not None:
            dst.reset()
        fault = {}

        def call():
            with inject_faults(fault_hook(rank, place, step, culprit, action, TRANSFER_TIMEOUT, fault)):
                transfer = cpattn.transfer_cache(src, dst, timeout=TRANSFER_TIMEOUT)
                transfer.wait([1])
                transfer.wait()

        outcomes[name] = (*outcome(call), time.time(), fault.get("time"))
    # The faults leave nothing behind: transfers afterwards move every token, on one new group that the
    # second transfer reuses (kept), until close_transfer_groups gives it back.
    kept = []
    for _ in range(2):
        if dst is not None:
            dst.reset()
        cpattn.transfer_cache(src, dst, timeout=TRANSFER_TIMEOUT).wait()
        kept.append({key: users for key, users in live_groups().items() if key[2] == TRANSFER_TIMEOUT})
    close_transfer_groups()
    left = [key for key in live_groups() if key[2] == TRANSFER_TIMEOUT]
    exact = []
    if dst is not None:
        k_dst, v_dst = dst.gather()
        for b, n in enumerate(TRANSFER_LENGTHS):
            exact.append(bool(torch.equal(k_dst[b, :n], k[b, :n]) and torch.equal(v_dst[b, :n], v[b, :n])))
    return bad, outcomes, (kept, left), exact


@pytest.mark.parametrize("world", [2, 3])
def test_transfer_cache_fails_on_every_rank_within_the_timeout(world):
    per_rank = run_ranks(transfer_scenarios, world, timeout=120)
    assert not multiprocessing.active_children(), "a rank process is still running"
    for rank, (bad, _, (kept, left), exact) in enumerate(per_rank):
        for name, (culprit, (kind, _, message)) in bad.items():
            expected = BAD_ON_ONE_RANK[name] if rank == culprit else f"rank(s) [{culprit}]"
            assert kind == "ValueError" and expected in message, f"rank {rank}: {kind}: {message}"
        assert len(kept[0]) == 1 and kept[0] == kept[1], f"rank {rank}: the transfers did not keep one group: {kept}"
        assert not left, f"rank {rank}: close_transfer_groups did not give the group back: {left}"
        assert all(exact), f"rank {rank}: the transfer after the faults moved wrong keys or values"
    for name, (place, _, culprit, action) in TRANSFER_SCENARIOS[world].items():
        check_outcomes([outcomes[name][:4] for _, outcomes, _, _ in per_rank], per_rank[culprit][1][name][4],
                       culprit, action, TRANSFER_TIMEOUT, None, place, f"{world} ranks, {name}")
