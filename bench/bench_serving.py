"""Serving latency of a small decoder with context-parallel prefill and decode, and the prefix-hit crossover.

    python bench/bench_serving.py                 # GPU(s): prompts 1k..128k, CP sizes 1, 2, 4 (as GPUs allow)
    python bench/bench_serving.py --quick         # CPU smoke run (interpreter, gloo): no timing claims

Serving (one request of ``--batch`` sequences at a time): the model (cpattn.tiny_decoder,
shape from --dim/--heads/--kv-heads/--head-dim/--layers) prefills a prompt of L tokens
in chunks of --chunk over a ShardedKVCache per layer sharded over P ranks (each rank
holds a contiguous piece of every chunk), then decodes --new-tokens greedy tokens with
cpattn.decode. Reported, measured on rank 0 after synchronising the device:
  ttft_ms    time to first token: the whole prefill and the first token's logits
  itl_ms     inter-token latency: each decode step, mean and p99
  e2e_ms     ttft + every decode step;  tok_per_s = new tokens / e2e
Next to it, single-device torch SDPA serving the same model with a plain
preallocated KV cache (prefill: causal SDPA over the chunk and everything before it;
decode: SDPA of the new token over the cache). ``same_tokens``: the greedy tokens
equal SDPA's.

Prefix hit (P ranks): sequences with C cached tokens get N new ones, prefilled once with
strategy "pass-q" and once with "pass-kv"; the time of each, the bytes per rank each moves
(cpattn.inference.prefill_bytes) and what "auto" picks, for N / (N + C) from small to 1.

--generate: the same table for Hugging Face generate() (a transformers Llama of the same
shape, random weights) over a cpattn.integrations.transformers.ShardedCache on P ranks
next to single-device generate() ("sdpa", DynamicCache). The --batch prompts have mixed
lengths (L, 3L/4 + 1, L/2 + 3, ... left padded, so one ragged prefill serves them all);
TTFT and each step are read by a logits processor (generate() calls it once a step).
Also: ``ttft_alone_ms``, the TTFT of prefilling the same prompts one generate() call
each (summed), against ``ttft_ms`` of the batch prefilled together; and the bytes each
rank receives per prefill and per decode step (calculated: prefill_bytes with "auto"'s
choice plus the all-gather of the outputs, decode_merge_bytes; the agreements' few ints
left out), summed over the layers.

P > 1 runs P processes (cpattn.testing.run_ranks): NCCL with one GPU each when there are
P GPUs, gloo on CPU with --quick; a CP size with too few GPUs is skipped and reported.
"""
import statistics
import time

import torch
import torch.nn.functional as F

import _common as C
import cpattn
from cpattn.inference import choose_prefill_strategy, decode_merge_bytes, prefill_bytes
from cpattn.testing import run_ranks
from cpattn.examples.tiny_decoder import TinyConfig, TinyDecoder


def parse_args(argv=None):
    parser = C.base_parser(__doc__)
    parser.add_argument("--prompts", type=C.int_list, default=None, help="prompt lengths (default 1024..131072)")
    parser.add_argument("--cp-sizes", type=C.int_list, default=None, help="group sizes (default 1,2,4)")
    parser.add_argument("--new-tokens", type=int, default=None, help="tokens generated per request (default 32)")
    parser.add_argument("--batch", type=int, default=1, help="sequences per request")
    parser.add_argument("--chunk", type=int, default=None, help="prefill chunk length (default 8192)")
    parser.add_argument("--page-size", type=int, default=None, help="KV cache page size (default 64)")
    parser.add_argument("--dim", type=int, default=None, help="model width (default 2048)")
    parser.add_argument("--heads", type=int, default=None, help="query heads (default 32)")
    parser.add_argument("--kv-heads", type=int, default=None, help="kv heads (default 8)")
    parser.add_argument("--head-dim", type=int, default=None, help="head dim (default 64)")
    parser.add_argument("--layers", type=int, default=None, help="layers (default 4)")
    parser.add_argument("--dtype", choices=sorted(C.DTYPES), default=None, help="default bf16 (fp32 with --quick)")
    parser.add_argument("--prefix-cached", type=int, default=None, help="cached tokens in the prefix-hit table")
    parser.add_argument("--generate", action="store_true",
                        help="Hugging Face generate() over a ShardedCache (needs transformers) instead of the tiny "
                             "decoder and the prefix-hit table")
    return parser.parse_args(argv)


