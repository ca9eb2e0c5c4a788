"""Decode latency per step against cache length, and the KV-cache memory per rank.

    python bench/bench_decode.py                 # GPU: cache 4k..128k tokens
    python bench/bench_decode.py --quick         # CPU smoke run (interpreter): no timing claims

Latency (group size 1, one GPU, one new token per sequence):
  kernel    cpattn.kernels.decode_attention over the paged cache (the attention alone), timed eagerly
            (host work included: when the host is slower than the GPU, that is what do_bench sees)
            and as ``kernel_graph_us``: the same call captured in a CUDA graph and replayed (GPU only)
  step      cpattn.decode: stores the new k, v into the paged cache, then the attention
            (``cache.rewind(1)`` after each call, so every call writes the same slot)
  graph     cpattn.decode_step captured once in a CUDA graph, then replayed (the step with no
            host work; GPU only), timed with CUDA events over its replays, and its first
            replay's difference to the eager step
  sdpa      torch.nn.functional.scaled_dot_product_attention (default backend choice, enable_gqa)
            over the same keys and values held contiguously in its native (B, Hkv, L, D) layout
Times: triton.testing.do_bench, median, in microseconds; ``x_sdpa`` = sdpa time / kernel time.
The largest output difference to SDPA is saved as a sanity check.

Memory (calculated, not measured): the K and V bytes each rank holds for a
sequence of L tokens when the cache is sharded over P = 1, 2, 4, 8 ranks in
page-interleaved stripes (ShardedKVCache's layout, whole pages), and the bytes
each rank sends per decode step to merge the partials across ranks:
``merge_bytes_per_step`` by cpattn.inference.decode_merge_bytes (what cpattn.decode
does: an all-gather for P = 2, an all-to-all of 1/P of the rows plus an all-gather
of the merged rows for P > 2), next to ``allgather_bytes_per_step``, what
all-gathering every rank's fp32 partial would send (P - 1 copies).

MLA (multi-head latent attention, DeepSeek V3's shapes by default: 128 query heads, one latent vector of
D = 576 per token whose first Dv = 512 entries are the value, the non-absorbed heads 192/128):
  decode_mla.json, latency  a latent ShardedKVCache (``latent=True``, one buffer: the kernel reads each
            latent vector once) against the same vectors held as separate keys (D) and values (Dv) of one
            kv head, the kernel alone over the same positions (``latent_kernel_us``, ``separate_kernel_us``),
            their outputs' largest difference, and the cpattn.decode step of the latent cache. Group size 1;
            on a GPU a modelled time for P ranks is the kernel at L / P tokens plus the merge, which this
            script does not time (no multi-GPU run here).
  decode_mla_bytes.json     calculated, per rank P = 1, 2, 4, 8 and one decoded token of one sequence of L
            tokens: the bytes of cache it reads (the slots it holds times the bytes per token of the layout,
            latent.ValueLayout.bytes_per_token) for the latent cache, for a GQA cache of the same model (the
            latent vector stored as a key of D and a value of Dv: (D + Dv) / D = 1.89x the bytes) and for the
            model's expanded multi-head cache (H heads of 192 + 128: H * 320 / 576 = 71x); and the decode
            merge bytes per rank and step (``decode_merge_bytes``: batch x H rows of Dv + 1 fp32 values).
  decode_mla_modelled.json  a step over P = 1, 2, 4, 8 ranks at 32k to 1M tokens of context, MODELLED from
            one device: the latent kernel timed over the slots one rank holds (rank 0, the most), next to
            the merge bytes that step sends per rank; the merge's time is not included (it needs P GPUs).
"""
import math

import torch
import torch.nn.functional as F

import _common as C
import cpattn
from cpattn.inference import decode_merge_bytes
from cpattn.kernels import decode_attention
from cpattn.kernels.decode import is_leading_columns
from cpattn.latent import ValueLayout
from cpattn.layout import StripeLayout


