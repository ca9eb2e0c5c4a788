"""cpattn demo: attention on random inputs, checked against a reference.

    python -m cpattn.examples.demo            # single device: small on CPU, large on a GPU
    torchrun --nproc-per-node=4 -m cpattn.examples.demo --context-parallel-algo hybrid_cp_algo --ulysses-degree-in-cp 2

Single device: prints the error against torch SDPA (forward and gradients) and
the time. Under torchrun: context-parallel attention over all ranks (NCCL on
GPUs when every rank has one, gloo on CPU otherwise), compared with cpattn's
single-device attention on the full sequence; every rank reports its error,
time and peak memory. ``--ulysses-degree-in-cp auto`` prints the degree chosen.
"""
import argparse
import os
import resource
import time

import torch
import torch.distributed as dist

import cpattn


def _sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _timed(fn, device):
    _sync(device)
    start = time.perf_counter()
    result = fn()
    _sync(device)
    return result, time.perf_counter() - start


def rel_error(x, ref):
    return ((x.float() - ref.float()).norm() / ref.float().norm().clamp_min(1e-30)).item()


def single_device(args):
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.type == "cuda":
        batch, seqlen, heads, heads_kv, head_dim, dtype = 2, 4096, 16, 4, 128, torch.bfloat16
    else:
        batch, seqlen, heads, heads_kv, head_dim, dtype = 1, 256, 4, 2, 64, torch.float32
    seqlen = args.seqlen or seqlen
    gen = torch.Generator(device="cpu").manual_seed(0)
    q = torch.randn(batch, seqlen, heads, head_dim, generator=gen).to(device, dtype).requires_grad_()
    k = torch.randn(batch, seqlen, heads_kv, head_dim, generator=gen).to(device, dtype).requires_grad_()
    v = torch.randn(batch, seqlen, heads_kv, head_dim, generator=gen).to(device, dtype).requires_grad_()
    dout = torch.randn(batch, seqlen, heads, head_dim, generator=gen).to(device, dtype)
    backend = "compiled Triton" if device.type == "cuda" else "Triton interpreter"
    print(f"cpattn {cpattn.__version__} on {device} ({backend})")
    print(f"shape: batch={batch} seqlen={seqlen} heads={heads} kv_heads={heads_kv} head_dim={head_dim} "
          f"dtype={str(dtype).replace('torch.', '')} causal={args.causal}")

    out, t_fwd = _timed(lambda: cpattn.flash_attn_func(q, k, v, causal=args.causal), device)
    grads, t_bwd = _timed(lambda: torch.autograd.grad(out, (q, k, v), dout), device)

    # torch SDPA in SDPA layout; fp32 math on CPU as the reference
    def sdpa():
        qt, kt, vt = (t.transpose(1, 2) for t in (q, k, v))
        return torch.nn.functional.scaled_dot_product_attention(qt, kt, vt, is_causal=args.causal,
                                                                enable_gqa=True).transpose(1, 2)
    ref, t_ref_fwd = _timed(sdpa, device)
    ref_grads, t_ref_bwd = _timed(lambda: torch.autograd.grad(ref, (q, k, v), dout), device)

    print(f"{'':10s}{'forward':>12s}{'dq':>12s}{'dk':>12s}{'dv':>12s}")
    print(f"{'rel error':10s}{rel_error(out, ref):12.2e}" + "".join(f"{rel_error(a, b):12.2e}"
                                                              for a, b in zip(grads, ref_grads)))
    print(f"time  cpattn fwd {t_fwd * 1e3:9.1f} ms  bwd {t_bwd * 1e3:9.1f} ms")
    print(f"time  torch  fwd {t_ref_fwd * 1e3:9.1f} ms  bwd {t_ref_bwd * 1e3:9.1f} ms"
          + ("   (first calls include Triton compilation/autotuning; see bench/ for timings)"
             if device.type == "cuda" else "   (CPU runs the Triton interpreter: correctness, not speed)"))


def init_distributed():
    """NCCL with one GPU per rank when there are enough GPUs on this node, gloo on CPU otherwise."""
    local_rank = int(os.environ.get("LOCAL_RANK", 0))
    local_world_size = int(os.environ.get("LOCAL_WORLD_SIZE", os.environ.get("WORLD_SIZE", 1)))
    if torch.cuda.is_available() and torch.cuda.device_count() >= local_world_size:
        device = torch.device("cuda", local_rank)
        torch.cuda.set_device(device)
        dist.init_process_group("nccl", device_id=device)
    else:
        device = torch.device("cpu")
        # Ranks share the cores: keep each rank's intra-op threads to its share.
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // local_world_size))
        dist.init_process_group("gloo")
    return device


