"""Attention kernel benchmark: cpattn against torch SDPA's backends, one at a time.

    python bench/bench_attention.py            # full grid on a GPU (H100: a few minutes)
    python bench/bench_attention.py --quick    # tiny grid on CPU: tests the script, no timing claims

For every shape of the grid (sequence 1k..32k, head dim 64 and 128, causal and
not, bf16 and fp16, MHA and GQA 32/8 heads, batch x sequence >= --tokens) it
times forward, backward and forward+backward of ``cpattn.flash_attn_func`` and
of ``torch.nn.functional.scaled_dot_product_attention`` under each backend
(flash, cuDNN, memory-efficient) with ``triton.testing.do_bench`` (median).
It reports TFLOPS and, per backend, ``x<backend> = backend time / cpattn time``
(above 1: cpattn is faster). A backend that refuses a shape is reported as
unsupported with torch's reason.

``--forward tma,pointers`` and ``--backward deterministic,atomic`` time more than one cpattn
kernel in the same run: the forward reading through tensor descriptors (TMA on sm_90, the
default) or through pointers (``CPATTN_FORWARD=pointers``, the kernel of the first H200 run),
and the default two-kernel backward or the 5-GEMM one (``atomic_dq=True``). The first of each
list is "cpattn" (the SDPA ratios are against it); the others get columns of their own,
``cpattn[<forward>/<backward>]``, timed in the modes they change.

Each side gets its own native layout: cpattn (batch, seq, heads, dim), SDPA
(batch, heads, seq, dim), both contiguous. GQA goes to SDPA as
``enable_gqa=True`` (kv is not repeated), so a backend without GQA support
shows up as unsupported for those shapes.
Results: bench/results/<device>/attention.{json,csv} and attention_<dtype>_<mha|gqa>.png.
"""
import itertools
import os

import torch

import _common as C
import cpattn
from cpattn.kernels.autotune import chosen_configs

MODES = ("fwd", "bwd", "fwd+bwd")


def parse_args(argv):
    p = C.base_parser(__doc__)
    p.add_argument("--seqlens", type=C.int_list, default=None, help="comma list (default 1024..32768)")
    p.add_argument("--head-dims", type=C.head_dim_list, default=None,
                   help="comma list (default 64,128); D:Dv gives v a head dim of its own, e.g. 192:128 (MLA)")
    p.add_argument("--dtypes", type=C.str_list, default=None, help="comma list of bf16,fp16,fp32 (default bf16,fp16)")
    p.add_argument("--causal", choices=("both", "causal", "full"), default="both")
    p.add_argument("--attn", type=C.str_list, default=None, help="comma list of mha,gqa (default both)")
    p.add_argument("--heads", type=int, default=None, help="query heads (default 32)")
    p.add_argument("--kv-heads", type=int, default=None, help="kv heads for gqa (default 8)")
    p.add_argument("--tokens", type=int, default=None, help="batch = max(1, tokens // seqlen) (default 16384)")
    p.add_argument("--modes", type=C.str_list, default=list(MODES), help="comma list of fwd,bwd,fwd+bwd")
    p.add_argument("--forward", type=C.str_list, default=["tma"],
                   help="comma list of tma,pointers: the cpattn forwards to time (default tma)")
    p.add_argument("--backward", type=C.str_list, default=["deterministic"],
                   help="comma list of deterministic,atomic: the cpattn backwards to time (default deterministic)")
    p.add_argument("--backends", type=C.str_list, default=None,
                   help="torch SDPA backends, comma list of flash,cudnn,efficient,math (default flash,cudnn,efficient)")
    args = p.parse_args(argv)
    # The real grid, or a tiny one for the interpreter (bf16 there runs as fp32 anyway).
    defaults = dict(seqlens=[1024, 2048, 4096, 8192, 16384, 32768], head_dims=[(64, 64), (128, 128)], dtypes=["bf16", "fp16"],
                    attn=["mha", "gqa"], heads=32, kv_heads=8, tokens=16384, backends=["flash", "cudnn", "efficient"])
    if args.quick:
        defaults.update(seqlens=[64, 128], head_dims=[(32, 32)], dtypes=["fp32"], heads=4, kv_heads=2, tokens=128,
                        backends=["math", "flash", "efficient", "cudnn"])
    for key, value in defaults.items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    unknown = set(args.modes) - set(MODES)
    if unknown:
        p.error(f"unknown modes {sorted(unknown)}")
    for name, allowed in (("forward", ("tma", "pointers")), ("backward", ("deterministic", "atomic"))):
        if not getattr(args, name) or set(getattr(args, name)) - set(allowed):
            p.error(f"--{name} takes a comma list of {','.join(allowed)}")
    return args