def parse_args():
    parser = C.base_parser(__doc__)
    parser.add_argument("--seqlens", type=C.int_list, default=None, help="cache lengths (default 4096..131072)")
    parser.add_argument("--batch", type=int, default=None, help="sequences per step (default 4)")
    parser.add_argument("--heads", type=int, default=None, help="query heads (default 32)")
    parser.add_argument("--kv-heads", type=int, default=None, help="kv heads (default 8)")
    parser.add_argument("--head-dim", type=int, default=None, help="head dim (default 128)")
    parser.add_argument("--page-size", type=int, default=None, help="page size (default 64)")
    parser.add_argument("--dtype", choices=sorted(C.DTYPES), default=None, help="default bf16 (fp32 with --quick)")
    parser.add_argument("--ranks", type=C.int_list, default=[1, 2, 4, 8], help="group sizes for the memory table")
    parser.add_argument("--mla-heads", type=int, default=None, help="MLA query heads (default 128; 16 with --quick)")
    parser.add_argument("--mla-dims", type=C.int_list, default=None,
                        help="MLA latent D,Dv (default 576,512; 72,64 with --quick)")
    parser.add_argument("--mla-seqlens", type=C.int_list, default=None,
                        help="context lengths of the modelled MLA table (default 32768..1048576)")
    return parser.parse_args()


def settings(args):
    if args.quick:
        defaults = dict(seqlens=[48, 100], batch=2, heads=4, kv_heads=2, head_dim=32, page_size=16, dtype="fp32",
                        mla_heads=16, mla_dims=[72, 64], mla_seqlens=[40, 70])
    else:
        defaults = dict(seqlens=[4096 * 2 ** i for i in range(6)], batch=4, heads=32, kv_heads=8, head_dim=128,
                        page_size=64, dtype="bf16", mla_heads=128, mla_dims=[576, 512],
                        mla_seqlens=[32768 * 2 ** i for i in range(6)])
    return {key: getattr(args, key) if getattr(args, key) is not None else value for key, value in defaults.items()}


def latency_row(s, seqlen, device):
    dtype = C.DTYPES[s["dtype"]]
    batch, heads, kv_heads, head_dim = s["batch"], s["heads"], s["kv_heads"], s["head_dim"]
    gen = torch.Generator(device=device).manual_seed(seqlen)

    def rand(*shape):
        return torch.randn(shape, generator=gen, device=device, dtype=dtype)

    k_full, v_full = rand(batch, seqlen + 1, kv_heads, head_dim), rand(batch, seqlen + 1, kv_heads, head_dim)
    q = rand(batch, 1, heads, head_dim)
    # Room for the graph's replays (each adds one token) beyond the timed eager step.
    cache = cpattn.ShardedKVCache(batch, seqlen + 2 + GRAPH_REPLAYS, kv_heads, head_dim, dtype=dtype, device=device,
                                  page_size=s["page_size"])
    cache.append(k_full[:, :seqlen], v_full[:, :seqlen])
    new_k, new_v = k_full[:, seqlen:], v_full[:, seqlen:]

    def step():
        out = cpattn.decode(cache, q, new_k, new_v)
        cache.rewind(1)  # write the same slot again next call
        return out

    out_step = step()
    lens = torch.full((batch,), seqlen + 1, dtype=torch.int32, device=device)

    def kernel():
        return decode_attention(q, cache.k, cache.v, lens, block_table=cache.block_table, max_seqlen=seqlen + 1,
                                validate=False)[0]

    # SDPA over the same keys and values, contiguous in its own layout; one query sees every key.
    q_s, k_s, v_s = q.transpose(1, 2), k_full.transpose(1, 2).contiguous(), v_full.transpose(1, 2).contiguous()

    def sdpa():
        return F.scaled_dot_product_attention(q_s, k_s, v_s, enable_gqa=heads != kv_heads)

    out_sdpa = sdpa().transpose(1, 2)
    diff = max((kernel().float() - out_sdpa.float()).abs().max().item(),
               (out_step.float() - out_sdpa.float()).abs().max().item())
    row = {"seqlen": seqlen, "batch": batch, "heads": heads, "kv_heads": kv_heads, "head_dim": head_dim,
           "dtype": s["dtype"], "page_size": s["page_size"],
           "kernel_us": 1e3 * C.time_ms(kernel, device), "step_us": 1e3 * C.time_ms(step, device),
           "sdpa_us": 1e3 * C.time_ms(sdpa, device), "max_abs_diff_vs_sdpa": diff}
    row["x_sdpa"] = row["sdpa_us"] / row["kernel_us"]
    row["kernel_graph_us"] = graph_time_us(kernel, device)
    # Bytes the attention must read (K and V of every sequence): what bounds a decode step.
    kv_bytes = 2 * batch * (seqlen + 1) * kv_heads * head_dim * torch.finfo(dtype).bits // 8
    row["kernel_GBps"] = kv_bytes / (row["kernel_us"] * 1e-6) / 1e9
    row["kernel_graph_GBps"] = row["kernel_graph_us"] and kv_bytes / (row["kernel_graph_us"] * 1e-6) / 1e9
    row["graph_us"], row["graph_max_abs_diff_vs_step"] = graph_replay(cache, q, new_k, new_v, out_step, device)
    return row


