"""Context-parallel decomposition on one GPU: what ring / zigzag cost beyond one kernel,
and what every algorithm costs the host.

    python bench/bench_cp_decomposition.py            # on a GPU
    python bench/bench_cp_decomposition.py --quick    # tiny shapes on CPU: tests the script, no timing claims
    python bench/bench_cp_decomposition.py --host-only   # only the host-overhead table (any machine, CPU)

For P = 2, 4, 8 ranks it replays on one device the kernel calls and merges each
rank makes in ``cpattn.ring`` (``ring_schedule`` gives every rank's per-step
plan; ``forward_step`` / ``backward_step`` run it, the very functions the
distributed path runs) with the transfers left out: each rank's loop below is
``ring_forward`` / ``ring_backward`` without its exchanges. Reported against
one monolithic kernel call on the full sequence:

* ``ratio`` = (sum of every rank's time) / monolithic: the work the
  decomposition adds (ideal 1.0; the issue's target for 8 zigzag ranks: 1.05);
* ``parallel`` = P x (sum over steps of the slowest rank's step) / monolithic:
  adds the load imbalance ranks in lockstep pay (ideal 1.0).

Communication model: at step s a rank sends the kv shard it holds (forward and
backward) and, in the backward, the dk/dv (fp32) accumulated so far, exactly
the messages of ``ring_forward`` / ``ring_backward``. For NVLink (450 GB/s per
direction) and InfiniBand (50 GB/s) it says whether each transfer hides behind
the compute it overlaps (the slowest rank's): the kv transfer overlaps the
whole step; the dk/dv of step s-1 overlaps only step s's dq kernels (the dk/dv
kernels add to it, so wait for it). The backward's last dk/dv hop follows the
last step and is always exposed.

Host overhead (``host_overhead``; the Python a GPU cannot hide): for ring,
zigzag, Ulysses and USP at each P, one rank of P runs steady-state
``ContextParallel.attention`` calls (forward, and forward + backward) on
torch's "fake" process group (collectives and P2P return at once, nothing
moves) with the kernels stubbed out (they return at once), on tiny CPU
tensors, so what is timed is cpattn's Python, torch's op dispatch for the few
small tensor ops it makes, and the process-group calls. It also counts the
kernel calls and the bytes this rank sends per call (what ``RingComm`` and
``UlyssesComm`` are given), and divides by the same measure for one
single-device ``flash_attn_func`` call. Target: forward below 100 us for 8 ranks.

Packed documents (``packed_work``; counts, no timing, any machine): for one
128k document, 16 x 8k, one 64k among 60 short, 500 and 1000 long-tailed
(Pareto 1.1), 200 short with a 50k last, with no window and a 4k window, the
tokens, causal work and kv bytes sent per ring rank (``cpattn.work_report.context_parallel_work``)
under equal-token contiguous and zigzag cuts, the equal-work cut cpattn used
before, and the dispatch ``ContextParallel.shard(..., cu_seqlens=)`` uses now,
with max/mean per scheme and the dispatch's plan time (host).
Results: bench/results/<device>/cp_decomposition.{json,csv} (summary), cp_comm.{json,csv} (per step),
cp_host.{json,csv} (host overhead) and cp_packed_work.{json,csv} (packed documents).
"""
import contextlib
import itertools
import math
import random
import statistics
import time

import torch
import torch.distributed as dist

import _common as C
import cpattn
from cpattn import ops, context_parallel, ring
from cpattn import comm as cp_comm
from cpattn.kernels import attention_backward, attention_backward_delta, attention_forward
from cpattn.layout import Layout
from cpattn.work_report import context_parallel_work

LINKS = {"nvlink": 450e9, "ib": 50e9}  # bytes/s per direction