def settings(args):
    if args.quick:
        defaults = dict(prompts=[32, 64], cp_sizes=[1, 2], new_tokens=4, chunk=32, page_size=16, dim=64, heads=4,
                        kv_heads=2, head_dim=16, layers=2, dtype="fp32", prefix_cached=64)
    else:
        defaults = dict(prompts=[1024 * 2 ** i for i in range(8)], cp_sizes=[1, 2, 4], new_tokens=32, chunk=8192,
                        page_size=64, dim=2048, heads=32, kv_heads=8, head_dim=64, layers=4, dtype="bf16",
                        prefix_cached=16384)
    s = {key: getattr(args, key) if getattr(args, key, None) is not None else value for key, value in defaults.items()}
    s["batch"] = args.batch
    return s


def model_of(s, device):
    config = TinyConfig(vocab=1024, dim=s["dim"], heads=s["heads"], kv_heads=s["kv_heads"], head_dim=s["head_dim"],
                        layers=s["layers"])
    return TinyDecoder(config, device=device, dtype=C.DTYPES[s["dtype"]])


def prompt_tokens(s, length, device):
    return torch.randint(0, 1024, (s["batch"], length), generator=torch.Generator().manual_seed(length)).to(device)


class Clock:
    """Wall time in ms, synchronising the device (and the ranks, when there are several) first."""

    def __init__(self, device, world):
        self.device, self.world = device, world

    def now(self):
        C.synchronize(self.device)
        if self.world > 1:
            torch.distributed.barrier()
        return time.perf_counter() * 1e3


def latency_row(ttft, steps, tokens, label, length, s):
    e2e = ttft + sum(steps)
    ordered = sorted(steps)
    p99 = ordered[min(len(ordered) - 1, int(0.99 * len(ordered)))]
    return {"prompt": length, "cp": label, "batch": s["batch"], "ttft_ms": ttft,
            "itl_mean_ms": statistics.mean(steps), "itl_p99_ms": p99,
            "e2e_ms": e2e, "tok_per_s": s["batch"] * (len(steps) + 1) / (e2e / 1e3), "tokens": tokens}


def decode_loop(model, token, new_tokens, clock, forward_one):
    """Greedy decoding after the first token: (tokens per sequence, ms of each step).
    ``forward_one(token)``: the hidden states of one new token per sequence (it stores its keys)."""
    tokens, steps = [token], []
    for _ in range(new_tokens - 1):
        start = clock.now()
        token = model.logits(forward_one(token)[:, 0]).argmax(-1)
        steps.append(clock.now() - start)
        tokens.append(token)
    return torch.stack(tokens, 1).tolist(), steps


def serve_cp(rank, world, s, device_type):
    """One rank of CP serving: rows measured on rank 0 (None elsewhere)."""
    device = torch.device(device_type, rank % max(1, torch.cuda.device_count())) if device_type == "cuda" \
        else torch.device("cpu")
    model = model_of(s, device)
    c = model.config
    clock = Clock(device, world)
    rows = []
    for length in s["prompts"]:
        caches = [cpattn.ShardedKVCache(s["batch"], length + s["new_tokens"], c.kv_heads, c.head_dim,
                                        dtype=C.DTYPES[s["dtype"]], device=device, page_size=s["page_size"],
                                        group=None) for _ in range(c.layers)]
        prompt = prompt_tokens(s, length, device)
        start = clock.now()
        for first in range(0, length, s["chunk"]):
            n = min(s["chunk"], length - first)
            x, index = cpattn.split_chunk(model.embed(prompt[:, first:first + n]), caches[0])
            pos = caches[0].positions(n, index).to(device)
            x = model.forward(x, pos, lambda i, q, k, v: cpattn.prefill(caches[i], q, k, v, token_index=index))
        last = x[:, -1].contiguous()
        if world > 1:  # the prompt's last token is on the last rank: hand its hidden state to everyone
            torch.distributed.broadcast(last, src=world - 1)
        token = model.logits(last).argmax(-1)
        ttft = clock.now() - start

        def forward_one(token):
            return model.forward(model.embed(token)[:, None], caches[0].seqlens[:, None].to(device),
                                 lambda i, q, k, v: cpattn.decode(caches[i], q, k, v))

        tokens, steps = decode_loop(model, token, s["new_tokens"], clock, forward_one)
        rows.append(latency_row(ttft, steps, tokens, f"cp{world}", length, s))
    return rows if rank == 0 else None


