"""MLA over a sequence-sharded latent cache (issue 22, part 2), and a cache whose values have a head dim of
their own, against a float64 reference written from the same cache.

A latent cache (``ShardedKVCache(..., v_head_dim=Dv, latent=True)``) holds one vector of D per token and
one kv head; the value is its first Dv entries. prefill (the absorbed form: q of width D against the
latent vectors), decode and decode_step take v=None; transfer_cache moves the latent vectors alone. Every
check compares with ``reference_attention`` in float64 over ``cache.gather()`` (the values its first Dv
columns), after checking that the gathered cache holds exactly the vectors given. Kept small for the CPU
suite: (72, 64) for breadth, one (576, 512) case; 16 and 128 query heads; 1 rank in process, then one
launch of 2 ranks (several cases, a transfer 2 -> 1, a misuse on one rank) and one of 4 (128 heads).
decode_step of a latent cache under torch.compile: tests/api/test_api_compile.py.
"""
import pytest
import torch
import torch.distributed as dist

import cpattn
from cpattn.kernels import decode as decode_module
from cpattn.testing import run_ranks
from reference import reference_attention

TOL = dict(atol=1e-4, rtol=1e-4)
BATCH = 2


def _case(head_dim=72, value_dim=64, heads=16, latent=True, page_size=16, strategy="auto", extras=None,
          chunk=5):
    """One scenario's settings: ``chunk`` tokens per rank in the first prefill (odd)."""
    return dict(head_dim=head_dim, value_dim=value_dim, heads=heads, latent=latent, page_size=page_size,
                strategy=strategy, extras=extras or {}, chunk=chunk)


def _data(case, world, seed=0):
    """Every token's q, k and (not latent) v, the same on every rank: (B, capacity, ...)."""
    gen = torch.Generator().manual_seed(seed)
    capacity = case["chunk"] * world + 3 * world + 8
    heads_kv = 1 if case["latent"] else 2
    q = torch.randn(BATCH, capacity, case["heads"], case["head_dim"], generator=gen)
    k = torch.randn(BATCH, capacity, heads_kv, case["head_dim"], generator=gen)
    v = None if case["latent"] else torch.randn(BATCH, capacity, heads_kv, case["value_dim"], generator=gen)
    return capacity, q, k, v


def _options(case, heads):
    extras = dict(case["extras"])
    if extras.pop("sinks", False):
        extras["sinks"] = torch.linspace(-1.0, 1.5, heads)
    return extras


def _check_against_cache(cache, q, K, V, starts, rows, out, options):
    """out (len(rows), n, H, Dv) of queries q (the same shape, D wide) at positions starts[i] + t against
    float64 attention over the gathered cache, which must hold K, V (V None: latent) up to its lengths."""
    k_all, v_all = cache.gather()
    lengths = cache.seqlens
    for i, b in enumerate(rows):
        n = int(lengths[b])
        assert torch.equal(k_all[b, :n], K[b, :n])
        want_v = K[b, :n, :, :cache.v_head_dim] if V is None else V[b, :n]
        assert torch.equal(v_all[b, :n], want_v)
        ref, _ = reference_attention(q[i:i + 1], k_all[b:b + 1, :n], v_all[b:b + 1, :n], causal=True,
                                     q_start=int(starts[i]), **options)
        torch.testing.assert_close(out[i:i + 1].double(), ref, **TOL)


def scenario(rank, world, case, group=None):
    """Prefill (two chunks, the second for one sequence after a cached prefix), decode 1 then 2 tokens, a
    decode_step: each output against float64 over the cache. Returns the cache (for a transfer)."""
    capacity, Q, K, V = _data(case, world)
    options = _options(case, case["heads"])
    cache = cpattn.ShardedKVCache(BATCH, capacity, K.shape[2], case["head_dim"], page_size=case["page_size"],
                                  group=group, v_head_dim=case["value_dim"], latent=case["latent"])
    assert cache.v_head_dim == case["value_dim"] and cache.latent == case["latent"]

    def pick(X, rows, cols):
        return None if X is None else X[rows][:, cols]

    def prefill(rows, n_local, strategy):
        start = cache.seqlens[rows]
        assert bool((start == start[0]).all())  # the rows' chunks sit at the same positions (cols below)
        index = torch.arange(rank * n_local, (rank + 1) * n_local)
        cols = int(start[0]) + index
        q, k, v = (pick(X, rows, cols) for X in (Q, K, V))
        out = cpattn.prefill(cache, q, k, v, token_index=index, batch_index=rows, strategy=strategy, **options)
        assert out.shape == (len(rows), n_local, case["heads"], case["value_dim"])
        _check_against_cache(cache, q, K, V, start + index[0], rows, out, options)  # contiguous local tokens

    prefill([0, 1], case["chunk"], case["strategy"])
    prefill([1], 3, "pass-kv" if world > 1 else "auto")  # a prefix hit: the chunk sees the cached prefix
    for n_new in (1, 2):
        starts = cache.seqlens
        cols = starts[:, None] + torch.arange(n_new)
        q, k, v = (None if X is None else torch.stack([X[b, cols[b]] for b in range(BATCH)]) for X in (Q, K, V))
        inputs = [None if t is None else t.clone() for t in (q, k, v)]
        out = cpattn.decode(cache, q, k, v, **options)
        assert all(a is b is None or torch.equal(a, b) for a, b in zip((q, k, v), inputs))  # inputs untouched
        _check_against_cache(cache, q, K, V, starts, range(BATCH), out, options)
    cache.reserve(1)
    starts = cache.seqlens
    q, k, v = (None if X is None else torch.stack([X[b, starts[b]:starts[b] + 1] for b in range(BATCH)])
               for X in (Q, K, V))
    out = cpattn.decode_step(cache, q, k, v, **options)
    _check_against_cache(cache, q, K, V, starts, range(BATCH), out, options)
    return cache