def parse_args(argv):
    p = C.base_parser(__doc__)
    p.add_argument("--seqlen", type=int, default=None, help="full sequence (default 16384)")
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--heads", type=int, default=None, help="default 32")
    p.add_argument("--kv-heads", type=int, default=None, help="default 8")
    p.add_argument("--head-dim", type=int, default=None, help="default 128")
    p.add_argument("--dtype", choices=sorted(C.DTYPES), default=None, help="default bf16")
    p.add_argument("--degrees", type=C.int_list, default=None, help="simulated ranks P, comma list (default 2,4,8)")
    p.add_argument("--impls", type=C.str_list, default=["ring", "zigzag"])
    p.add_argument("--causal", choices=("both", "causal", "full"), default=None, help="default both")
    p.add_argument("--host-only", action="store_true", help="only the host-overhead table (no kernels run)")
    p.add_argument("--window", type=int, default=4096, help="sliding window of the window table (default 4096)")
    p.add_argument("--window-seqlen", type=int, default=131072,
                   help="sequence of the window table, from the schedule alone (default 131072)")
    p.add_argument("--host-calls", type=int, default=None, help="timed calls per host measurement (default 200)")
    args = p.parse_args(argv)
    defaults = dict(seqlen=16384, heads=32, kv_heads=8, head_dim=128, dtype="bf16", degrees=[2, 4, 8], causal="both",
                    host_calls=200)
    if args.quick:
        defaults.update(seqlen=64, heads=2, kv_heads=1, head_dim=16, dtype="fp32", degrees=[2], causal="causal",
                        host_calls=5)
    for key, value in defaults.items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    return args


class Rank:
    """One simulated rank's local tensors: its shard of every full tensor, as its device holds it."""

    def __init__(self, positions, q, k, v, dout, out, lse):
        self.q, self.k, self.v, self.dout, self.out = (t[:, positions].contiguous() for t in (q, k, v, dout, out))
        self.lse = lse[:, :, positions].contiguous()


def rank_forward(ranks, r, steps, scale):
    """``ring_forward`` of rank r without the exchanges: the kv of step s is read from its owner."""
    me = ranks[r]
    out = torch.zeros(me.q.shape, dtype=torch.float32, device=me.q.device)
    lse = torch.full(me.lse.shape, float("-inf"), dtype=torch.float32, device=me.q.device)
    for kv_index, calls in steps:
        ring.forward_step(me.q, ranks[kv_index].k, ranks[kv_index].v, calls, out, lse, scale)
    return out, lse


def rank_backward(ranks, r, steps, scale, received):
    """``ring_backward`` of rank r without the exchanges; ``received`` stands in for the incoming dk/dv."""
    me = ranks[r]
    delta, lse_log2 = attention_backward_delta(me.out, me.dout, me.lse)
    dq = torch.zeros(me.q.shape, dtype=torch.float32, device=me.q.device)
    for step, (kv_index, calls) in enumerate(steps):
        dkv = torch.zeros(received.shape, dtype=torch.float32, device=me.q.device)
        ring.backward_step(me.dout, me.q, ranks[kv_index].k, ranks[kv_index].v, me.out, me.lse, delta, calls,
                           dq, dkv[0], dkv[1], scale, lse_log2=lse_log2)
        if step > 0:
            dkv += received
    return dq, dkv


def step_times(ranks, schedule, direction, scale, device, dq_only=False):
    """times[r][s]: ms of rank r's kernels at step s (0 for a step with nothing to compute);
    ``dq_only``: the backward's dq kernels alone."""
    times = []
    for r, steps in enumerate(schedule):
        me = ranks[r]
        out = torch.zeros(me.q.shape, dtype=torch.float32, device=device)
        lse = torch.zeros(me.lse.shape, dtype=torch.float32, device=device)
        delta, lse_log2 = attention_backward_delta(me.out, me.dout, me.lse)
        dq = torch.zeros_like(out)
        dkv = torch.zeros((2, *me.k.shape), dtype=torch.float32, device=device)
        row = []
        for kv_index, calls in steps:
            kv = ranks[kv_index]
            if not calls:
                row.append(0.0)
            elif direction == "fwd":
                row.append(C.time_ms(lambda: ring.forward_step(me.q, kv.k, kv.v, calls, out, lse, scale), device))
            else:
                row.append(C.time_ms(lambda: ring.backward_step(me.dout, me.q, kv.k, kv.v, me.out, me.lse, delta,
                                                                calls, dq, dkv[0], dkv[1], scale,
                                                                compute_dkdv=not dq_only, lse_log2=lse_log2),
                                          device))
        times.append(row)
    return times

# ----------------------------------------------------------------------------- host overhead

HOST_ALGOS = {"ring": (1, "ring"), "zigzag": (1, "zigzag"), "ulysses": (None, "zigzag"), "usp": (2, "zigzag")}


