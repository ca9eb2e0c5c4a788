"""Correctness smoke on a GPU: a curated subset of cases, compiled, against references.

    python bench/gpu_smoke.py              # on a GPU (about a minute on a fresh machine, mostly compiles)
    python bench/gpu_smoke.py --quick      # the same cases, tiny and in fp32, on CPU (interpreter)

Not the test suite: the few cases that cover each compiled variant a user meets
first, chosen so that the whole run stays near a minute of Triton compiles
(every dtype x head dim x causal is a kernel of its own):

  flash    ``flash_attn_func`` forward and backward: bf16 and fp16, head dims 64
           and 128, causal and not, MHA / GQA / MQA, q shorter and longer than kv
           (causal bottom-right aligned, as flash-attn), odd lengths (77, 129, 777, 1029);
           MLA's head dims (q, k 192, v 128), causal, GQA
  sdpa     ``scaled_dot_product_attention`` (B, H, L, D), is_causal, bf16
  varlen   ``flash_attn_varlen_func``: four packed documents (one of length 1),
           causal sliding window, softcap and sinks together, bf16, forward and backward
  decode   ``kernels.decode_attention`` over a paged ``ShardedKVCache`` and
           ``cpattn.decode`` (store + attention), GQA, three cache lengths, bf16

The rule is flash-attn's: our largest error against a float64 reference is at
most twice the error of torch computing the same thing in the same dtype, plus
1e-5 (torch: SDPA where it has the feature; for softcap / sinks, the same math
in the low dtype). Rows: bench/results/<device>/gpu_smoke.{json,csv}; exit 1 if
any case fails.
"""
import sys

import torch

import _common as C
import cpattn
from cpattn.kernels import decode_attention
from cpattn.kernels.reference import reference_attention, reference_varlen

# name -> (kind, dtype, head_dim (or (q/k, v) head dims), causal, heads, kv_heads, seqlen_q, seqlen_k)
CASES = {
    "flash-bf16-d128-causal-mha": ("flash", "bf16", 128, True, 16, 16, 1000, 1000),
    "flash-bf16-d128-full-gqa-q<k": ("flash", "bf16", 128, False, 16, 4, 77, 1029),
    "flash-bf16-d64-causal-gqa-q>k": ("flash", "bf16", 64, True, 8, 2, 1029, 300),
    "flash-bf16-d64-full-mha": ("flash", "bf16", 64, False, 8, 8, 512, 512),
    "flash-fp16-d128-causal-mqa": ("flash", "fp16", 128, True, 8, 1, 777, 777),
    "flash-fp16-d64-full-mha": ("flash", "fp16", 64, False, 8, 8, 129, 129),
    "flash-bf16-d192v128-causal-gqa": ("flash", "bf16", (192, 128), True, 16, 4, 1029, 1029),
    "sdpa-bf16-d128-causal": ("sdpa", "bf16", 128, True, 8, 8, 640, 640),
    "varlen-bf16-d128-window-softcap-sinks": ("varlen", "bf16", 128, True, 8, 2, 1078, 1078),
    "decode-bf16-d128-paged-gqa": ("decode", "bf16", 128, True, 32, 8, 1, 3000),
}
ATOL = 1e-5
VARLEN_DOCS = (300, 1, 77, 700)
WINDOW, SOFTCAP = (256, 0), 20.0


def low_precision_reference(q, k, v, causal, window, softcap, sinks):
    """torch computing attention in q's dtype (what its error is measured on), flash layout (B, S, H, D)."""
    group = q.shape[2] // k.shape[2]
    qt, kt, vt = (t.transpose(1, 2) for t in (q, k.repeat_interleave(group, 2), v.repeat_interleave(group, 2)))
    s = (qt @ kt.transpose(-1, -2)) * q.shape[-1] ** -0.5
    if softcap:
        s = softcap * torch.tanh(s / softcap)
    i = torch.arange(q.shape[1], device=q.device)[:, None] + (k.shape[1] - q.shape[1])
    j = torch.arange(k.shape[1], device=q.device)[None, :]
    hidden = (j > i) if causal else torch.zeros_like(j > i)
    if window[0] >= 0:
        hidden = hidden | (j < i - window[0])
    s = s.masked_fill(hidden, float("-inf"))
    if sinks is not None:
        s = torch.cat([s, sinks.to(s.dtype)[None, :, None, None].expand(*s.shape[:-1], 1)], dim=-1)
        vt = torch.cat([vt, vt.new_zeros(*vt.shape[:-2], 1, vt.shape[-1])], dim=-2)
    # A row that sees no key gives 0 (flash-attn's convention), not softmax's NaN.
    return (torch.softmax(s, dim=-1).nan_to_num(0.0) @ vt).transpose(1, 2)