GRAPH_REPLAYS = 50


def graph_time_us(fn, device):
    """CUDA: microseconds per replay of ``fn`` captured in a CUDA graph (the GPU's time without the
    host's launch work), over GRAPH_REPLAYS replays; None on CPU."""
    if device.type != "cuda":
        return None
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):  # warm-up outside the graph: autotuning, allocator
        fn()
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        fn()
    graph.replay()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(GRAPH_REPLAYS):
        graph.replay()
    end.record()
    end.synchronize()
    return 1e3 * start.elapsed_time(end) / GRAPH_REPLAYS


def graph_replay(cache, q, new_k, new_v, out_step, device):
    """CUDA: ``decode_step`` captured in a CUDA graph, then replayed: (microseconds per replay, the first
    replay's largest difference to the eager ``decode`` of the same token). (None, None) on CPU.
    Each replay appends one more token, so the cache grows by GRAPH_REPLAYS while timed."""
    if device.type != "cuda":
        return None, None
    cache.reserve(GRAPH_REPLAYS + 1)
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):  # warm-up outside the graph: autotuning, allocator
        cpattn.decode_step(cache, q, new_k, new_v)
    torch.cuda.current_stream().wait_stream(stream)
    cache.rewind(1)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = cpattn.decode_step(cache, q, new_k, new_v)  # recorded, not run
    graph.replay()
    diff = (out.float() - out_step.float()).abs().max().item()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(GRAPH_REPLAYS - 1):
        graph.replay()
    end.record()
    end.synchronize()
    return 1e3 * start.elapsed_time(end) / (GRAPH_REPLAYS - 1), diff


def memory_rows(s, ranks):
    """K+V bytes per rank (whole pages, page-interleaved) and per-step merge bytes, by calculation."""
    elem = torch.finfo(C.DTYPES[s["dtype"]]).bits // 8
    page, batch, kv_heads, head_dim, heads = s["page_size"], s["batch"], s["kv_heads"], s["head_dim"], s["heads"]
    rows = []
    for seqlen in s["seqlens"]:
        for p in ranks:
            pages = math.ceil(seqlen / (page * p))  # the most pages any rank holds for one sequence
            kv = 2 * batch * pages * page * kv_heads * head_dim * elem
            partial = batch * heads * (head_dim + 1) * 4  # one rank's fp32 out + lse for one new token
            rows.append({"seqlen": seqlen, "ranks": p, "batch": batch, "kv_bytes_per_rank": kv,
                         "kv_GiB_per_rank": kv / 2 ** 30,
                         "merge_bytes_per_step": decode_merge_bytes(p, batch * heads, head_dim),
                         "allgather_bytes_per_step": (p - 1) * partial})
    return rows