@contextlib.contextmanager
def patched(*patches):
    """Set (owner, name, value) attributes for the block, then restore them."""
    saved = [(owner, name, getattr(owner, name)) for owner, name, _ in patches]
    for owner, name, value in patches:
        setattr(owner, name, value)
    try:
        yield
    finally:
        for owner, name, value in saved:
            setattr(owner, name, value)


def stubbed_kernels(counts):
    """Patches making the attention kernels return at once (allocating what they would), counting launches."""
    def forward(q, k, v, *args, out=None, lse=None, **kwargs):
        counts["kernels"] += 1
        batch, seqlen, heads, _ = q.shape
        return (torch.empty(q.shape, dtype=q.dtype) if out is None else out,
                torch.empty((batch, heads, seqlen), dtype=torch.float32) if lse is None else lse)

    def backward(dout, q, k, v, *args, dq=None, dk=None, dv=None, compute_dq=True, compute_dkdv=True, **kwargs):
        counts["kernels"] += int(compute_dq) + int(compute_dkdv)
        return ((torch.empty_like(q) if dq is None else dq) if compute_dq else None,
                (torch.empty_like(k) if dk is None else dk) if compute_dkdv else None,
                (torch.empty_like(v) if dv is None else dv) if compute_dkdv else None)

    def delta(out, dout, lse=None):
        counts["kernels"] += 1
        batch, seqlen, heads, _ = out.shape
        stats = torch.empty((batch, heads, seqlen), dtype=torch.float32)
        return stats if lse is None else (stats, torch.empty_like(stats))

    def any_backend(group, device, where):  # the "fake" process group stands in for gloo/NCCL
        return None

    return [(module, name, fn) for module in (ring, ops) for name, fn in
            (("attention_forward", forward), ("attention_backward", backward), ("attention_backward_delta", delta))
            ] + [(context_parallel, "check_backend", any_backend)]


def byte_counters(counts):
    """Patches adding up the bytes this rank sends: ring messages and the off-rank parts of all-to-alls."""
    exchange, all_to_all = cp_comm.RingComm.exchange, cp_comm.UlyssesComm.all_to_all

    def counting_exchange(self, sends, recvs, tag):
        counts["bytes"] += sum(t.numel() * t.element_size() for t in sends)
        return exchange(self, sends, recvs, tag)

    def counting_all_to_all(self, x):
        counts["bytes"] += x.numel() * x.element_size() * (self.degree - 1) // self.degree
        return all_to_all(self, x)

    return [(cp_comm.RingComm, "exchange", counting_exchange), (cp_comm.UlyssesComm, "all_to_all", counting_all_to_all)]


@contextlib.contextmanager
def fake_process_group(world_size, rank):
    """torch's "fake" backend: this process is ``rank`` of ``world_size``; communication returns at once."""
    from torch.testing._internal.distributed.fake_pg import FakeStore  # registers the backend

    dist.init_process_group("fake", store=FakeStore(), rank=rank, world_size=world_size)
    try:
        yield
    finally:
        dist.destroy_process_group()


def us_per_call(fn, calls, repeats=5):
    """Median over ``repeats`` of the mean CPU microseconds (this process) of ``calls`` calls, after a warm-up.

    CPU time, not wall time: on a shared machine other processes would inflate the latter; on a host that
    runs only this, they are the same."""
    for _ in range(3):
        fn()
    means = []
    for _ in range(repeats):
        start = time.process_time()
        for _ in range(calls):
            fn()
        means.append((time.process_time() - start) / calls * 1e6)
    return statistics.median(means)