def _peak_memory_mib(device):
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KiB; the process's peak RSS


def context_parallel(args):
    device = init_distributed()
    rank, world_size = dist.get_rank(), dist.get_world_size()
    if device.type == "cuda":
        batch, seqlen, heads, heads_kv, head_dim, dtype = 1, 16384, 16, 4, 128, torch.bfloat16
    else:
        batch, seqlen, heads, heads_kv, head_dim, dtype = 1, 256, 8, 2, 64, torch.float32
    seqlen = args.seqlen or seqlen
    cp = cpattn.ContextParallel.from_args(args, ring_impl=args.ring_impl, num_heads=heads, num_kv_heads=heads_kv)
    if rank == 0:
        chosen = " (chosen by 'auto')" if args.ulysses_degree_in_cp == "auto" else ""
        print(f"cpattn {cpattn.__version__}: {world_size} ranks on {device.type} ({dist.get_backend()}), "
              f"{args.context_parallel_algo}: ring degree {cp.ring_degree} ({cp.ring_impl}) x "
              f"ulysses degree {cp.ulysses_degree}{chosen}")
        print(f"shape: batch={batch} seqlen={seqlen} heads={heads} kv_heads={heads_kv} head_dim={head_dim} "
              f"dtype={str(dtype).replace('torch.', '')} causal={args.causal}")

    # Every rank builds the same full inputs from one seed, then keeps its shard.
    gen = torch.Generator(device="cpu").manual_seed(0)
    full = [torch.randn(batch, seqlen, h, head_dim, generator=gen).to(device, dtype)
            for h in (heads, heads_kv, heads_kv, heads)]
    q, k, v, dout = (cp.shard(t) for t in full)
    q, k, v = (t.requires_grad_() for t in (q, k, v))

    def step():
        out = cp.attention(q, k, v, causal=args.causal)
        return out, torch.autograd.grad(out, (q, k, v), dout)

    if device.type == "cuda":
        step()  # compile and autotune the kernels outside the timed run
        torch.cuda.reset_peak_memory_stats(device)
    dist.barrier()
    out, t_fwd = _timed(lambda: cp.attention(q, k, v, causal=args.causal), device)
    grads, t_bwd = _timed(lambda: torch.autograd.grad(out, (q, k, v), dout), device)
    peak = _peak_memory_mib(device)

    # Single-device reference on the full sequence, compared shard by shard.
    ref_q, ref_k, ref_v = (t.clone().requires_grad_() for t in full[:3])
    ref_out = cpattn.flash_attn_func(ref_q, ref_k, ref_v, causal=args.causal)
    ref_grads = torch.autograd.grad(ref_out, (ref_q, ref_k, ref_v), full[3])
    errors = [rel_error(a, cp.shard(b)) for a, b in zip((out, *grads), (ref_out, *ref_grads))]

    line = (f"rank {rank} (ring {cp.ring_index}, ulysses {cp.ulysses_index}): rel error vs single device "
            + " ".join(f"{name} {err:.1e}" for name, err in zip(("out", "dq", "dk", "dv"), errors))
            + f" | fwd {t_fwd * 1e3:8.1f} ms bwd {t_bwd * 1e3:8.1f} ms"
            + f" | peak {'GPU' if device.type == 'cuda' else 'RSS'} {peak:8.1f} MiB")
    lines = [None] * world_size
    dist.all_gather_object(lines, line)
    if rank == 0:
        print("\n".join(lines))
        if device.type == "cpu":
            print("(CPU runs the Triton interpreter: correctness, not speed)")
    dist.destroy_process_group()


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seqlen", type=int, default=None, help="sequence length (default: sized for the device)")
    parser.add_argument("--no-causal", dest="causal", action="store_false", help="full (non-causal) attention")
    parser.add_argument("--ring-impl", choices=("zigzag", "ring"), default="zigzag",
                        help="shard order of the ring (context parallel runs only)")
    cpattn.add_context_parallel_args(parser)
    args = parser.parse_args(argv)
    if "RANK" in os.environ and "WORLD_SIZE" in os.environ:  # launched by torchrun
        context_parallel(args)
    else:
        single_device(args)


if __name__ == "__main__":
    main()