def mla_latency_row(s, seqlen, device):
    """One decode step over a latent cache of ``seqlen`` tokens per sequence, next to the kernel over the same
    vectors as separate keys and values (group size 1)."""
    dtype = C.DTYPES[s["dtype"]]
    (latent_dim, value_dim), batch, heads = s["mla_dims"], s["batch"], s["mla_heads"]
    gen = torch.Generator(device=device).manual_seed(seqlen)
    vectors = torch.randn((batch, seqlen + 1, 1, latent_dim), generator=gen, device=device, dtype=dtype)
    q = torch.randn((batch, 1, heads, latent_dim), generator=gen, device=device, dtype=dtype)
    cache = cpattn.ShardedKVCache(batch, seqlen + 1, 1, latent_dim, dtype=dtype, device=device,
                                  page_size=s["page_size"], v_head_dim=value_dim, latent=True)
    cache.append(vectors[:, :seqlen], None)
    lens = torch.full((batch,), seqlen, dtype=torch.int32, device=device)
    separate_v = vectors[:, :seqlen, :, :value_dim].contiguous()  # a second copy: the GQA layout's values

    def latent_kernel():
        return decode_attention(q, cache.k, cache.v, lens, block_table=cache.block_table, max_seqlen=seqlen,
                                validate=False)[0]

    def separate_kernel():
        return decode_attention(q, vectors[:, :seqlen], separate_v, lens, validate=False)[0]

    def step():
        out = cpattn.decode(cache, q, vectors[:, seqlen:], None)
        cache.rewind(1)
        return out

    out_latent = latent_kernel()
    diff = max((out_latent.float() - separate_kernel().float()).abs().max().item(),
               (step().float() - decode_attention(q, vectors, vectors[..., :value_dim],
                                                  lens + 1, validate=False)[0].float()).abs().max().item())
    row = {"seqlen": seqlen, "batch": batch, "heads": heads, "latent_dim": latent_dim, "value_dim": value_dim,
           "dtype": s["dtype"], "one_buffer": is_leading_columns(cache.v, cache.k),
           "latent_kernel_us": 1e3 * C.time_ms(latent_kernel, device),
           "separate_kernel_us": 1e3 * C.time_ms(separate_kernel, device),
           "latent_step_us": 1e3 * C.time_ms(step, device), "max_abs_diff_latent_vs_separate": diff}
    cache_bytes = batch * seqlen * ValueLayout(latent_dim, value_dim, True).bytes_per_token(1, q.element_size())
    row["latent_kernel_GBps"] = cache_bytes / (row["latent_kernel_us"] * 1e-6) / 1e9
    return row


# DeepSeek V3's non-absorbed head dims: the expanded cache a multi-head layout of the same model would hold.
MLA_QK_HEAD_DIM, MLA_V_HEAD_DIM = 192, 128


def mla_bytes_rows(s, ranks):
    """Bytes of cache one rank reads per decoded token of one sequence (its slots under the page-interleaved
    layout, rank 0 holding the most), by layout; and the decode merge bytes per rank and step."""
    elem = torch.finfo(C.DTYPES[s["dtype"]]).bits // 8
    (latent_dim, value_dim), heads, page = s["mla_dims"], s["mla_heads"], s["page_size"]
    layouts = {"latent": (ValueLayout(latent_dim, value_dim, True), 1),
               "gqa": (ValueLayout(latent_dim, value_dim, False), 1),
               "expanded_mha": (ValueLayout(MLA_QK_HEAD_DIM, MLA_V_HEAD_DIM, False), heads)}
    rows = []
    for seqlen in s["seqlens"]:
        for p in ranks:
            slots = int(StripeLayout(page, p).local_lengths(torch.tensor([seqlen]), 0)[0])
            row = {"seqlen": seqlen, "ranks": p, "slots_per_rank": slots}
            for name, (layout, kv_heads) in layouts.items():
                row[f"{name}_bytes_per_token_per_rank"] = slots * layout.bytes_per_token(kv_heads, elem)
            row["gqa_over_latent"] = row["gqa_bytes_per_token_per_rank"] / row["latent_bytes_per_token_per_rank"]
            row["merge_bytes_per_step"] = decode_merge_bytes(p, s["batch"] * heads, value_dim)
            rows.append(row)
    return rows


def latent_kernel_us(s, num_tokens, device):
    """Microseconds of the latent decode kernel over ``num_tokens`` cached tokens per sequence (one device)."""
    dtype = C.DTYPES[s["dtype"]]
    (latent_dim, value_dim), batch = s["mla_dims"], s["batch"]
    gen = torch.Generator(device=device).manual_seed(num_tokens)
    q = torch.randn((batch, 1, s["mla_heads"], latent_dim), generator=gen, device=device, dtype=dtype)
    cache = cpattn.ShardedKVCache(batch, num_tokens, 1, latent_dim, dtype=dtype, device=device,
                                  page_size=s["page_size"], v_head_dim=value_dim, latent=True)
    cache.append(torch.randn((batch, num_tokens, 1, latent_dim), generator=gen, device=device, dtype=dtype), None)
    lens = torch.full((batch,), num_tokens, dtype=torch.int32, device=device)
    return 1e3 * C.time_ms(lambda: decode_attention(q, cache.k, cache.v, lens, block_table=cache.block_table,
                                                    max_seqlen=num_tokens, validate=False), device)


