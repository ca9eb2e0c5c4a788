"""Peak memory of attention forward+backward against sequence length.

    python bench/bench_memory.py            # on a GPU: measured
    python bench/bench_memory.py --quick    # on CPU: the analytic model only, nothing is measured

On a GPU, for cpattn and each torch SDPA backend (flash, cuDNN, memory-efficient,
and math where it fits), it runs one forward+backward and reports
``torch.cuda.max_memory_allocated`` above what the inputs (q, k, v, dout)
already hold: the memory the attention itself needs. ``exponent`` is e in
memory ~ seqlen^e between a row and the previous one: 1 is linear, 2 quadratic.

Next to it is an analytic model of the tensors that must exist, a lower bound
(workspaces not counted): a fused kernel keeps out, lse, delta and the three
gradients (linear); the math backend also keeps the (S x S) attention weights
and their gradient (quadratic). The math backend is skipped where the model
says it would not fit in 80% of free GPU memory.

``--quick`` measures nothing: it prints the model on CPU, so CI tests the script.
Results: bench/results/<device>/memory.{json,csv,png}.
"""
import math

import torch

import _common as C
import cpattn

MIB = 2.0 ** 20


def parse_args(argv):
    p = C.base_parser(__doc__)
    p.add_argument("--seqlens", type=C.int_list, default=None, help="comma list (default 1024..65536)")
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--heads", type=int, default=None, help="default 16")
    p.add_argument("--kv-heads", type=int, default=None, help="default: as --heads")
    p.add_argument("--head-dim", type=int, default=None, help="default 128")
    p.add_argument("--dtype", choices=sorted(C.DTYPES), default="bf16")
    p.add_argument("--no-causal", dest="causal", action="store_false")
    p.add_argument("--backends", type=C.str_list, default=["flash", "cudnn", "efficient", "math"],
                   help="torch SDPA backends (comma list)")
    args = p.parse_args(argv)
    defaults = dict(seqlens=[1024, 2048, 4096, 8192, 16384, 32768, 65536], heads=16, head_dim=128)
    if args.quick:
        defaults.update(seqlens=[256, 512, 1024, 2048], heads=4, head_dim=32)
    for key, value in defaults.items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    args.kv_heads = args.kv_heads or args.heads
    return args


def model_bytes(impl, batch, seqlen, heads, kv_heads, head_dim, dtype):
    """Lower bound on the bytes a forward+backward allocates beyond its inputs (see the docstring)."""
    elem = C.DTYPES[dtype].itemsize
    q_size, kv_size, rows = batch * seqlen * heads * head_dim * elem, batch * seqlen * kv_heads * head_dim * elem, \
        batch * heads * seqlen * 4
    fused = q_size + 2 * rows + q_size + 2 * kv_size  # out, lse + delta (fp32), dq, dk + dv
    if impl == "math":
        return fused + 2 * batch * heads * seqlen * seqlen * elem  # attention weights and their gradient
    return fused


def measure(run, leaves, dout, device):
    """Peak bytes allocated by ``run().backward(dout)`` beyond what is allocated before it.
    A first, unmeasured call lets Triton autotune (its trial runs clone buffers)."""
    run().backward(dout)
    for t in leaves:
        t.grad = None
    C.synchronize(device)
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats(device)
    base = torch.cuda.memory_allocated(device)
    run().backward(dout)
    C.synchronize(device)
    peak = torch.cuda.max_memory_allocated(device) - base
    for t in leaves:
        t.grad = None
    return peak


