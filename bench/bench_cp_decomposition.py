"""Context-parallel decomposition on one GPU: what ring / zigzag cost beyond one kernel.

    python bench/bench_cp_decomposition.py            # on a GPU
    python bench/bench_cp_decomposition.py --quick    # tiny shapes on CPU: tests the script, no timing claims

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
the compute of the step it overlaps (the slowest rank's). The backward's last
dk/dv hop follows the last step and is always exposed.
Results: bench/results/<device>/cp_decomposition.{json,csv} (summary) and cp_comm.{json,csv} (per step).
"""
import itertools
import math

import torch

import _common as C
from cpattn import ring
from cpattn.kernels import attention_backward, attention_backward_delta, attention_forward
from cpattn.layout import Layout

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
    args = p.parse_args(argv)
    defaults = dict(seqlen=16384, heads=32, kv_heads=8, head_dim=128, dtype="bf16", degrees=[2, 4, 8], causal="both")
    if args.quick:
        defaults.update(seqlen=64, heads=2, kv_heads=1, head_dim=16, dtype="fp32", degrees=[2], causal="causal")
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
    delta = attention_backward_delta(me.out, me.dout)
    dq = torch.zeros(me.q.shape, dtype=torch.float32, device=me.q.device)
    for step, (kv_index, calls) in enumerate(steps):
        dkv = torch.zeros(received.shape, dtype=torch.float32, device=me.q.device)
        ring.backward_step(me.dout, me.q, ranks[kv_index].k, ranks[kv_index].v, me.out, me.lse, delta, calls,
                           dq, dkv[0], dkv[1], scale)
        if step > 0:
            dkv += received
    return dq, dkv


def step_times(ranks, schedule, direction, scale, device):
    """times[r][s]: ms of rank r's kernels at step s (0 for a step with nothing to compute)."""
    times = []
    for r, steps in enumerate(schedule):
        me = ranks[r]
        out = torch.zeros(me.q.shape, dtype=torch.float32, device=device)
        lse = torch.zeros(me.lse.shape, dtype=torch.float32, device=device)
        delta = attention_backward_delta(me.out, me.dout)
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
                                                                calls, dq, dkv[0], dkv[1], scale), device))
        times.append(row)
    return times


def main(argv=None):
    args = parse_args(argv)
    device = C.pick_device(args.quick)
    env = C.environment(device, args.quick)
    env["links_bytes_per_s"] = LINKS
    env["replay"] = "cpattn.ring.ring_schedule + forward_step/backward_step per simulated rank, transfers left out"
    print(f"{env['device']} | torch {env['torch']} | triton {env['triton']}" + (f"\n{C.QUICK_NOTE}" if args.quick else ""))

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
            # (bytes sent, compute it overlaps) per step; the backward's last dk/dv hop overlaps nothing
            sends = [((kv_bytes if st + 1 < degree else 0) + (dkv_bytes if direction == "bwd" and st > 0 else 0),
                      slowest[st]) for st in range(degree)]
            if direction == "bwd":
                sends.append((dkv_bytes, 0.0))
            exposed = {link: 0.0 for link in LINKS}
            for st, (nbytes, compute_ms) in enumerate(sends):
                row = {"impl": impl, "ranks": degree, "causal": causal, "direction": direction,
                       "step": st if st < degree else "after last", "send_bytes": nbytes, "compute_ms": compute_ms}
                for link, bandwidth in LINKS.items():
                    transfer_ms = nbytes / bandwidth * 1e3
                    row[f"{link}_ms"] = transfer_ms
                    row[f"{link}_hidden"] = transfer_ms <= compute_ms
                    exposed[link] += max(0.0, transfer_ms - compute_ms)
                comm.append(row)
            total = sum(rank_ms)
            summary.append({**shape, "impl": impl, "ranks": degree, "causal": causal, "direction": direction,
                            "kernel_calls": sum(len(calls) for steps in schedule for _, calls in steps),
                            "mono_ms": mono[direction], "total_ms": total, "ratio": total / mono[direction],
                            "critical_ms": sum(slowest), "parallel": degree * sum(slowest) / mono[direction],
                            "kv_bytes_per_step": kv_bytes, "dkv_bytes_per_step": dkv_bytes if direction == "bwd" else 0,
                            **{f"{link}_exposed_ms": exposed[link] for link in LINKS},
                            "fwd_max_abs_err": max_err})

    out_dir = C.output_dir(args, device)
    paths = C.save_results(out_dir, "cp_decomposition", env, summary)
    paths += C.save_results(out_dir, "cp_comm", env, comm)
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
    C.print_saved(paths, args.quick,
                  C.QUICK_NOTE + " (nor are the 'hidden' verdicts, which compare against those times)")
    return summary, comm


if __name__ == "__main__":
    main()