def kernel_variants(args):
    """[(label, forward loads, backward, modes it is timed in)]: the first forward with the first
    backward ("cpattn"), each other forward in the modes with a forward, each other backward in
    the modes with a backward."""
    first_f, first_b = args.forward[0], args.backward[0]
    variants = [("cpattn", first_f, first_b, args.modes)]
    variants += [(f"cpattn[{f}/{first_b}]", f, first_b, args.modes) for f in args.forward[1:]]
    variants += [(f"cpattn[{first_f}/{b}]", first_f, b, [m for m in args.modes if m != "fwd"])
                 for b in args.backward[1:]]
    return [v for v in variants if v[3]]


def cpattn_call(q, k, v, causal, forward, backward):
    """flash_attn_func with the forward chosen by CPATTN_FORWARD and the backward by atomic_dq."""
    def run():
        previous = os.environ.get("CPATTN_FORWARD")
        os.environ["CPATTN_FORWARD"] = forward
        try:
            return cpattn.flash_attn_func(q, k, v, causal=causal, atomic_dq=backward == "atomic")
        finally:
            if previous is None:
                del os.environ["CPATTN_FORWARD"]
            else:
                os.environ["CPATTN_FORWARD"] = previous
    return run


def shapes(args):
    causals = {"both": (False, True), "causal": (True,), "full": (False,)}[args.causal]
    for dtype, kind, head_dim, causal, seqlen in itertools.product(args.dtypes, args.attn, args.head_dims,
                                                                    causals, args.seqlens):
        yield dict(seqlen=seqlen, batch=max(1, args.tokens // seqlen), heads=args.heads,
                   kv_heads=args.heads if kind == "mha" else args.kv_heads, attn=kind,
                   head_dim=head_dim[0], value_head_dim=head_dim[1], causal=causal, dtype=dtype)


def time_modes(forward, q, k, v, dout, modes, device):
    """{mode: median ms} for ``forward()`` (a function of q, k, v), its backward, and both."""
    times = {}
    if "fwd" in modes:
        with torch.no_grad():
            times["fwd"] = C.time_ms(forward, device)
    leaves = [t.requires_grad_() for t in (q, k, v)]
    if "bwd" in modes:
        out = forward()
        times["bwd"] = C.time_ms(lambda: out.backward(dout, retain_graph=True), device, grad_to_none=leaves)
        del out
    if "fwd+bwd" in modes:
        times["fwd+bwd"] = C.time_ms(lambda: forward().backward(dout), device, grad_to_none=leaves)
    for t in leaves:
        t.requires_grad_(False)
        t.grad = None
    return times


def bench_shape(shape, args, device, backends):
    """Rows (one per mode) for one shape; yields a label before each implementation it times."""
    modes = args.modes
    causal = shape["causal"]
    q, k, v, dout = C.attention_inputs(shape["batch"], shape["seqlen"], shape["heads"], shape["kv_heads"],
                                       shape["head_dim"], shape["dtype"], device,
                                       value_head_dim=shape["value_head_dim"])
    tuned_before = _flat(chosen_configs())
    timed = {}  # label -> {mode: ms}
    for label, forward, backward, variant_modes in kernel_variants(args):
        yield label
        timed[label] = time_modes(cpattn_call(q, k, v, causal, forward, backward), q, k, v, dout, variant_modes,
                                  device)
    cp_ms = timed.pop("cpattn")
    with torch.no_grad():
        cp_out = cpattn.flash_attn_func(q, k, v, causal=causal).transpose(1, 2).float()
    # The configs autotuning chose for this shape (GPU only: the interpreter has fixed blocks).
    configs = "; ".join(f"{name}: {config}" for (name, key), config in sorted(_flat(chosen_configs()).items())
                        if (name, key) not in tuned_before) or ("interpreter" if device.type == "cpu" else "cached")
    # The same values in SDPA's own layout (B, H, S, D), contiguous.
    sq, sk, sv, sdout = (t.transpose(1, 2).contiguous() for t in (q, k, v, dout))
    del q, k, v, dout
    other = {}
    errors = []  # largest |SDPA - cpattn| of each backend that ran

    def measure(backend):
        run = C.sdpa_call(backend, sq, sk, sv, causal)
        with torch.no_grad():
            errors.append((run().float() - cp_out).abs().max().item())
        return time_modes(run, sq, sk, sv, sdout, modes, device)

    for name, backend in backends.items():
        yield name
        other[name] = C.try_backend(lambda: measure(backend))
    max_err = max(errors) if errors else None

    rows = []
    for mode in modes:
        flops = C.attention_flops(shape["batch"], shape["heads"], shape["seqlen"], shape["seqlen"],
                                  shape["head_dim"], causal, mode, shape["value_head_dim"])
        row = {**shape, "mode": mode, "flops": flops, "cpattn_ms": cp_ms[mode],
               "cpattn_tflops": flops / cp_ms[mode] / 1e9, "cpattn_max_abs_err_vs_sdpa": max_err,
               "cpattn_configs": configs}
        for label, result in timed.items():
            ms = result.get(mode)
            row.update({f"{label}_ms": ms, f"{label}_tflops": ms and flops / ms / 1e9,
                        f"x{label}": ms and ms / cp_ms[mode]})
        for name, result in other.items():
            if isinstance(result, dict):
                row.update({f"{name}_status": "ok", f"{name}_ms": result[mode],
                            f"{name}_tflops": flops / result[mode] / 1e9, f"x{name}": result[mode] / cp_ms[mode]})
            else:
                row.update({f"{name}_status": result, f"{name}_ms": None, f"{name}_tflops": None, f"x{name}": None})
        rows.append(row)
    yield rows


def _flat(chosen):
    return {(name, key): config for name, picks in chosen.items() for key, config in picks.items()}


def main(argv=None):
    args = parse_args(argv)
    device = C.pick_device(args.quick)
    backends = C.sdpa_backends(args.backends)
    env = C.environment(device, args.quick)
    env["sdpa_gqa"] = "enable_gqa=True (kv not repeated)"
    env["layouts"] = "cpattn (B, S, H, D), SDPA (B, H, S, D), each contiguous"
    env["autotune"] = (f"CPATTN_AUTOTUNE={os.environ.get('CPATTN_AUTOTUNE', 'all')} (configs tried per kernel; "
                       "'all': every kept config)")
    print(f"{env['device']} | torch {env['torch']} | triton {env['triton']}" + (f"\n{C.QUICK_NOTE}" if args.quick else ""))

    env["cpattn_kernels"] = {label: f"forward {f}, backward {b}" for label, f, b, _ in kernel_variants(args)}
    grid = list(shapes(args))
    total, step, rows = len(grid) * (len(kernel_variants(args)) + len(backends)), 0, []
    for shape in grid:
        tag = (f"S={shape['seqlen']} B={shape['batch']} H={shape['heads']}/{shape['kv_heads']} "
               f"D={shape['head_dim']}/{shape['value_head_dim']} {'causal' if shape['causal'] else 'full'} {shape['dtype']}")
        for item in bench_shape(shape, args, device, backends):
            if isinstance(item, str):
                step += 1
                C.progress(step, total, f"{tag}: {item}")
            else:
                rows.extend(item)

    out_dir = C.output_dir(args, device)
    paths = C.save_results(out_dir, "attention", env, rows)
    extra = [label for label, *_ in kernel_variants(args)[1:]]
    series = ([("cpattn", "cpattn_tflops")] + [(label, f"{label}_tflops") for label in extra]
              + [(f"sdpa {b}", f"{b}_tflops") for b in backends])
    for dtype, kind in itertools.product(args.dtypes, args.attn):
        sub = [r for r in rows if r["dtype"] == dtype and r["attn"] == kind]
        if sub:
            heads = f"{sub[0]['heads']}/{sub[0]['kv_heads']} heads"
            paths.append(C.plot_lines(
                out_dir / f"attention_{dtype}_{kind}.png", sub, "seqlen", series,
                lambda r: f"{r['mode']} d={r['head_dim']}/{r['value_head_dim']} {'causal' if r['causal'] else 'full'}",
                C.plot_title(env, f"{dtype} {kind} ({heads}), batch x seq >= {args.tokens}"), "TFLOPS", ncols=len(args.modes)))

    columns = [("seqlen", "seq"), ("batch", "B"), ("heads", "H"), ("kv_heads", "Hkv"), ("head_dim", "D"),
               ("value_head_dim", "Dv"), ("causal", "causal"), ("dtype", "dtype"), ("mode", "mode"), ("cpattn_tflops", "cpattn TF")]
    for label in extra:
        columns += [(f"{label}_tflops", f"{label} TF"), (f"x{label}", f"x{label}")]
    for b in backends:
        columns += [(f"{b}_tflops", f"{b} TF"), (f"x{b}", f"x{b}")]
    C.print_table(rows, columns, title="TFLOPS; x<backend> = backend time / cpattn time (>1: cpattn faster; "
                                       "also for the other cpattn kernels); - = unsupported (reason in the JSON/CSV)")
    C.print_saved(paths, args.quick)
    return rows


if __name__ == "__main__":
    main()
