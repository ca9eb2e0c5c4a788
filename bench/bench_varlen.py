"""Packed documents: ``cpattn.flash_attn_varlen_func`` against the two ways torch SDPA can do it.

    python bench/bench_varlen.py            # on a GPU
    python bench/bench_varlen.py --quick    # tiny packings on CPU: tests the script, no timing claims

For each packing (document lengths drawn from a long-tailed distribution, or one
long document plus many short ones, --tokens in total) it times forward and
forward+backward of
  * cpattn: one varlen call over the packed (total, H, D) tensors;
  * sdpa-mask: one SDPA call over the whole packed sequence with a block-diagonal
    (and causal) boolean mask, i.e. O(total^2) work and memory;
  * sdpa-loop: one SDPA call per document (flash backend where it runs).
FLOPs count only the useful (per-document) work, so the TFLOPS columns compare
like with like; ``x<impl> = impl time / cpattn time`` (above 1: cpattn faster).
Results: bench/results/<device>/varlen.{json,csv}.
"""
import math

import torch
import torch.nn.functional as F

import _common as C
import cpattn


def parse_args(argv):
    p = C.base_parser(__doc__)
    p.add_argument("--tokens", type=int, default=None, help="packed tokens per call (default 32768)")
    p.add_argument("--heads", type=int, default=None, help="query heads (default 16)")
    p.add_argument("--kv-heads", type=int, default=None, help="kv heads (default 4)")
    p.add_argument("--head-dim", type=int, default=None, help="default 128")
    p.add_argument("--dtype", default=None, help="bf16, fp16 or fp32 (default bf16)")
    args = p.parse_args(argv)
    defaults = dict(tokens=32768, heads=16, kv_heads=4, head_dim=128, dtype="bf16")
    if args.quick:
        defaults.update(tokens=128, heads=2, kv_heads=1, head_dim=16, dtype="fp32")
    for key, value in defaults.items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    return args


def packings(total, seed=0):
    """{name: document lengths summing to ``total``}."""
    gen = torch.Generator().manual_seed(seed)

    def long_tailed():
        # log-normal lengths (median total / 64): most documents short, a few long
        lengths = []
        while sum(lengths) < total:
            median = math.log(max(total // 64, 2))
            lengths.append(max(1, int(torch.empty(1).log_normal_(median, 1.2, generator=gen).item())))
        lengths[-1] -= sum(lengths) - total
        return [n for n in lengths if n > 0]

    one_long = [total // 2] + [total // 32] * 16
    one_long[-1] += total - sum(one_long)
    return {"long-tailed": long_tailed(), "1 long + 16 short": one_long}


def flops(lengths, heads, head_dim, causal, mode):
    return sum(C.attention_flops(1, heads, n, n, head_dim, causal, mode) for n in lengths)


def main(argv=None):
    args = parse_args(argv)
    device = C.pick_device(args.quick)
    env = C.environment(device, args.quick)
    print(f"{env['device']} | torch {env['torch']} | triton {env['triton']}" + (f"\n{C.QUICK_NOTE}" if args.quick else ""))
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}[args.dtype]
    rows = []
    for name, lengths in packings(args.tokens).items():
        cu = torch.tensor([0] + torch.tensor(lengths).cumsum(0).tolist(), dtype=torch.int32, device=device)
        total, longest = int(cu[-1]), max(lengths)
        gen = torch.Generator(device="cpu").manual_seed(0)
        q, k, v = (torch.randn(total, h, args.head_dim, generator=gen).to(device, dtype)
                   for h in (args.heads, args.kv_heads, args.kv_heads))
        doc = torch.repeat_interleave(torch.arange(len(lengths), device=device), cu.diff().long())
        for causal in (False, True):
            allowed = doc[:, None] == doc[None, :]
            if causal:
                allowed &= torch.ones(total, total, dtype=torch.bool, device=device).tril()
            bounds = list(zip(cu.tolist(), cu.tolist()[1:]))
            impls = {
                "cpattn": lambda: cpattn.flash_attn_varlen_func(q, k, v, cu, cu, longest, longest, causal=causal),
                "sdpa-mask": lambda: F.scaled_dot_product_attention(*_heads_first(q, k, v), attn_mask=allowed,
                                                                    enable_gqa=True),
                "sdpa-loop": lambda: [F.scaled_dot_product_attention(*_heads_first(q[a:b], k[a:b], v[a:b]),
                                                                     is_causal=causal, enable_gqa=True)
                                      for a, b in bounds],
            }
            for mode in ("fwd", "fwd+bwd"):
                row = {"packing": name, "documents": len(lengths), "longest": longest, "tokens": total,
                       "causal": causal, "mode": mode, "flops": flops(lengths, args.heads, args.head_dim, causal, mode)}
                for impl, run in impls.items():
                    C.progress(len(rows) + 1, 8, f"{name} {'causal' if causal else 'full'} {mode}: {impl}")
                    result = C.try_backend(lambda: _time(run, (q, k, v), mode, device))
                    row[f"{impl}_ms"] = result if isinstance(result, float) else None
                    row[f"{impl}_status"] = "ok" if isinstance(result, float) else result
                    row[f"{impl}_tflops"] = row["flops"] / result / 1e9 if isinstance(result, float) else None
                for impl in ("sdpa-mask", "sdpa-loop"):
                    row[f"x{impl}"] = (row[f"{impl}_ms"] / row["cpattn_ms"]
                                       if row[f"{impl}_ms"] and row["cpattn_ms"] else None)
                rows.append(row)
    out_dir = C.output_dir(args, device)
    paths = C.save_results(out_dir, "varlen", env, rows)
    columns = [("packing", "packing"), ("documents", "docs"), ("longest", "longest"), ("causal", "causal"),
               ("mode", "mode"), ("cpattn_tflops", "cpattn TF"), ("sdpa-mask_tflops", "mask TF"),
               ("xsdpa-mask", "xmask"), ("sdpa-loop_tflops", "loop TF"), ("xsdpa-loop", "xloop")]
    C.print_table(rows, columns, title="useful TFLOPS; x<impl> = impl time / cpattn time (>1: cpattn faster)")
    C.print_saved(paths, args.quick)
    return rows


def _heads_first(*tensors):
    """(total, H, D) -> SDPA's (1, H, total, D), a view."""
    return [t.transpose(0, 1)[None] for t in tensors]


def _time(run, leaves, mode, device):
    if mode == "fwd":
        with torch.no_grad():
            return C.time_ms(run, device)
    for t in leaves:
        t.requires_grad_()
    try:
        def step():
            out = run()
            sum(o.float().sum() for o in (out if isinstance(out, list) else [out])).backward()
        return C.time_ms(step, device, grad_to_none=leaves)
    finally:
        for t in leaves:
            t.requires_grad_(False)
            t.grad = None


if __name__ == "__main__":
    main()