def _count_latent_launches(monkeypatch):
    """The decode kernel's launches, recording whether each ran the latent form (each key read once)."""
    launched = []
    real = decode_module.launch
    monkeypatch.setattr(decode_module, "launch", lambda kernel, grid, args, constants, *rest, **kw: (
        launched.append(constants["LATENT"]), real(kernel, grid, args, constants, *rest, **kw)))
    return launched


ONE_RANK = {
    "latent-72-64-h16-paged-window-softcap-sinks": _case(extras={"window_size": (9, 0), "softcap": 8.0,
                                                                 "sinks": True}),
    "latent-72-64-h16-contiguous": _case(page_size=None, chunk=3),
    "latent-576-512-h16-paged": _case(head_dim=576, value_dim=512, chunk=3),
    "values-72-64-gqa-contiguous": _case(heads=4, latent=False, page_size=None),
}


@pytest.mark.parametrize("name", list(ONE_RANK))
def test_one_rank(name, monkeypatch):
    case = ONE_RANK[name]
    launched = _count_latent_launches(monkeypatch)
    scenario(0, 1, case)
    # prefill, the prefix hit, two decodes and decode_step each ran the kernel once, in the cache's form.
    assert launched == [case["latent"]] * 5


@pytest.mark.parametrize("kwargs,error,match", [
    (dict(num_kv_heads=2, v_head_dim=64, latent=True), ValueError, "num_kv_heads must be 1"),
    (dict(latent=True), ValueError, "latent=True needs v_head_dim"),
    (dict(v_head_dim=72, latent=True), ValueError, "must be below head_dim"),
    (dict(v_head_dim=80, latent=True), ValueError, "must be below head_dim"),
    (dict(head_dim=800, v_head_dim=520, latent=True), ValueError, "v_head_dim up to 512"),
    (dict(head_dim=600, v_head_dim=300, latent=True), ValueError, "head_dim - v_head_dim up to 256"),
    (dict(head_dim=300), ValueError, "head_dim 300 is above the supported maximum"),
    (dict(v_head_dim=300), ValueError, "v_head_dim 300 is above the supported maximum"),
    (dict(v_head_dim=0), ValueError, "v_head_dim must be a positive int"),
    (dict(v_head_dim=64.0), TypeError, "v_head_dim must be a positive int"),
    (dict(v_head_dim=64, latent=1), TypeError, "latent must be True or False"),
])
def test_bad_cache_arguments(kwargs, error, match):
    args = dict(num_kv_heads=1, head_dim=72) | kwargs
    with pytest.raises(error, match=match):
        cpattn.ShardedKVCache(BATCH, 32, args.pop("num_kv_heads"), args.pop("head_dim"), **args)


def test_bad_inputs_leave_the_cache_unchanged():
    gen = torch.Generator().manual_seed(4)
    latent = cpattn.ShardedKVCache(BATCH, 32, 1, 72, v_head_dim=64, latent=True, page_size=16)
    separate = cpattn.ShardedKVCache(BATCH, 32, 2, 72, v_head_dim=64)
    q = torch.randn(BATCH, 1, 4, 72, generator=gen)
    k1, k2 = torch.randn(BATCH, 1, 1, 72, generator=gen), torch.randn(BATCH, 1, 2, 72, generator=gen)
    latent.append(torch.randn(BATCH, 5, 1, 72, generator=gen), None)
    separate.append(torch.randn(BATCH, 5, 2, 72, generator=gen), torch.randn(BATCH, 5, 2, 64, generator=gen))
    before = [(c.seqlens, c.k.clone(), c.v.clone()) for c in (latent, separate)]
    calls = [
        (lambda: latent.append(k1, k1[..., :64]), ValueError, "a latent cache takes v=None"),
        (lambda: cpattn.decode(latent, q, k1, k1[..., :64]), ValueError, "a latent cache takes v=None"),
        (lambda: cpattn.decode_step(latent, q, k1, k1.clone()), ValueError, "a latent cache takes v=None"),
        (lambda: cpattn.prefill(latent, q, k1, k1), ValueError, "a latent cache takes v=None"),
        (lambda: cpattn.decode(latent, q, k1[..., :64], None), ValueError, r"head_dim=72\)"),
        (lambda: cpattn.decode(latent, q[..., :64], k1, None), ValueError, "head_dim=72"),
        (lambda: cpattn.decode(separate, q, k2, None), TypeError, "v must be a torch.Tensor"),
        (lambda: cpattn.decode(separate, q, k2, k2), ValueError, r"v_head_dim=64\)"),
        (lambda: separate.append(k2, k2), ValueError, r"v_head_dim=64\)"),
        (lambda: cpattn.prefill(separate, q, k2, torch.randn(BATCH, 1, 2, 64, dtype=torch.float64)), TypeError,
         "v has dtype torch.float64"),
    ]
    for call, error, match in calls:
        with pytest.raises(error, match=match):
            call()
    for cache, (lens, k, v) in zip((latent, separate), before):
        assert torch.equal(cache.seqlens, lens) and torch.equal(cache.k, k) and torch.equal(cache.v, v)