def grads(fn, inputs, dout):
    """[out, d(inputs)...] of ``fn(*inputs)``."""
    leaves = [t.detach().clone().requires_grad_() for t in inputs]
    out = fn(*leaves)
    return [out.detach(), *torch.autograd.grad(out, leaves, dout)]


def compare(names, ours, torch_low, exact):
    """Errors and the verdict of flash-attn's rule, per tensor."""
    row, ok = {}, True
    for name, mine, theirs, ref in zip(names, ours, torch_low, exact):
        row[f"{name}_err"] = (mine.double() - ref.double()).abs().max().item()
        row[f"{name}_torch_err"] = (theirs.double() - ref.double()).abs().max().item()
        ok = ok and row[f"{name}_err"] <= 2 * row[f"{name}_torch_err"] + ATOL
    row["ok"] = ok
    return row


def flash_case(dtype, head_dims, causal, heads, kv_heads, sq, sk, device, gen):
    head_dim, value_dim = (head_dims, head_dims) if isinstance(head_dims, int) else head_dims
    q, k, v = (torch.randn(2, s, h, d, generator=gen, device=device).to(dtype)
               for s, h, d in ((sq, heads, head_dim), (sk, kv_heads, head_dim), (sk, kv_heads, value_dim)))
    dout = torch.randn(2, sq, heads, value_dim, generator=gen, device=device).to(dtype)
    ours = grads(lambda *t: cpattn.flash_attn_func(*t, causal=causal), (q, k, v), dout)
    # flash-attn aligns causal masks bottom-right: the last query sees the last key.
    exact = grads(lambda *t: reference_attention(*t, causal=causal, q_start=sk - sq)[0], (q, k, v), dout.double())
    low = grads(lambda *t: low_precision_reference(*t, causal, (-1, -1), 0.0, None), (q, k, v), dout)
    return compare(("out", "dq", "dk", "dv"), ours, low, exact)


def sdpa_case(dtype, head_dim, causal, heads, kv_heads, sq, sk, device, gen):
    q, k, v = (torch.randn(2, h, s, head_dim, generator=gen, device=device).to(dtype)
               for s, h in ((sq, heads), (sk, kv_heads), (sk, kv_heads)))
    dout = torch.randn(2, heads, sq, head_dim, generator=gen, device=device).to(dtype)
    gqa = heads != kv_heads
    ours = grads(lambda *t: cpattn.scaled_dot_product_attention(*t, is_causal=causal, enable_gqa=gqa), (q, k, v), dout)
    low = grads(lambda *t: torch.nn.functional.scaled_dot_product_attention(*t, is_causal=causal, enable_gqa=gqa),
                (q, k, v), dout)
    # SDPA's causal mask is top-left aligned: q_start = k_start = 0.
    exact = grads(lambda *t: reference_attention(*(x.transpose(1, 2) for x in t), causal=causal)[0].transpose(1, 2),
                  (q, k, v), dout.double())
    return compare(("out", "dq", "dk", "dv"), ours, low, exact)


def varlen_case(dtype, head_dim, causal, heads, kv_heads, sq, sk, device, gen, docs=VARLEN_DOCS):
    total = sum(docs)
    cu = torch.tensor([0, *torch.tensor(docs).cumsum(0).tolist()], dtype=torch.int32, device=device)
    q, k, v = (torch.randn(total, h, head_dim, generator=gen, device=device).to(dtype)
               for h in (heads, kv_heads, kv_heads))
    dout = torch.randn(total, heads, head_dim, generator=gen, device=device).to(dtype)
    sinks = torch.randn(heads, generator=gen, device=device)
    options = dict(window_size=WINDOW, softcap=SOFTCAP)
    ours = grads(lambda *t: cpattn.flash_attn_varlen_func(*t, cu, cu, max(docs), max(docs), causal=causal,
                                                          sinks=sinks, **options), (q, k, v), dout)
    exact = grads(lambda *t: reference_varlen(*t, cu, cu, causal=causal, sinks=sinks, **options)[0],
                  (q, k, v), dout.double())

    def low_precision(*t):
        bounds = cu.tolist()
        return torch.cat([low_precision_reference(*(x[None, a:b] for x in t), causal, WINDOW, SOFTCAP, sinks)[0]
                          for a, b in zip(bounds, bounds[1:])])

    low = grads(low_precision, (q, k, v), dout)
    return compare(("out", "dq", "dk", "dv"), ours, low, exact)