def serve_sdpa(s, device):
    """Single-device torch SDPA with a preallocated contiguous KV cache per layer."""
    model = model_of(s, device)
    c = model.config
    clock = Clock(device, 1)
    rows = []
    for length in s["prompts"]:
        total = length + s["new_tokens"]
        shape = (s["batch"], c.kv_heads, total, c.head_dim)
        cache = [(torch.zeros(shape, dtype=C.DTYPES[s["dtype"]], device=device),
                  torch.zeros(shape, dtype=C.DTYPES[s["dtype"]], device=device)) for _ in range(c.layers)]
        filled = [0]

        def attend(i, q, k, v):
            kc, vc = cache[i]
            n, end = q.shape[1], filled[0] + q.shape[1]
            kc[:, :, filled[0]:end], vc[:, :, filled[0]:end] = k.transpose(1, 2), v.transpose(1, 2)
            # Query t at position filled + t sees keys <= filled + t: a bottom-right causal mask.
            mask = torch.ones(n, end, dtype=torch.bool, device=device).tril(end - n)
            return F.scaled_dot_product_attention(q.transpose(1, 2), kc[:, :, :end], vc[:, :, :end],
                                                  attn_mask=None if n == 1 else mask,
                                                  enable_gqa=True).transpose(1, 2)

        prompt = prompt_tokens(s, length, device)
        start = clock.now()
        for first in range(0, length, s["chunk"]):
            n = min(s["chunk"], length - first)
            pos = torch.arange(first, first + n, device=device)[None].expand(s["batch"], -1)
            x = model.forward(model.embed(prompt[:, first:first + n]), pos, attend)
            filled[0] += n
        token = model.logits(x[:, -1]).argmax(-1)
        ttft = clock.now() - start

        def forward_one(token):
            x = model.forward(model.embed(token)[:, None], torch.full((s["batch"], 1), filled[0], device=device),
                              attend)
            filled[0] += 1
            return x

        tokens, steps = decode_loop(model, token, s["new_tokens"], clock, forward_one)
        rows.append(latency_row(ttft, steps, tokens, "sdpa", length, s))
    return rows


