"""Merge kernel bandwidth against a measured device-to-device copy of the same bytes.

    python bench/bench_merge.py            # on a GPU
    python bench/bench_merge.py --quick    # tiny shapes on CPU: tests the script, no timing claims

``cpattn.kernels.merge_attention`` reads two partials (out, lse) and writes one:
3 x (out bytes + lse bytes) of memory traffic. The baseline is ``dst.copy_(src)``
with src of half that size (a copy reads and writes), so both move the same
bytes; ``of_copy`` = merge GB/s / copy GB/s (the issue's target is 0.8 or more).
Results: bench/results/<device>/merge.{json,csv,png}.
"""
import itertools

import torch

import _common as C
from cpattn.kernels import merge_attention


def parse_args(argv):
    p = C.base_parser(__doc__)
    p.add_argument("--seqlens", type=C.int_list, default=None, help="comma list (default 1024..131072)")
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--heads", type=int, default=None, help="default 32")
    p.add_argument("--head-dim", type=int, default=None, help="default 128")
    p.add_argument("--dtypes", type=C.str_list, default=None,
                   help="dtype of out, comma list of bf16,fp16,fp32 (default bf16,fp32: fp32 is a ring's running out)")
    args = p.parse_args(argv)
    defaults = dict(seqlens=[1024, 4096, 16384, 65536, 131072], heads=32, head_dim=128, dtypes=["bf16", "fp32"])
    if args.quick:
        defaults.update(seqlens=[64, 256], heads=4, head_dim=32, dtypes=["fp32"])
    for key, value in defaults.items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    return args


def bench_one(batch, seqlen, heads, head_dim, dtype, inplace, device):
    gen = torch.Generator(device=device).manual_seed(0)

    def partial():
        out = torch.randn((batch, seqlen, heads, head_dim), generator=gen, device=device, dtype=C.DTYPES[dtype])
        return out, torch.randn((batch, heads, seqlen), generator=gen, device=device, dtype=torch.float32)

    (out_a, lse_a), (out_b, lse_b) = partial(), partial()
    traffic = 3 * (out_a.numel() * out_a.element_size() + lse_a.numel() * lse_a.element_size())
    merge_ms = C.time_ms(lambda: merge_attention(out_a, lse_a, out_b, lse_b, inplace=inplace), device)
    del out_a, lse_a, out_b, lse_b
    src = torch.empty(traffic // 2, dtype=torch.uint8, device=device)
    dst = torch.empty_like(src)
    copy_ms = C.time_ms(lambda: dst.copy_(src), device)
    merge_gbs, copy_gbs = traffic / merge_ms / 1e6, 2 * src.numel() / copy_ms / 1e6
    return {"batch": batch, "seqlen": seqlen, "heads": heads, "head_dim": head_dim, "dtype": dtype,
            "inplace": inplace, "bytes": traffic, "merge_ms": merge_ms, "merge_gbs": merge_gbs,
            "copy_ms": copy_ms, "copy_gbs": copy_gbs, "of_copy": merge_gbs / copy_gbs}


def main(argv=None):
    args = parse_args(argv)
    device = C.pick_device(args.quick)
    env = C.environment(device, args.quick)
    env["bytes"] = "merge: read out_a, lse_a, out_b, lse_b + write out, lse; copy: the same total, read + write"
    print(f"{env['device']} | torch {env['torch']} | triton {env['triton']}" + (f"\n{C.QUICK_NOTE}" if args.quick else ""))

    grid = list(itertools.product(args.dtypes, (False, True), args.seqlens))
    rows = []
    for i, (dtype, inplace, seqlen) in enumerate(grid, 1):
        C.progress(i, len(grid), f"S={seqlen} H={args.heads} D={args.head_dim} {dtype} inplace={inplace}")
        rows.append(bench_one(args.batch, seqlen, args.heads, args.head_dim, dtype, inplace, device))

    out_dir = C.output_dir(args, device)
    paths = C.save_results(out_dir, "merge", env, rows)
    paths.append(C.plot_lines(out_dir / "merge.png", rows, "seqlen", [("merge", "merge_gbs"), ("torch copy_", "copy_gbs")],
                              lambda r: f"out {r['dtype']}, {'in place' if r['inplace'] else 'new output'}",
                              C.plot_title(env, f"merge vs copy of the same bytes "
                                                f"(B={args.batch} H={args.heads} D={args.head_dim})"), "GB/s"))
    C.print_table(rows, [("seqlen", "seq"), ("dtype", "out dtype"), ("inplace", "inplace"), ("bytes", "bytes"),
                         ("merge_gbs", "merge GB/s"), ("copy_gbs", "copy GB/s"), ("of_copy", "merge/copy")],
                  title="merge bandwidth vs copy_ of the same bytes (target: merge/copy >= 0.8)")
    C.print_saved(paths, args.quick)
    return rows


if __name__ == "__main__":
    main()
