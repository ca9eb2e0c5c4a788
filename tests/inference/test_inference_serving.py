"""Serving on 1, 2 and 4 gloo ranks: prefix-hit prefill by both strategies, decode with a sliding
window, softcap and sinks (ranks outside the window launch nothing), the decode merge's bytes
against the benchmark's accounting, and decode_step under torch.compile(fullgraph=True)."""
import pytest
import torch
import torch.distributed._functional_collectives as funcol

import cpattn
import cpattn.inference as inference
from cpattn.testing import run_ranks
from reference import reference_attention
from test_inference import zigzag_index

B, H, HKV, D, CAP = 3, 4, 2, 32, 128  # GQA group 2
PREFIX = [40, 16, 72]                 # cached prompt lengths, uneven
NEW = 16                              # the prefix-hit chunk, for all three sequences at once
LOCAL = dict(window_size=(24, 0), softcap=20.0, sinks=torch.tensor([0.5, -1.0, 2.0, 0.0]))


def full_data(seed=0):
    gen = torch.Generator().manual_seed(seed)
    return tuple(torch.randn(B, CAP, h, D, generator=gen) * (3.0 if h == H else 1.0) for h in (H, HKV, HKV))


def expected(data, b, start, n, window_size=(-1, -1), softcap=0.0, sinks=None):
    """Full recomputation: tokens [start, start + n) of sequence b over keys [0, start + n), float64."""
    Q, K, V = data
    return reference_attention(Q[b:b + 1, start:start + n], K[b:b + 1, :start + n], V[b:b + 1, :start + n],
                               causal=True, q_start=start, window_size=window_size, softcap=softcap, sinks=sinks)[0]