def measure_all(args, seqlen, device, backends):
    """{impl: bytes or a reason string} for one sequence length (GPU only)."""
    q, k, v, dout = C.attention_inputs(args.batch, seqlen, args.heads, args.kv_heads, args.head_dim,
                                       args.dtype, device)
    results = {}
    leaves = [t.requires_grad_() for t in (q, k, v)]
    results["cpattn"] = measure(lambda: cpattn.flash_attn_func(q, k, v, causal=args.causal), leaves, dout, device)
    sq, sk, sv, sdout = (t.detach().transpose(1, 2).contiguous() for t in (q, k, v, dout))
    del q, k, v, dout, leaves
    leaves = [t.requires_grad_() for t in (sq, sk, sv)]
    for name, backend in backends.items():
        if name == "math":
            need = model_bytes("math", args.batch, seqlen, args.heads, args.kv_heads, args.head_dim, args.dtype)
            free = torch.cuda.mem_get_info(device)[0]
            if need > 0.8 * free:
                results[name] = f"skipped: model says >= {need / MIB:.0f} MiB, {free / MIB:.0f} MiB free"
                continue
        results[name] = C.try_backend(lambda: measure(C.sdpa_call(backend, sq, sk, sv, args.causal),
                                                      leaves, sdout, device))
    return results


def growth_exponent(before, after):
    """e in memory ~ seqlen**e between two (seqlen, bytes) points: 1 is linear, 2 quadratic."""
    if before is None:
        return None
    (s0, m0), (s1, m1) = before, after
    return math.log(m1 / m0) / math.log(s1 / s0) if m0 > 0 and m1 > 0 and s1 != s0 else None


def main(argv=None):
    args = parse_args(argv)
    device = C.pick_device(args.quick)
    backends = C.sdpa_backends(args.backends)
    env = C.environment(device, args.quick)
    env["measures"] = ("model only (nothing measured on CPU)" if args.quick else
                       "torch.cuda.max_memory_allocated during one forward+backward, minus what was allocated before "
                       "(inputs); model = lower bound of the tensors that must exist")
    print(f"{env['device']} | torch {env['torch']} | triton {env['triton']}\nmeasures: {env['measures']}")

    impls = ["cpattn"] + list(backends)
    rows, previous = [], {}
    for i, seqlen in enumerate(args.seqlens, 1):
        C.progress(i, len(args.seqlens), f"S={seqlen}")
        row = {"seqlen": seqlen, "batch": args.batch, "heads": args.heads, "kv_heads": args.kv_heads,
               "head_dim": args.head_dim, "dtype": args.dtype, "causal": args.causal}
        shape = (args.batch, seqlen, args.heads, args.kv_heads, args.head_dim, args.dtype)
        row["model_fused_mib"] = model_bytes("fused", *shape) / MIB
        row["model_math_mib"] = model_bytes("math", *shape) / MIB
        if not args.quick:
            for impl, value in measure_all(args, seqlen, device, backends).items():
                ok = isinstance(value, int)
                row[f"{impl}_mib"] = value / MIB if ok else None
                row[f"{impl}_status"] = "ok" if ok else value
                row[f"{impl}_exponent"] = growth_exponent(previous.get(impl), (seqlen, value)) if ok else None
                previous[impl] = (seqlen, value) if ok else None
        rows.append(row)

    out_dir = C.output_dir(args, device)
    paths = C.save_results(out_dir, "memory", env, rows)
    series = [(impl, f"{impl}_mib") for impl in impls if not args.quick]
    series += [("model: fused kernel", "model_fused_mib"), ("model: math", "model_math_mib")]
    paths.append(C.plot_lines(out_dir / "memory.png", rows, "seqlen", series,
                              lambda r: f"B={r['batch']} H={r['heads']}/{r['kv_heads']} D={r['head_dim']} "
                                        f"{r['dtype']} {'causal' if r['causal'] else 'full'}",
                              C.plot_title(env, "peak memory of forward+backward beyond the inputs"
                                           + (" (model only)" if args.quick else "")), "MiB", log_y=True))
    columns = [("seqlen", "seq"), ("model_fused_mib", "model fused MiB"), ("model_math_mib", "model math MiB")]
    if not args.quick:
        columns += [(f"{impl}_{k}", f"{impl} {h}") for impl in impls for k, h in (("mib", "MiB"), ("exponent", "exp"))]
    C.print_table(rows, columns, title="peak MiB beyond the inputs; exp = e in memory ~ seqlen^e from the previous row (1: linear, 2: quadratic)")
    C.print_saved(paths, False)  # --quick measures nothing: its table says so
    return rows


if __name__ == "__main__":
    main()
