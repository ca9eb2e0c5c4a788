"""A real multi-rank check of context parallelism over NCCL on this machine's GPUs.

    python bench/check_nccl.py                                  # as many ranks as GPUs (at least 2)
    NCCL_MULTI_RANK_GPU_ENABLE=1 python bench/check_nccl.py --ranks 2   # 2 ranks on 1 GPU (NCCL >= 2.30)
    python bench/check_nccl.py --quick                          # the same on CPU ranks over gloo (smoke test)

For every algorithm (ring, zigzag, Ulysses, USP when the ranks allow it), each
rank shards the same full inputs, runs ``cp.attention`` forward and backward,
and gathers output and gradients. Rank 0 compares them with torch SDPA on the
full sequence: in float32 (``--quick``) against a relative-error bound, in
bf16/fp16 by flash-attn's rule (our max error vs an fp32 reference at most twice
torch's own error in the same dtype); the lse (``return_lse=True``) against an
fp32 log-sum-exp of the same inputs. On CUDA it also repeats each call once the
ranks have agreed on its signature under ``torch.cuda.set_sync_debug_mode("error")``:
a steady-state forward and backward must make no host synchronisation.
Not a benchmark: a correctness check of the NCCL paths that CPU tests (gloo)
cannot reach. Writes ``check_nccl.json`` and ``.csv``.
"""
import sys

import torch
import torch.nn.functional as F

import _common as C
import cpattn
from cpattn.kernels.reference import reference_attention
from cpattn.testing import run_ranks


def _sdpa(q, k, v, causal):
    return F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2),
                                          is_causal=causal, enable_gqa=True).transpose(1, 2)


def _out_and_grads(attention, q, k, v, dout):
    leaves = [t.detach().clone().requires_grad_() for t in (q, k, v)]
    out = attention(*leaves)
    return [out.detach(), *torch.autograd.grad(out, leaves, dout)]


def _sync_free(call, device):
    """CUDA: whether ``call()`` runs without a host synchronisation (None on CPU, where nothing tells)."""
    if device.type != "cuda":
        return None
    torch.cuda.set_sync_debug_mode("error")
    try:
        call()
        return True
    except RuntimeError as exc:
        return f"synchronises: {exc}"[:300]
    finally:
        torch.cuda.set_sync_debug_mode("default")


def check_rank(rank, world_size, device_type, dtype_name, seqlen, cases):
    device = torch.device(device_type, torch.cuda.current_device()) if device_type == "cuda" else torch.device("cpu")
    dtype = C.DTYPES[dtype_name]
    rows = []
    for index, (algo, ulysses_degree, ring_impl, causal, heads, kv_heads, head_dim) in enumerate(cases):
        cp = cpattn.ContextParallel(ulysses_degree=ulysses_degree, ring_impl=ring_impl)
        gen = torch.Generator().manual_seed(index)  # the same full inputs on every rank
        full = [torch.randn(1, seqlen, h, head_dim, generator=gen).to(device)
                for h in (heads, kv_heads, kv_heads, heads)]
        q, k, v, dout = full
        local = [cp.shard(t.to(dtype)) for t in (q, k, v, dout)]
        ours_local = _out_and_grads(lambda *t: cp.attention(*t, causal=causal), *local)
        ours = [cp.gather(t) for t in ours_local]
        leaves = [t.detach().requires_grad_() for t in local[:3]]
        sync_free = _sync_free(lambda: cp.attention(*leaves, causal=causal).backward(local[3]), device)
        lse = cp.gather(cp.attention(*local[:3], causal=causal, return_lse=True)[1], seq_dim=2)
        cp.close()
        if rank != 0:
            continue
        print(f"case {index + 1}/{len(cases)}: {algo} causal={causal} kv_heads={kv_heads} head_dim={head_dim} ran",
              flush=True)
        exact = _out_and_grads(lambda *t: _sdpa(*t, causal), q, k, v, dout)
        row = {"algo": algo, "ulysses_degree": cp.ulysses_degree, "ring_degree": cp.ring_degree,
               "ring_impl": ring_impl, "causal": causal, "heads": heads, "kv_heads": kv_heads,
               "head_dim": head_dim, "seqlen": seqlen, "dtype": dtype_name, "steady_state_sync_free": sync_free,
               "lse_err": (lse - reference_attention(*(t.to(dtype) for t in (q, k, v)), causal=causal)[1])
               .abs().max().item()}
        if dtype == torch.float32:
            for name, mine, ref in zip(("out", "dq", "dk", "dv"), ours, exact):
                row[f"{name}_rel_err"] = ((mine - ref).norm() / ref.norm()).item()
            row["ok"] = row["out_rel_err"] < 1e-4 and all(row[f"{n}_rel_err"] < 1e-3 for n in ("dq", "dk", "dv"))
            row["ok"] = row["ok"] and row["lse_err"] < 1e-3 and sync_free in (None, True)
        else:
            torch_low = _out_and_grads(lambda *t: _sdpa(*t, causal), *(t.to(dtype) for t in (q, k, v, dout)))
            ok = True
            for name, mine, theirs, ref in zip(("out", "dq", "dk", "dv"), ours, torch_low, exact):
                row[f"{name}_err"] = (mine.float() - ref).abs().max().item()
                row[f"{name}_torch_err"] = (theirs.float() - ref).abs().max().item()
                ok = ok and row[f"{name}_err"] <= 2 * row[f"{name}_torch_err"] + 1e-5
            row["ok"] = ok and row["lse_err"] < 1e-2 and sync_free in (None, True)
        rows.append(row)
    return rows