def prefill_prefixes(cache, data, world, rank):
    Q, K, V = data
    for b, n in enumerate(PREFIX):
        idx = torch.arange(rank * (n // world), (rank + 1) * (n // world))
        cpattn.prefill(cache, Q[b:b + 1, idx], K[b:b + 1, idx], V[b:b + 1, idx], token_index=idx, batch_index=[b])


def prefix_hit_errors(world, rank):
    """A chunk after cached prefixes of different lengths, zigzag-split, by both strategies."""
    data = full_data()
    errors, outs = {}, {}
    idx = zigzag_index(NEW, world, rank)
    for strategy in ("pass-q", "pass-kv"):
        for name, opts in (("plain", {}), ("local", LOCAL)):
            cache = cpattn.ShardedKVCache(B, CAP, HKV, D, page_size=16)
            prefill_prefixes(cache, data, world, rank)
            q, k, v = (torch.stack([X[b, p + idx] for b, p in enumerate(PREFIX)]) for X in data)
            out = cpattn.prefill(cache, q, k, v, token_index=idx, strategy=strategy, **opts)
            errors[strategy, name] = max(float((out[b] - expected(data, b, p, NEW, **opts)[0, idx]).abs().max())
                                         for b, p in enumerate(PREFIX))
            outs[strategy, name] = out
    for name in ("plain", "local"):
        errors["strategies agree", name] = float((outs["pass-q", name] - outs["pass-kv", name]).abs().max())
    return errors


def holds_visible_key(cache, rank, start, n, window_left):
    """Brute force: does ``rank`` own a key that a query at [start, start + n) can see?"""
    for s in start.tolist():
        lo = max(0, s - window_left) if window_left >= 0 else 0
        if bool((cache.owner(torch.arange(lo, s + n)) == rank).any()):
            return True
    return False


def decode_case(world, rank):
    """Decode steps with local attention after the prefixes; kernel launches and merge bytes counted."""
    data = full_data()
    Q, K, V = data
    cache = cpattn.ShardedKVCache(B, CAP, HKV, D, page_size=16)
    prefill_prefixes(cache, data, world, rank)
    launches, sent = [], []
    # Count through the public names inference calls: its decode kernel and torch's functional collectives.
    attend, gather, scatter = inference.decode_attention, funcol.all_gather_single, funcol.all_to_all_single

    def counting_attend(*args, **kwargs):
        launches[-1] += 1
        return attend(*args, **kwargs)

    def counting_gather(x, *args, **kwargs):
        sent.append((world - 1) * x.numel() * x.element_size())  # this rank's piece to each other rank
        return gather(x, *args, **kwargs)

    def counting_all_to_all(x, *args, **kwargs):
        sent.append((world - 1) * x.numel() * x.element_size() // world)  # all but its own 1/P
        return scatter(x, *args, **kwargs)

    inference.decode_attention = counting_attend
    funcol.all_gather_single, funcol.all_to_all_single = counting_gather, counting_all_to_all
    results = []
    try:
        steps = [(1, dict(window_size=(8, 0), softcap=20.0)), (1, dict(window_size=(8, 0), sinks=LOCAL["sinks"])),
                 (2, dict(window_size=(20, 0))), (1, {})]
        for n, opts in steps:
            start = cache.seqlens
            q, k, v = (torch.stack([X[b, s:s + n] for b, s in enumerate(start.tolist())]) for X in data)
            launches.append(0)
            sent.clear()
            out = cpattn.decode(cache, q, k, v, **opts)
            err = max(float((out[b] - expected(data, b, int(s), n, **opts)[0]).abs().max())
                      for b, s in enumerate(start.tolist()))
            visible = holds_visible_key(cache, rank, start, n, opts.get("window_size", (-1, 0))[0])
            should_launch = visible or (opts.get("sinks") is not None and rank == 0)
            results.append({"err": err, "launched": launches[-1], "should_launch": should_launch, "out": out,
                            "bytes": sum(sent), "accounted": inference.decode_merge_bytes(world, B * n * H, D)})
    finally:
        inference.decode_attention = attend
        funcol.all_gather_single, funcol.all_to_all_single = gather, scatter
    return results


def compiled_step_case(world, rank):
    """decode_step compiled with fullgraph=True (functional collectives, custom ops, device-side
    cache updates) against eager decode_step, over several steps, without recompiling."""
    data = full_data(1)
    caches = []
    for _ in range(2):
        cache = cpattn.ShardedKVCache(B, CAP, HKV, D, page_size=16)
        prefill_prefixes(cache, data, world, rank)
        cache.reserve(3)
        caches.append(cache)
    compiled = torch.compile(cpattn.decode_step, fullgraph=True, backend="aot_eager")
    diffs, errors = [], []
    for step in range(3):
        start = caches[0].seqlens
        q, k, v = (torch.stack([X[b, s:s + 1] for b, s in enumerate(start.tolist())]) for X in data)
        eager = cpattn.decode_step(caches[0], q, k, v, **LOCAL)
        with torch.compiler.set_stance("fail_on_recompile" if step else "default"):
            got = compiled(caches[1], q, k, v, **LOCAL)
        diffs.append(float((got - eager).abs().max()))
        errors.append(max(float((got[b] - expected(data, b, int(s), 1, **LOCAL)[0]).abs().max())
                          for b, s in enumerate(start.tolist())))
    assert torch.equal(caches[0].seqlens, caches[1].seqlens)
    assert caches[1].seqlens.tolist() == [p + 3 for p in PREFIX]
    return diffs, errors


def serving_cases(rank, world, compile_step):
    results = {"prefix": prefix_hit_errors(world, rank), "decode": decode_case(world, rank)}
    if compile_step:
        results["compiled"] = compiled_step_case(world, rank)
    return results


def check(world, compile_step=False):
    per_rank = run_ranks(serving_cases, world, compile_step, timeout=240)
    for rank, results in enumerate(per_rank):
        for key, err in results["prefix"].items():
            assert err < 2e-5, (rank, key, err)
        for i, step in enumerate(results["decode"]):
            assert step["err"] < 2e-5, (rank, i, step["err"])
            # A rank launches its kernel exactly when its shard holds a key some new token sees.
            assert step["launched"] == int(step["should_launch"]), (rank, i, step)
            assert step["bytes"] == step["accounted"], (rank, i, step["bytes"], step["accounted"])
            assert torch.equal(step["out"], per_rank[0]["decode"][i]["out"])  # bitwise the same on every rank
        if compile_step:
            diffs, errors = results["compiled"]
            assert max(diffs) == 0.0 and max(errors) < 2e-5, (rank, diffs, errors)
    # The window really left a rank idle (stripes of 16, window 8: rank 3 holds none of 32-40, 8-16, 64-72).
    assert world < 4 or not per_rank[3]["decode"][0]["launched"]


def test_serving_one_rank():
    check(1)


def test_serving_two_ranks():
    check(2, compile_step=True)


def test_serving_four_ranks():
    check(4)


def test_merge_bytes_accounting():
    # 2 (P-1)/P copies of a partial (P > 2) against the P-1 of an all-gather.
    rows, row = 3 * 32, 129 * 4
    assert inference.decode_merge_bytes(1, rows, 128) == 0
    assert inference.decode_merge_bytes(2, rows, 128) == rows * row
    assert inference.decode_merge_bytes(4, rows, 128) == 2 * 3 * 24 * row
    assert inference.decode_merge_bytes(8, rows, 128) == 2 * 7 * 12 * row < 7 * rows * row


def test_prefill_strategy_choice():
    choose = inference.choose_prefill_strategy
    # H = 32, Hkv = 8, D = 128, bf16: pass-KV once new / (new + cached) passes about 2/3 * 8/32.
    assert choose(4, 1000, 100_000, 32, 8, 128, 2) == "pass-q"      # a short turn after a long history
    assert choose(4, 100_000, 0, 32, 8, 128, 2) == "pass-kv"        # a fresh long prompt
    ratios = [n / (n + 10_000) for n in range(100, 40_000, 100) if choose(4, n, 10_000, 32, 8, 128, 2) == "pass-kv"]
    assert 0.1 < min(ratios) < 0.2
    assert choose(1, 100_000, 0, 32, 8, 128, 2) == "pass-q"


def test_decode_step_reservation_and_host_lengths():
    data = full_data()
    Q, K, V = data
    cache = cpattn.ShardedKVCache(B, CAP, HKV, D, page_size=16)
    cache.append(K[:, :20], V[:, :20])
    cache.reserve(2)
    for t in (20, 21):
        out = cpattn.decode_step(cache, Q[:, t:t + 1], K[:, t:t + 1], V[:, t:t + 1])
        for b in range(B):
            torch.testing.assert_close(out[b:b + 1].double(), expected(data, b, t, 1), atol=2e-5, rtol=2e-5)
    assert cache.seqlens.tolist() == [22] * B  # refreshed from the device once, here
    out = cpattn.decode(cache, Q[:, 22:23], K[:, 22:23], V[:, 22:23])  # eager decode after decode_step
    torch.testing.assert_close(out[:1].double(), expected(data, 0, 22, 1), atol=2e-5, rtol=2e-5)
    cache.rewind(1)
    assert cache.seqlens.tolist() == [22] * B
    # Past the reservation (room for 23 tokens): the next host read says so instead of returning a
    # silently wrong state.
    cache.reserve(1)
    for t in range(22, 24):
        cpattn.decode_step(cache, Q[:, t:t + 1], K[:, t:t + 1], V[:, t:t + 1])
    with pytest.raises(RuntimeError, match="past their reserved length"):
        cache.seqlens
    with pytest.raises(ValueError, match="cannot remove"):
        cpattn.ShardedKVCache(1, 32, 1, 16).rewind(1)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graphs need a GPU (on CPU: the torch.compile tests)")
def test_decode_step_cuda_graph_replays_exactly():
    """One decode step (store, attention, merge) captured in a CUDA graph and replayed for new tokens
    equals eager decode_step bit for bit."""
    data = tuple(t.cuda() for t in full_data())
    Q, K, V = data
    caches = []
    for _ in range(2):
        cache = cpattn.ShardedKVCache(B, CAP, HKV, D, device="cuda", page_size=16)
        cache.append(K[:, :40], V[:, :40])
        cache.reserve(8)
        caches.append(cache)
    static = [t[:, 40:41].clone() for t in data]
    options = LOCAL_CUDA()  # made before capture: a graph cannot copy from the host
    for _ in range(2):  # warm up (autotuning, allocator) on a side stream, then rewind
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):
            cpattn.decode_step(caches[1], *static, **options)
        torch.cuda.current_stream().wait_stream(stream)
        caches[1].rewind(1)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = cpattn.decode_step(caches[1], *static, **options)  # recorded, not run
    for t in range(40, 46):
        for buffer, x in zip(static, data):
            buffer.copy_(x[:, t:t + 1])
        graph.replay()
        want = cpattn.decode_step(caches[0], *(x[:, t:t + 1] for x in data), **options)
        assert torch.equal(out, want)
    assert torch.equal(caches[0].seqlens, caches[1].seqlens)


def LOCAL_CUDA():
    return {**LOCAL, "sinks": LOCAL["sinks"].cuda()}