def mla_modelled_rows(s, ranks, device):
    """A decode step over P ranks modelled from one device: the kernel over what one rank holds."""
    timed, rows = {}, []
    for seqlen in s["mla_seqlens"]:
        for p in ranks:
            slots = int(StripeLayout(s["page_size"], p).local_lengths(torch.tensor([seqlen]), 0)[0])
            if slots not in timed:
                timed[slots] = latent_kernel_us(s, slots, device)
            rows.append({"seqlen": seqlen, "ranks": p, "slots_per_rank": slots, "kernel_us": timed[slots],
                         "merge_bytes_per_step": decode_merge_bytes(p, s["batch"] * s["mla_heads"],
                                                                    s["mla_dims"][1]),
                         "modelled": "one device: the kernel over rank 0's slots; merge time not included"})
    return rows


def main():
    args = parse_args()
    device = C.pick_device(args.quick)
    s = settings(args)
    env = C.environment(device, args.quick)
    rows = []
    for i, seqlen in enumerate(s["seqlens"], 1):
        C.progress(i, len(s["seqlens"]), f"decode: cache {seqlen} tokens")
        rows.append(latency_row(s, seqlen, device))
    mem = memory_rows(s, args.ranks)
    mla = [mla_latency_row(s, seqlen, device) for seqlen in s["seqlens"]]
    mla_bytes = mla_bytes_rows(s, args.ranks)
    mla_modelled = mla_modelled_rows(s, args.ranks, device)
    out_dir = C.output_dir(args, device)
    paths = C.save_results(out_dir, "decode", env, rows, extra={"settings": s})
    paths += C.save_results(out_dir, "decode_memory", env, mem, extra={"settings": s})
    paths += C.save_results(out_dir, "decode_mla", env, mla, extra={"settings": s})
    paths += C.save_results(out_dir, "decode_mla_bytes", env, mla_bytes, extra={"settings": s})
    paths += C.save_results(out_dir, "decode_mla_modelled", env, mla_modelled, extra={"settings": s})
    C.print_table(rows, [("seqlen", "cache"), ("kernel_us", "kernel us"), ("kernel_graph_us", "kernel graph us"),
                         ("step_us", "step us"),
                         ("graph_us", "graph us"), ("sdpa_us", "sdpa us"), ("x_sdpa", "x_sdpa"), ("kernel_GBps", "GB/s"),
                         ("max_abs_diff_vs_sdpa", "max diff")],
                  title=f"decode latency, group size 1, {env['device']}" + (" [--quick: NOT timing]" if args.quick else ""))
    C.print_table(mem, [("seqlen", "cache"), ("ranks", "P"), ("kv_GiB_per_rank", "KV GiB/rank"),
                        ("merge_bytes_per_step", "merge B/step"), ("allgather_bytes_per_step", "all-gather B/step")],
                  title="KV cache and decode merge traffic per rank (calculated)")
    C.print_table(mla, [("seqlen", "cache"), ("latent_kernel_us", "latent us"), ("separate_kernel_us", "k+v us"),
                        ("latent_step_us", "step us"), ("latent_kernel_GBps", "GB/s"),
                        ("max_abs_diff_latent_vs_separate", "max diff")],
                  title=f"MLA decode, latent cache {s['mla_dims'][0]}/{s['mla_dims'][1]}, {s['mla_heads']} heads, "
                        f"group size 1" + (" [--quick: NOT timing]" if args.quick else ""))
    C.print_table(mla_bytes, [("seqlen", "cache"), ("ranks", "P"), ("latent_bytes_per_token_per_rank", "latent B"),
                              ("gqa_bytes_per_token_per_rank", "GQA B"), ("gqa_over_latent", "GQA/latent"),
                              ("expanded_mha_bytes_per_token_per_rank", "expanded MHA B"),
                              ("merge_bytes_per_step", "merge B/step")],
                  title="MLA: cache bytes read per decoded token per rank, and merge bytes per step (calculated)")
    C.print_table(mla_modelled, [("seqlen", "context"), ("ranks", "P"), ("slots_per_rank", "slots/rank"),
                                 ("kernel_us", "kernel us"), ("merge_bytes_per_step", "merge B/step")],
                  title="MLA decode step over P ranks, MODELLED from one device (kernel over one rank's slots; "
                        "merge not timed)" + (" [--quick: NOT timing]" if args.quick else ""))
    C.print_saved(paths, args.quick)


if __name__ == "__main__":
    main()