def two_ranks(rank, world):
    """Both prefill strategies over a latent cache (windows, softcap, sinks with pass-Q), a cache whose
    values have their own width; a latent cache moved to rank 0 alone by transfer_cache (and a transfer
    to a cache of the other layout refused on both ranks); a latent decode given a v on one rank only
    refused on both."""
    scenario(rank, world, _case(strategy="pass-q", extras={"window_size": (9, 0), "softcap": 8.0, "sinks": True}))
    scenario(rank, world, _case(heads=4, latent=False, strategy="pass-q"))
    src = scenario(rank, world, _case(page_size=None, strategy="pass-kv"))
    alone = dist.new_group([0])
    other_layout = cpattn.ShardedKVCache(BATCH, src.capacity, 1, 72, group=alone, v_head_dim=64) if rank == 0 else None
    with pytest.raises(ValueError, match="differ in latent layout"):
        cpattn.transfer_cache(src, other_layout)
    dst = cpattn.ShardedKVCache(BATCH, src.capacity, 1, 72, group=alone, page_size=16, v_head_dim=64, latent=True) \
        if rank == 0 else None
    k_src, _ = src.gather()
    transfer = cpattn.transfer_cache(src, dst)
    transfer.wait()
    if rank == 0:
        k_dst, v_dst = dst.gather()
        assert torch.equal(k_dst, k_src) and torch.equal(v_dst, k_src[..., :64])
        gen = torch.Generator().manual_seed(5)
        q, k = torch.randn(BATCH, 1, 16, 72, generator=gen), torch.randn(BATCH, 1, 1, 72, generator=gen)
        starts = dst.seqlens
        out = cpattn.decode(dst, q, k, None)
        K = torch.cat([k_src, torch.zeros(BATCH, 1, 1, 72)], dim=1)
        for b in range(BATCH):
            K[b, int(starts[b])] = k[b, 0]
        _check_against_cache(dst, q, K, None, starts, range(BATCH), out, {})
    # A misuse on rank 1 alone (a v for a latent cache): every rank raises, none waits.
    q, k = torch.randn(BATCH, 1, 16, 72), torch.randn(BATCH, 1, 1, 72)
    with pytest.raises(ValueError, match="a latent cache takes v=None" if rank == 1 else "rank.s. \\[1\\]"):
        cpattn.decode(src, q, k, k[..., :64] if rank == 1 else None)
    return transfer.tokens_received


def test_two_ranks():
    received = run_ranks(two_ranks, 2, timeout=240)
    assert received[1] == 0 and received[0] > 0  # rank 0 kept its own part and received rank 1's


def four_ranks(rank, world):
    """128 query heads over a latent cache: the decode merge's all-to-all path (more than 2 ranks) with
    many rows, pass-Q then pass-KV (the prefix hit). The smallest chunk keeps the interpreter's work down."""
    scenario(rank, world, _case(heads=128, chunk=1, strategy="pass-q"))


def test_four_ranks():
    run_ranks(four_ranks, 4, timeout=300)


def test_prefill_bytes_count_the_layout():
    """pass-KV moves a latent cache's vectors alone (D per token, not D + Dv), pass-Q outputs of Dv + 1."""
    from cpattn.inference import prefill_bytes
    from cpattn.latent import ValueLayout
    args = (2, 10, 30, 16, 1, 576, 2)  # world, new, cached, heads, kv heads, D, bf16
    latent, separate = ValueLayout(576, 512, True), ValueLayout(576, 512, False)
    assert prefill_bytes("pass-kv", *args, latent) == 0.5 * (10 + 10 + 30) * 576 * 2
    assert prefill_bytes("pass-kv", *args, separate) == 0.5 * (10 + 10 + 30) * (576 + 512) * 2
    assert prefill_bytes("pass-q", *args, latent) == 0.5 * 10 * 576 * 2 + 0.5 * 10 * 16 * (576 * 2 + 513 * 4)
    # Without a layout: values of head_dim, the formula of caches before v_head_dim.
    assert prefill_bytes("pass-q", *args) == 0.5 * 10 * 2 * 576 * 2 + 0.5 * 10 * 16 * (576 * 2 + 577 * 4)