def cases_for(world_size, head_dims):
    algos = [("ring", 1, "ring"), ("zigzag", 1, "zigzag"), ("ulysses", world_size, "zigzag")]
    if world_size >= 4 and world_size % 2 == 0:
        algos.append(("usp", 2, "zigzag"))
    return [(algo, degree, impl, causal, 8, kv_heads, head_dim)
            for algo, degree, impl in algos for causal in (True, False)
            for kv_heads, head_dim in zip((8, 2), head_dims)]


def main(argv=None):
    parser = C.base_parser(__doc__)
    parser.add_argument("--ranks", type=int, default=None,
                        help="number of ranks (default: GPUs, at least 2; 2 with --quick)")
    parser.add_argument("--seqlen", type=int, default=None, help="full sequence length (default 4096; 64 with --quick)")
    parser.add_argument("--dtype", choices=sorted(C.DTYPES), default=None, help="default bf16 (fp32 with --quick)")
    parser.add_argument("--timeout", type=float, default=600.0, help="seconds before every rank gives up (default 600)")
    args = parser.parse_args(argv)
    if args.quick:
        device_type, backend = "cpu", "gloo"
        ranks, seqlen, dtype, head_dims = args.ranks or 2, args.seqlen or 64, args.dtype or "fp32", (32, 80)
    else:
        if not torch.cuda.is_available():
            sys.exit("no CUDA GPU found: run with --quick for the CPU (gloo) smoke run")
        device_type, backend = "cuda", "nccl"
        ranks = args.ranks or max(2, torch.cuda.device_count())
        seqlen, dtype, head_dims = args.seqlen or 4096, args.dtype or "bf16", (64, 128)
    per_rank = run_ranks(check_rank, ranks, device_type, dtype, seqlen, cases_for(ranks, head_dims),
                         backend=backend, timeout=args.timeout)
    rows = per_rank[0]
    device = torch.device(device_type)
    env = C.environment(device, args.quick)
    env.update(ranks=ranks, backend=backend,
               nccl=".".join(map(str, torch.cuda.nccl.version())) if device_type == "cuda" else None)
    paths = C.save_results(C.output_dir(args, device), "check_nccl", env, rows)
    error_columns = [c for c in rows[0] if c.endswith("_err")]
    C.print_table(rows, [(c, c) for c in ("algo", "ulysses_degree", "ring_degree", "causal", "kv_heads", "head_dim")]
                  + [(c, c) for c in error_columns] + [("steady_state_sync_free", "no sync"), ("ok", "ok")],
                  title=f"{ranks} ranks over {backend}, {dtype}, seqlen {seqlen}")
    C.print_saved(paths, False)  # a correctness check: no timings to disclaim
    failed = [r for r in rows if not r["ok"]]
    if failed:
        sys.exit(f"{len(failed)} of {len(rows)} cases failed")
    return rows


if __name__ == "__main__":
    main()
