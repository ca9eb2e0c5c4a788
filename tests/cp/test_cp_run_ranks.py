"""The multi-rank harness itself: results (tensors too), errors, hangs, and inductor in forked ranks."""
import random
import time

import pytest
import torch
import torch.distributed as dist

from cpattn.testing import RankError, run_ranks


def _sum_ranks(rank, world_size):
    t = torch.tensor([float(rank)])
    dist.all_reduce(t)
    return t  # a tensor result must survive the rank's exit


def _fails_on_rank_one(rank, world_size):
    if rank == 1:
        raise ValueError("bad input on rank 1")
    return rank


def _hangs_on_rank_zero(rank, world_size):
    if rank == 0:
        time.sleep(60)
    return rank


def test_run_ranks_returns_tensors():
    results = run_ranks(_sum_ranks, 3)
    assert [r.item() for r in results] == [3.0, 3.0, 3.0]


def test_run_ranks_reports_the_failing_rank():
    with pytest.raises(RankError, match="rank 1 raised ValueError: bad input on rank 1"):
        run_ranks(_fails_on_rank_one, 2, timeout=30)


def test_run_ranks_turns_a_hang_into_an_error():
    with pytest.raises(TimeoutError, match=r"ranks \[0\] did not finish"):
        run_ranks(_hangs_on_rank_zero, 2, timeout=3)


def _compiles(rank, world_size, salt):
    return torch.compile(lambda x: x * salt + rank)(torch.ones(2)).tolist()


def test_ranks_compile_with_inductor_after_the_parent_did():
    # Forked ranks inherit inductor's pool of compile workers, which does not survive the fork: run_ranks
    # makes them compile in-process (without that, this hung until the timeout). A new constant each run
    # keeps inductor's on-disk cache from answering instead of a compile.
    salt = random.randrange(1, 2**20)
    torch.compile(lambda x: x + salt)(torch.ones(2))
    assert run_ranks(_compiles, 2, salt, timeout=120) == [[salt, salt], [salt + 1, salt + 1]]
    torch._dynamo.reset()