def local_inputs(batch, seqlen, heads, kv_heads, head_dim, dtype, world_size):
    """One rank's q, k, v (leaves) and dout. bf16 is measured as fp16, the same bytes: on CPU cpattn would
    compute bf16 in fp32 (the interpreter has no bf16 matmul) and send twice the bytes a GPU sends."""
    dtype = torch.float16 if dtype == torch.bfloat16 else dtype
    shapes = [(batch, seqlen // world_size, h, head_dim) for h in (heads, kv_heads, kv_heads, heads)]
    q, k, v, dout = (torch.randn(shape).to(dtype) for shape in shapes)
    return [t.requires_grad_() for t in (q, k, v)], dout


def host_overhead(args, calls):
    """Rows per algorithm and P: kernel calls, bytes sent per rank, host time per call, ratio to one device."""
    if dist.is_initialized():  # the fake group would replace it (only when imported by a process that has one)
        print("host overhead skipped: this process already has a default process group")
        return []
    counts = {"kernels": 0, "bytes": 0}
    tiny = dict(batch=1, seqlen=None, heads=8, kv_heads=2, head_dim=32, dtype=torch.float16)
    rows = []
    with patched(*stubbed_kernels(counts)):
        single_q, single_k, single_v = (t.requires_grad_() for t in local_inputs(**{**tiny, "seqlen": 64},
                                                                                 world_size=1)[0])
        single_dout = torch.randn_like(single_q)
        single = {"fwd": us_per_call(lambda: cpattn.flash_attn_func(single_q, single_k, single_v, causal=True),
                                     calls),
                  "fwd+bwd": us_per_call(lambda: cpattn.flash_attn_func(single_q, single_k, single_v, causal=True)
                                         .backward(single_dout), max(1, calls // 2))}
        for algo, world in itertools.product(HOST_ALGOS, args.degrees):
            degree, impl = HOST_ALGOS[algo]
            degree = world if degree is None else degree
            if world % degree or (algo == "usp" and world // degree < 2) or args.heads % degree:
                continue  # usp needs a ring of 2 or more; the heads must split
            with fake_process_group(world, rank=world - 1):  # the last rank: work at every causal ring step
                row = {"algo": algo, "ranks": world, "ring_degree": world // degree, "ulysses_degree": degree}
                # counts, at the benchmark's shape (nothing moves and no kernel runs: only the sizes matter)
                with cpattn.ContextParallel(ulysses_degree=degree, ring_impl=impl) as cp:
                    (q, k, v), dout = local_inputs(args.batch, args.seqlen, args.heads, args.kv_heads, args.head_dim,
                                                   C.DTYPES[args.dtype], world)
                    with patched(*byte_counters(counts)):
                        for direction in ("fwd", "bwd"):
                            counts.update(kernels=0, bytes=0)
                            out = cp.attention(q, k, v, causal=True) if direction == "fwd" else out.backward(dout)
                            row[f"kernel_calls_{direction}"] = counts["kernels"]
                            row[f"bytes_{direction}"] = counts["bytes"]
                # steady-state time per call, tiny tensors
                with cpattn.ContextParallel(ulysses_degree=degree, ring_impl=impl) as cp:
                    (q, k, v), dout = local_inputs(**{**tiny, "seqlen": 16 * world}, world_size=world)
                    row["host_fwd_us"] = us_per_call(lambda: cp.attention(q, k, v, causal=True), calls)
                    row["host_fwd_bwd_us"] = us_per_call(lambda: cp.attention(q, k, v, causal=True).backward(dout),
                                                         max(1, calls // 2))
                row["single_fwd_us"], row["single_fwd_bwd_us"] = single["fwd"], single["fwd+bwd"]
                row["ratio_fwd"] = row["host_fwd_us"] / single["fwd"]
                row["ratio_fwd_bwd"] = row["host_fwd_bwd_us"] / single["fwd+bwd"]
                rows.append(row)
    return rows


def replay(args, device):
    """The ring / zigzag replay on one device: (summary rows, per-step communication rows)."""
    b, s = args.batch, args.seqlen
    q, k, v, dout = C.attention_inputs(b, s, args.heads, args.kv_heads, args.head_dim, args.dtype, device)
    if device.type == "cpu" and args.dtype == "bf16":
        q, k, v, dout = (t.float() for t in (q, k, v, dout))  # the interpreter has no bf16 matmul
    scale = 1.0 / math.sqrt(args.head_dim)
    shape = {"seqlen": s, "batch": b, "heads": args.heads, "kv_heads": args.kv_heads, "head_dim": args.head_dim,
             "dtype": args.dtype}
    causals = {"both": (True, False), "causal": (True,), "full": (False,)}[args.causal]
    grid = list(itertools.product(causals, args.impls, args.degrees))

    summary, comm = [], []
    for i, (causal, impl, degree) in enumerate(grid, 1):
        C.progress(i, len(grid), f"{impl} P={degree} {'causal' if causal else 'full'}")
        out, lse = attention_forward(q, k, v, scale, causal)
        mono = {"fwd": C.time_ms(lambda: attention_forward(q, k, v, scale, causal), device),
                "bwd": C.time_ms(lambda: attention_backward(dout, q, k, v, out, lse, scale, causal), device)}
        layout = Layout(degree, 1, impl)
        positions = [layout.positions(s, r).to(device) for r in range(degree)]
        ranks = [Rank(pos, q, k, v, dout, out, lse) for pos in positions]
        schedule = ring.ring_schedule(s, degree, impl, causal)
        kv_bytes = 2 * ranks[0].k.numel() * ranks[0].k.element_size()
        dkv_bytes = 2 * ranks[0].k.numel() * 4
        received = torch.zeros((2, *ranks[0].k.shape), dtype=torch.float32, device=device)

        # Exactness of the replay: the ranks' forward outputs put together are the monolithic output.
        replayed = torch.empty_like(out, dtype=torch.float32)
        for r, pos in enumerate(positions):
            replayed[:, pos] = rank_forward(ranks, r, schedule[r], scale)[0]
        max_err = (replayed - out.float()).abs().max().item()

        for direction in ("fwd", "bwd"):
            if direction == "fwd":
                rank_ms = [C.time_ms(lambda: rank_forward(ranks, r, schedule[r], scale), device)
                           for r in range(degree)]
            else:
                rank_ms = [C.time_ms(lambda: rank_backward(ranks, r, schedule[r], scale, received), device)
                           for r in range(degree)]
            per_step = step_times(ranks, schedule, direction, scale, device)
            slowest = [max(per_step[r][st] for r in range(degree)) for st in range(degree)]
            if direction == "bwd":
                dq_step = step_times(ranks, schedule, direction, scale, device, dq_only=True)
                dq_slowest = [max(dq_step[r][st] for r in range(degree)) for st in range(degree)]
            # per step: (kv bytes, which overlap the whole step; dk/dv bytes of the step before, which
            # overlap its dq kernels only); the backward's last dk/dv hop overlaps nothing
            sends = [((kv_bytes if st + 1 < degree else 0), (dkv_bytes if direction == "bwd" and st > 0 else 0),
                      slowest[st], dq_slowest[st] if direction == "bwd" else 0.0) for st in range(degree)]
            if direction == "bwd":
                sends.append((0, dkv_bytes, 0.0, 0.0))
            exposed = {link: 0.0 for link in LINKS}
            for st, (kv_sent, dkv_sent, compute_ms, dq_ms) in enumerate(sends):
                row = {"impl": impl, "ranks": degree, "causal": causal, "direction": direction,
                       "step": st if st < degree else "after last", "send_bytes": kv_sent + dkv_sent,
                       "compute_ms": compute_ms}
                for link, bandwidth in LINKS.items():
                    kv_ms, dkv_ms = kv_sent / bandwidth * 1e3, dkv_sent / bandwidth * 1e3
                    row[f"{link}_ms"] = kv_ms + dkv_ms
                    row[f"{link}_hidden"] = kv_ms <= compute_ms and dkv_ms <= dq_ms
                    exposed[link] += max(0.0, kv_ms - compute_ms) + max(0.0, dkv_ms - dq_ms)
                comm.append(row)
            total = sum(rank_ms)
            summary.append({**shape, "impl": impl, "ranks": degree, "causal": causal, "direction": direction,
                            "kernel_calls": sum(len(calls) for steps in schedule for _, calls in steps),
                            "mono_ms": mono[direction], "total_ms": total, "ratio": total / mono[direction],
                            "critical_ms": sum(slowest), "parallel": degree * sum(slowest) / mono[direction],
                            "kv_bytes_per_step": kv_bytes, "dkv_bytes_per_step": dkv_bytes if direction == "bwd" else 0,
                            **{f"{link}_exposed_ms": exposed[link] for link in LINKS},
                            "fwd_max_abs_err": max_err})
    return summary, comm


def window_work(args):
    """Sliding windows: ring steps, kv transfers, kernel calls and kv bytes sent per rank, read from
    ``ring_schedule`` (what every rank of ``ring_forward`` does) for a causal window of
    ``--window`` tokens over ``--window-seqlen`` on 8 ranks, against full causal attention."""
    rows = []
    kv_heads, head_dim, size = args.kv_heads, args.head_dim, C.DTYPES[args.dtype].itemsize
    for impl, window in itertools.product(args.impls, (None, args.window)):
        schedule = ring.ring_schedule(args.window_seqlen, 8, impl, causal=True,
                                      window_size=(-1, -1) if window is None else (window, 0))
        piece_bytes = 2 * (args.window_seqlen // 8) * kv_heads * head_dim * size  # k and v of one rank
        calls = [sum(len(c) for _, c in steps) for steps in schedule]
        rows.append({"impl": impl, "seqlen": args.window_seqlen, "ranks": 8, "window": window or "none",
                     "steps": len(schedule[0]), "kv_transfers_per_rank": len(schedule[0]) - 1,
                     "kv_bytes_sent_per_rank": (len(schedule[0]) - 1) * piece_bytes,
                     "kernel_calls_min": min(calls), "kernel_calls_max": max(calls)})
    return rows


def packings(rng=None):
    """The packings of the packed-documents table (document lengths), seeded: one 128k document, 16 of 8k,
    the three of the earlier table, and 1000 long-tailed lengths (Pareto, shape 1.1, scale 100 tokens,
    capped at 128k)."""
    rng = rng or random.Random(0)
    one_long = [65536] + [rng.randint(64, 4096) for _ in range(60)]
    rng.shuffle(one_long)
    return {"one 128k": [131072], "16 x 8k": [8192] * 16, "one 64k + 60 short": one_long,
            "500 long-tailed": [max(1, int(rng.paretovariate(1.1) * 100)) for _ in range(500)],
            "200 short, 50k last": [rng.randint(16, 1024) for _ in range(200)] + [50000],
            "1000 long-tailed": [min(131072, max(1, int(rng.paretovariate(1.1) * 100))) for _ in range(1000)]}


def packed_work(ring_degrees, windows=(-1, 4096), kv_bytes_per_token=2 * 8 * 128 * 2):
    """Per ring rank tokens, causal work and kv bytes sent per forward call under each scheme
    (``cpattn.work_report.context_parallel_work``), for every packing, ring degree and window; the dispatch's plan time
    (host, uncached ``dispatch``). Bytes: k and v of bf16, 8 kv heads of dim 128."""
    from cpattn.dispatch import cut_window, dispatch
    rows = []
    for (name, lengths), degree, window in itertools.product(packings().items(), ring_degrees, windows):
        cu = [0, *itertools.accumulate(lengths)]
        for scheme in ("contiguous", "zigzag", "work", "dispatch"):
            loads = context_parallel_work(cu, degree, (window, -1), scheme, kv_bytes_per_token)
            plan_ms = ""
            if scheme == "dispatch":
                start = time.perf_counter()
                dispatch.__wrapped__(tuple(cu), degree, cut_window(tuple(cu), window))
                plan_ms = round(1e3 * (time.perf_counter() - start), 2)
            mean_work, mean_tokens = sum(loads.work) / degree, cu[-1] / degree
            rows.append({"packing": name, "documents": len(lengths), "tokens": cu[-1], "ranks": degree,
                         "window": "none" if window < 0 else window, "scheme": scheme,
                         "tokens_max_over_mean": round(max(loads.tokens) / mean_tokens, 3),
                         "work_max_over_mean": round(max(loads.work) / mean_work, 3),
                         "steps": loads.steps, "kv_mb_sent_per_rank": round(max(loads.bytes_sent) / 2**20, 1),
                         "plan_ms": plan_ms, "tokens_per_rank": " ".join(map(str, loads.tokens)),
                         "work_per_rank": " ".join(map(str, loads.work))})
    return rows


def main(argv=None):
    args = parse_args(argv)
    device = torch.device("cpu") if args.host_only else C.pick_device(args.quick)
    env = C.environment(device, args.quick)
    env["links_bytes_per_s"] = LINKS
    env["replay"] = "cpattn.ring.ring_schedule + forward_step/backward_step per simulated rank, transfers left out"
    env["host_overhead"] = ("one rank of P on torch's 'fake' process group, kernels stubbed out, tiny CPU tensors, "
                            f"CPU time of this process (time.process_time) over {args.host_calls} steady-state calls, "
                            "median of 5")
    print(f"{env['device']} | torch {env['torch']} | triton {env['triton']}" + (f"\n{C.QUICK_NOTE}" if args.quick else ""))
    summary, comm = ([], []) if args.host_only else replay(args, device)
    host = host_overhead(args, args.host_calls)

    out_dir = C.output_dir(args, device)
    paths = [] if args.host_only else (C.save_results(out_dir, "cp_decomposition", env, summary)
                                       + C.save_results(out_dir, "cp_comm", env, comm))
    paths += C.save_results(out_dir, "cp_host", env, host)
    packed = packed_work(args.degrees)
    paths += C.save_results(out_dir, "cp_packed_work", env, packed)
    windowed = window_work(args)
    paths += C.save_results(out_dir, "cp_window", env, windowed)
    C.print_table(windowed, [("impl", "impl"), ("window", "window"), ("steps", "steps"),
                             ("kv_transfers_per_rank", "kv sends"), ("kv_bytes_sent_per_rank", "kv bytes"),
                             ("kernel_calls_min", "calls min"), ("kernel_calls_max", "calls max")],
                  title=f"causal sliding window over {args.window_seqlen} tokens on 8 ranks (forward, per rank)")
    if args.host_only:
        print_host(host, args)
        print_packed(packed)
        C.print_saved(paths, False)
        return summary, comm
    C.print_table(summary, [("impl", "impl"), ("ranks", "P"), ("causal", "causal"), ("direction", "dir"),
                            ("kernel_calls", "calls"), ("mono_ms", "mono ms"), ("total_ms", "sum ms"),
                            ("ratio", "ratio"), ("parallel", "parallel"), ("fwd_max_abs_err", "fwd err")],
                  title="replay vs one kernel on the full sequence; ratio = sum of ranks / mono, "
                        "parallel = P x lockstep critical path / mono (ideal 1.0; target zigzag P=8: ratio <= 1.05)")
    C.print_table(comm, [("impl", "impl"), ("ranks", "P"), ("causal", "causal"), ("direction", "dir"),
                         ("step", "step"), ("send_bytes", "bytes sent"), ("compute_ms", "step ms"),
                         ("nvlink_ms", "NVLink ms"), ("nvlink_hidden", "hidden"), ("ib_ms", "IB ms"),
                         ("ib_hidden", "hidden")],
                  title="communication model: per step, bytes each rank sends and whether the transfer hides "
                        "behind the slowest rank's compute of that step (NVLink 450 GB/s, IB 50 GB/s per direction)")
    print_host(host, args)
    print_packed(packed)
    C.print_saved(paths, args.quick,
                  C.QUICK_NOTE + " (nor are the 'hidden' verdicts, which compare against those times)")
    return summary, comm


def print_packed(rows):
    C.print_table(rows, [("packing", "packing"), ("documents", "docs"), ("ranks", "R"), ("window", "window"),
                         ("scheme", "scheme"), ("tokens_max_over_mean", "tokens max/mean"),
                         ("work_max_over_mean", "work max/mean"), ("steps", "steps"),
                         ("kv_mb_sent_per_rank", "kv MiB sent"), ("plan_ms", "plan ms")],
                  title="packed documents per ring rank (counts, not timings; the dispatch's bounds: tokens <= "
                        "1.02 x mean + 1, work <= 1.05 x mean); kv MiB each rank sends per forward call "
                        "(bf16, 8 kv heads x 128)")


def print_host(rows, args):
    C.print_table(rows, [("algo", "algo"), ("ranks", "P"), ("ring_degree", "ring"), ("ulysses_degree", "ulysses"),
                         ("kernel_calls_fwd", "calls fwd"), ("kernel_calls_bwd", "calls bwd"),
                         ("bytes_fwd", "bytes fwd"), ("bytes_bwd", "bytes bwd"), ("host_fwd_us", "host fwd us"),
                         ("ratio_fwd", "x single"), ("host_fwd_bwd_us", "host fwd+bwd us"),
                         ("ratio_fwd_bwd", "x single")],
                  title=f"host overhead of one rank's steady-state cp.attention call (kernels stubbed, fake process "
                        f"group; one single-device flash_attn_func call: {rows[0]['single_fwd_us']:.0f} us forward, "
                        f"{rows[0]['single_fwd_bwd_us']:.0f} us forward+backward; target forward < 100 us at P=8); "
                        f"kernel calls and bytes this rank sends per call at seqlen {args.seqlen}, {args.heads}/"
                        f"{args.kv_heads} heads, head dim {args.head_dim}, {args.dtype}" if rows else "no host rows")


if __name__ == "__main__":
    main()