def prefix_hit(rank, world, s, device_type):
    """Time pass-Q and pass-KV prefill of N new tokens after C cached ones (one layer's attention)."""
    device = torch.device(device_type, rank % max(1, torch.cuda.device_count())) if device_type == "cuda" \
        else torch.device("cpu")
    dtype, c = C.DTYPES[s["dtype"]], s
    cached, clock = s["prefix_cached"], Clock(device, world)
    gen = torch.Generator(device=device).manual_seed(0)
    rows = []
    for new in sorted({max(world, cached // 2 ** i // world * world) for i in (6, 4, 2, 0)} | {4 * cached}):
        total = cached + new
        k_all, v_all = (torch.randn(s["batch"], total, c["kv_heads"], c["head_dim"], generator=gen, device=device,
                                    dtype=dtype) for _ in range(2))
        q_new = torch.randn(s["batch"], new, c["heads"], c["head_dim"], generator=gen, device=device, dtype=dtype)
        row = {"cached": cached, "new": new, "new_share": new / total}
        for strategy in ("pass-q", "pass-kv"):
            cache = cpattn.ShardedKVCache(s["batch"], total, c["kv_heads"], c["head_dim"], dtype=dtype, device=device,
                                          page_size=s["page_size"])
            cache.append(k_all[:, :cached], v_all[:, :cached])
            (q, index), (k, _), (v, _) = (cpattn.split_chunk(t, cache) for t in (q_new, k_all[:, cached:],
                                                                                   v_all[:, cached:]))
            t0 = clock.now()
            cpattn.prefill(cache, q, k, v, token_index=index, strategy=strategy)
            row[f"{strategy}_ms"] = clock.now() - t0
            row[f"{strategy}_bytes"] = prefill_bytes(strategy, world, s["batch"] * new, s["batch"] * cached,
                                                     c["heads"], c["kv_heads"], c["head_dim"], dtype.itemsize)
        row["auto"] = choose_prefill_strategy(world, s["batch"] * new, s["batch"] * cached, c["heads"],
                                              c["kv_heads"], c["head_dim"], dtype.itemsize)
        row["faster"] = min(("pass-q", "pass-kv"), key=lambda name: row[f"{name}_ms"])
        rows.append(row)
    return rows if rank == 0 else None


# ---- Hugging Face generate() over a ShardedCache (--generate) -------------------------------------------------
def mixed_lengths(length, batch):
    """The prompt lengths of a request: L, 3L/4 + 1, L/2 + 3, L/4 + 5, L, ... (odd offsets: uneven splits)."""
    return [max(1, length * (4 - i % 4) // 4 + 2 * (i % 4) - (i % 4 > 0)) for i in range(batch)]


def hf_inputs(lengths, device):
    """Left-padded (input_ids, attention_mask) of prompts of ``lengths`` tokens (pad token 0)."""
    width = max(lengths)
    ids = torch.zeros(len(lengths), width, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for row, n in enumerate(lengths):
        ids[row, width - n:] = torch.randint(1, 1024, (n,), generator=torch.Generator().manual_seed(n + row))
        mask[row, width - n:] = 1
    return ids.to(device), mask.to(device)


def hf_model(s, attn_implementation, device):
    """A transformers Llama of the benchmark's shape; the same random weights in every process."""
    from transformers import LlamaConfig
    from cpattn.examples.train_transformers import build_model

    config = LlamaConfig(vocab_size=1024, hidden_size=s["dim"], intermediate_size=2 * s["dim"],
                         num_hidden_layers=s["layers"], num_attention_heads=s["heads"],
                         num_key_value_heads=s["kv_heads"], head_dim=s["head_dim"],
                         max_position_embeddings=max(s["prompts"]) + s["new_tokens"])
    torch.manual_seed(0)
    model = build_model(config, attn_implementation)
    model.generation_config.eos_token_id = None  # every request generates --new-tokens tokens
    return model.to(device=device, dtype=C.DTYPES[s["dtype"]]).eval()


def timed_generate(model, ids, mask, new_tokens, clock, cache=None):
    """(ttft ms, [ms of each later step], tokens) of one greedy generate() call."""
    from transformers import LogitsProcessor, LogitsProcessorList

    class StepMarks(LogitsProcessor):  # called once per step, after the step's forward
        def __init__(self):
            self.marks = []

        def __call__(self, input_ids, scores):
            self.marks.append(clock.now())
            return scores

    marks = StepMarks()
    start = clock.now()
    with torch.no_grad():
        out = model.generate(ids, attention_mask=mask, max_new_tokens=new_tokens, do_sample=False, pad_token_id=0,
                             logits_processor=LogitsProcessorList([marks]), **({} if cache is None else
                                                                               {"cache": cache}))
    times = [start] + marks.marks
    steps = [b - a for a, b in zip(times[1:], times[2:])]
    return times[1] - start, steps or [0.0], out[:, ids.shape[1]:].tolist()


def generate_bytes(world, s, lengths):
    """(bytes per rank per prefill, per decode step), calculated, summed over the layers."""
    heads, kv_heads, head_dim, elem = s["heads"], s["kv_heads"], s["head_dim"], C.DTYPES[s["dtype"]].itemsize
    n = sum(lengths)
    strategy = choose_prefill_strategy(world, n, 0, heads, kv_heads, head_dim, elem)
    gathered = (world - 1) / world * n * heads * head_dim * elem  # every rank gets every token's output
    prefill = prefill_bytes(strategy, world, n, 0, heads, kv_heads, head_dim, elem) + gathered
    return s["layers"] * prefill, s["layers"] * decode_merge_bytes(world, len(lengths) * heads, head_dim)


def serve_generate(rank, world, s, device_type):
    """One rank of generate() over a ShardedCache (world >= 1; world 0: single-device "sdpa")."""
    import cpattn.integrations.transformers as cpattn_hf

    device = torch.device(device_type, rank % max(1, torch.cuda.device_count())) if device_type == "cuda" \
        else torch.device("cpu")
    model = hf_model(s, "sdpa" if world == 0 else "cpattn_cp", device)
    clock = Clock(device, max(world, 1))
    rows = []
    for length in s["prompts"]:
        lengths = mixed_lengths(length, s["batch"])

        def cache(batch):
            if world == 0:
                return None
            return cpattn_hf.ShardedCache(model.config, batch, max(lengths) + s["new_tokens"], device=device,
                                          page_size=s["page_size"])
        def run(ids, mask, new_tokens):
            sharded = cache(len(ids))
            result = timed_generate(model, ids, mask, new_tokens, clock, sharded)
            if sharded is not None:
                sharded.close()
            return result
        ids, mask = hf_inputs(lengths, device)
        ttft, steps, tokens = run(ids, mask, s["new_tokens"])
        row = latency_row(ttft, steps, tokens, "hf-sdpa" if world == 0 else f"cp{world}", length, s)
        # The same prompts prefilled one generate() call each (the first token only).
        width = ids.shape[1]
        row["ttft_alone_ms"] = sum(run(ids[b:b + 1, width - n:], mask[b:b + 1, width - n:], 1)[0]
                                   for b, n in enumerate(lengths))
        row["lengths"] = lengths
        row["prefill_bytes"], row["decode_step_bytes"] = generate_bytes(max(world, 1), s, lengths)
        rows.append(row)
    return rows if rank == 0 else None


def main_generate(args, s, device):
    """--generate: the generate() table."""
    env = C.environment(device, args.quick)
    skipped = []
    rows = rows_over_cp_sizes(serve_generate(0, 0, s, device.type), serve_generate, s, device, skipped,
                              "generate()", "hf-sdpa")
    paths = C.save_results(C.output_dir(args, device), "serving_generate", env,
                           [{k: v for k, v in r.items() if k != "tokens"} for r in rows],
                           extra={"settings": s, "skipped": skipped})
    title = f"generate() over a ShardedCache, {env['device']}" + (" [--quick: NOT timing]" if args.quick else "")
    C.print_table(rows, [("prompt", "prompt"), ("cp", "P"), ("ttft_ms", "TTFT ms"), ("ttft_alone_ms", "TTFT 1-by-1"),
                         ("itl_mean_ms", "ITL ms"), ("itl_p99_ms", "ITL p99"), ("e2e_ms", "e2e ms"),
                         ("tok_per_s", "tok/s"), ("prefill_bytes", "prefill B/rank"),
                         ("decode_step_bytes", "step B/rank"), ("same_tokens", "= sdpa")], title=title)
    for line in skipped:
        print("skipped", line)
    C.print_saved(paths, args.quick)


def rows_over_cp_sizes(rows, fn, s, device, skipped, what, reference):
    """``rows`` (the single-device reference's) and rank 0's rows of ``fn`` at every CP size, each marked
    with whether its greedy tokens equal those of the rows whose "cp" is ``reference``."""
    for i, world in enumerate(s["cp_sizes"], 1):
        C.progress(i, len(s["cp_sizes"]), f"{what}: CP size {world}")
        rows += run_group(fn, world, s, device, skipped) or []
    tokens = {r["prompt"]: r["tokens"] for r in rows if r["cp"] == reference}
    for r in rows:
        r["same_tokens"] = r["tokens"] == tokens[r["prompt"]]
    return rows


def run_group(fn, world, s, device, skipped):
    """rank 0's rows of ``fn`` on ``world`` ranks, or None (recorded in ``skipped``) without enough GPUs."""
    if world == 1:
        return fn(0, 1, s, device.type)
    if device.type == "cuda" and torch.cuda.device_count() < world:
        skipped.append(f"cp{world}: needs {world} GPUs, found {torch.cuda.device_count()}")
        return None
    return run_ranks(fn, world, s, device.type, timeout=3600, backend="nccl" if device.type == "cuda" else "gloo")[0]


def main(argv=None):
    args = parse_args(argv)
    device = C.pick_device(args.quick)
    s = settings(args)
    if args.generate:  # any prompt length: prefill splits any chunk
        return main_generate(args, s, device)
    lcm = max(s["cp_sizes"])
    if any(n % lcm for n in s["prompts"] + [s["chunk"], s["prefix_cached"]]) or any(lcm % w for w in s["cp_sizes"]):
        raise SystemExit(f"prompts, --chunk and --prefix-cached must be multiples of every CP size {s['cp_sizes']}")
    env = C.environment(device, args.quick)
    skipped = []
    rows = rows_over_cp_sizes(serve_sdpa(s, device), serve_cp, s, device, skipped, "serving", "sdpa")
    prefix_world = max([w for w in s["cp_sizes"] if w > 1 and not any(x.startswith(f"cp{w}:") for x in skipped)],
                       default=1)
    prefix = run_group(prefix_hit, prefix_world, s, device, []) if prefix_world > 1 else []
    out_dir = C.output_dir(args, device)
    extra = {"settings": s, "skipped": skipped}
    paths = C.save_results(out_dir, "serving", env, [{k: v for k, v in r.items() if k != "tokens"} for r in rows],
                           extra=extra)
    paths += C.save_results(out_dir, "serving_prefix", env, prefix, extra={"settings": s, "ranks": prefix_world})
    wide = []
    for metric in ("ttft_ms", "itl_mean_ms", "itl_p99_ms"):
        for length in s["prompts"]:
            wide.append({"metric": metric, "prompt": length,
                         **{r["cp"]: r[metric] for r in rows if r["prompt"] == length}})
    labels = ["sdpa"] + [f"cp{w}" for w in s["cp_sizes"]]
    paths.append(C.plot_lines(out_dir / "serving.png", wide, "prompt", [(name, name) for name in labels],
                              lambda r: r["metric"], C.plot_title(env, "serving latency (ms)"), "ms", log_y=True))
    if prefix:
        panels = [{"panel": f"{unit} (new share of the context on x)", "new_share": r["new_share"],
                   **{name: r[f"{name}_{suffix}"] for name in ("pass-q", "pass-kv")}}
                  for r in prefix for unit, suffix in (("time ms", "ms"), ("bytes per rank", "bytes"))]
        paths.append(C.plot_lines(out_dir / "serving_prefix.png", panels, "new_share",
                                  [("pass-q", "pass-q"), ("pass-kv", "pass-kv")], lambda r: r["panel"],
                                  C.plot_title(env, f"prefix-hit prefill on {prefix_world} ranks"), "", log_y=True))
    title = f"serving, {env['device']}" + (" [--quick: NOT timing]" if args.quick else "")
    C.print_table(rows, [("prompt", "prompt"), ("cp", "P"), ("ttft_ms", "TTFT ms"), ("itl_mean_ms", "ITL ms"),
                         ("itl_p99_ms", "ITL p99"), ("e2e_ms", "e2e ms"), ("tok_per_s", "tok/s"),
                         ("same_tokens", "= sdpa")], title=title)
    for line in skipped:
        print("skipped", line)
    if prefix:
        C.print_table(prefix, [("cached", "cached"), ("new", "new"), ("new_share", "new share"),
                               ("pass-q_ms", "pass-Q ms"), ("pass-kv_ms", "pass-KV ms"),
                               ("pass-q_bytes", "pass-Q B/rank"), ("pass-kv_bytes", "pass-KV B/rank"),
                               ("auto", "auto"), ("faster", "faster")],
                      title=f"prefix-hit prefill on {prefix_world} ranks (bytes calculated)")
    C.print_saved(paths, args.quick)


if __name__ == "__main__":
    main()
