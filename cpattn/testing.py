"""Helpers to run a function on several CPU ranks (gloo) in one test.

``run_ranks(fn, world_size, *args)`` forks ``world_size`` processes, builds a
gloo process group in each, calls ``fn(rank, world_size, *args)`` and returns
the per-rank results (anything picklable, tensors included: results travel
pickled by value, not through shared memory that dies with the rank). An exception on any rank is
re-raised here with that rank's traceback; a rank that hangs past ``timeout``
fails the call instead of hanging the test suite. Forked ranks that torch.compile
with inductor compile in their own process (the parent's compile workers do not
survive the fork).
"""
import datetime
import multiprocessing
import pickle
import queue
import socket
import sys
import time
import traceback

import torch
import torch.distributed as dist


class RankError(RuntimeError):
    """A rank raised; the message holds its rank, exception type and traceback."""


def free_port():
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _worker(rank, world_size, port, timeout, backend, fn, args, results):
    try:
        torch.set_num_threads(1)
        if backend == "gloo" and "torch._inductor.config" in sys.modules:
            # A forked rank compiles in its own process: the pool of compile workers inductor started in
            # the parent does not survive the fork (a compile waiting for it never returns).
            sys.modules["torch._inductor.config"].compile_threads = 1
        if backend == "nccl":
            # Ranks share the GPUs round-robin (several ranks on one GPU need NCCL >= 2.30
            # and NCCL_MULTI_RANK_GPU_ENABLE=1).
            torch.cuda.set_device(rank % torch.cuda.device_count())
        dist.init_process_group(backend, init_method=f"tcp://127.0.0.1:{port}", rank=rank,
                                world_size=world_size, timeout=datetime.timedelta(seconds=timeout))
        try:
            value = fn(rank, world_size, *args)
        finally:
            dist.destroy_process_group()
        results.put((rank, True, pickle.dumps(value)))
    except BaseException as exc:  # report everything, including assertion failures
        results.put((rank, False, (type(exc).__name__, str(exc), traceback.format_exc())))


def run_ranks(fn, world_size, *args, timeout=120.0, backend="gloo"):
    """Run ``fn(rank, world_size, *args)`` on ``world_size`` ranks; return [result of rank 0, ...].

    ``backend="gloo"`` forks CPU processes (fast). ``backend="nccl"`` spawns fresh
    processes instead (CUDA cannot be used in a forked child), so ``fn`` must be a
    module-level function of an importable module, and the calling script must
    guard its entry point with ``if __name__ == "__main__"``.
    """
    if backend not in ("gloo", "nccl"):
        raise ValueError(f"run_ranks: backend must be 'gloo' or 'nccl', got {backend!r}")
    ctx = multiprocessing.get_context("fork" if backend == "gloo" else "spawn")
    results = ctx.Queue()
    port = free_port()
    # Collectives give up a little before the whole run does, so a hang surfaces as an error.
    collective_timeout = max(5.0, timeout * 0.8)
    procs = [ctx.Process(target=_worker, args=(r, world_size, port, collective_timeout, backend, fn, args, results),
                         daemon=True) for r in range(world_size)]
    for p in procs:
        p.start()
    deadline = time.monotonic() + timeout
    outcomes = {}
    try:
        while len(outcomes) < world_size:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                missing = sorted(set(range(world_size)) - set(outcomes))
                raise TimeoutError(f"run_ranks: ranks {missing} did not finish within {timeout:.0f}s (hang?)")
            try:
                rank, ok, value = results.get(timeout=min(remaining, 1.0))
            except queue.Empty:
                dead = [r for r, p in enumerate(procs) if not p.is_alive() and p.exitcode not in (0, None)
                        and r not in outcomes]
                if dead:
                    # Give its queue message a moment to arrive before declaring a crash.
                    time.sleep(0.5)
                    if results.empty():
                        raise RankError(f"rank {dead[0]} died with exit code {procs[dead[0]].exitcode}")
                continue
            outcomes[rank] = (ok, value)
            if not ok:
                name, message, tb = value
                raise RankError(f"rank {rank} raised {name}: {message}\n{tb}")
    finally:
        for p in procs:
            p.join(timeout=0.2)
            if p.is_alive():
                p.kill()
                p.join()
    return [pickle.loads(outcomes[r][1]) for r in range(world_size)]