def decode_case(dtype, head_dim, causal, heads, kv_heads, sq, sk, device, gen, page_size=64):
    lengths = [sk, sk // 3 + 1, 64]  # cache lengths; each sequence adds one token
    batch = len(lengths)
    cache = cpattn.ShardedKVCache(batch, sk + 1, kv_heads, head_dim, dtype=dtype, device=device, page_size=page_size)
    ks = [torch.randn(1, n + 1, kv_heads, head_dim, generator=gen, device=device).to(dtype) for n in lengths]
    vs = [torch.randn(1, n + 1, kv_heads, head_dim, generator=gen, device=device).to(dtype) for n in lengths]
    for b, n in enumerate(lengths):
        cache.append(ks[b][:, :n], vs[b][:, :n], batch_index=torch.tensor([b]))
    q = torch.randn(batch, 1, heads, head_dim, generator=gen, device=device).to(dtype)
    new_k = torch.cat([x[:, -1:] for x in ks])
    new_v = torch.cat([x[:, -1:] for x in vs])
    step = cpattn.decode(cache, q, new_k, new_v)  # stores the new tokens, then attends
    lens = torch.tensor([n + 1 for n in lengths], dtype=torch.int32, device=device)
    kernel = decode_attention(q, cache.k, cache.v, lens, block_table=cache.block_table)[0]
    exact = torch.cat([reference_attention(q[b:b + 1], ks[b], vs[b], causal=True, q_start=lengths[b])[0]
                       for b in range(batch)])
    low = torch.cat([torch.nn.functional.scaled_dot_product_attention(
        q[b:b + 1].transpose(1, 2), ks[b].transpose(1, 2), vs[b].transpose(1, 2),
        enable_gqa=True).transpose(1, 2) for b in range(batch)])
    return compare(("kernel", "step"), (kernel, step), (low, low), (exact, exact))


RUNNERS = {"flash": flash_case, "sdpa": sdpa_case, "varlen": varlen_case, "decode": decode_case}


def quick_case(case):
    """The same case, tiny and in fp32, for the CPU interpreter."""
    kind, _, head_dim, causal, heads, kv_heads, sq, sk = case
    head_dim = min(head_dim, 32) if isinstance(head_dim, int) else (40, 32)
    return kind, "fp32", head_dim, causal, min(heads, 4), min(kv_heads, 2), max(1, sq // 16), max(1, sk // 16)


def main(argv=None):
    parser = C.base_parser(__doc__)
    parser.add_argument("--cases", type=C.str_list, default=None, help=f"comma list of {', '.join(CASES)}")
    args = parser.parse_args(argv)
    names = args.cases or list(CASES)
    unknown = set(names) - set(CASES)
    if unknown:
        parser.error(f"unknown cases {sorted(unknown)}")
    device = C.pick_device(args.quick)
    env = C.environment(device, args.quick)
    env["rule"] = f"error vs float64 <= 2 x torch's error in the same dtype + {ATOL}"
    print(f"{env['device']} | torch {env['torch']} | triton {env['triton']}")
    rows = []
    for i, name in enumerate(names, 1):
        case = quick_case(CASES[name]) if args.quick else CASES[name]
        kind, dtype, *shape = case
        C.progress(i, len(names), name)
        gen = torch.Generator(device=device).manual_seed(i)
        try:
            result = RUNNERS[kind](C.DTYPES[dtype], *shape, device, gen)
        except Exception as exc:  # a crash is a failed case, reported with the others
            result = {"ok": False, "error": f"{type(exc).__name__}: {str(exc).splitlines()[0][:300]}"}
        dims = shape[0] if isinstance(shape[0], int) else "/".join(map(str, shape[0]))
        rows.append({"case": name, "dtype": dtype, "head_dim": dims, **result})
        print(f"  {'ok  ' if result['ok'] else 'FAIL'} {name} " + " ".join(
            f"{key}={value:.2e}" for key, value in result.items() if isinstance(value, float)) + (
            f" {result['error']}" if "error" in result else ""))
    paths = C.save_results(C.output_dir(args, device), "gpu_smoke", env, rows)
    failed = [r["case"] for r in rows if not r["ok"]]
    print(f"gpu_smoke: {len(rows) - len(failed)}/{len(rows)} cases pass" + (f"; FAILED: {failed}" if failed else ""))
    C.print_saved(paths, args.quick)
    return rows


if __name__ == "__main__":
    sys.exit(1 if any(not r["ok"] for r in main()) else 0)
