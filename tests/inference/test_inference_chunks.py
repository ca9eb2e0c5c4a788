"""Prefill of real prompts: any chunk length on any split of it over the ranks (a rank may hold no token),
and ragged batched prefill (the new tokens of several sequences of different lengths packed into one
call, each continuing at its own cached length), on 2 and 4 gloo ranks, against a float64 reference.
Both strategies, paged and contiguous storage; bad packings raise on every rank. Every case of one
group size shares one run_ranks call."""
import pytest
import torch

import cpattn
from cpattn.inference import SPLIT_ORDERS, gather_chunk
from cpattn.testing import run_ranks
from reference import reference_attention

H, HKV, D = 2, 1, 16   # GQA; one kv head keeps the interpreter's programs few
LENGTHS = (1, 2, 3, 7, 11, 130)   # chunk lengths: shorter than the group, odd, over several stripes
PREFIX = 21                       # sequence 1's cached prefix (sequence 0 starts empty)
CAP = PREFIX + max(LENGTHS)
STRATEGIES = ("pass-q", "pass-kv")
TOL = 1e-5
# Ragged: sequences 3, 0, 2, 1 (in that order) with cached prefixes and new tokens of their own.
RAGGED_IDS = [3, 0, 2, 1]
RAGGED_CACHED = {0: 0, 1: 9, 2: 40, 3: 17}
RAGGED_NEW = [5, 0, 13, 1]        # per sequence of RAGGED_IDS; sequence 0 gets no new token
LOCAL = dict(window_size=(6, 0), softcap=20.0, sinks=torch.tensor([0.5, -1.0]))


def full_data(batch, length, seed=0):
    gen = torch.Generator().manual_seed(seed)
    return tuple(torch.randn(batch, length, h, D, generator=gen) * (3.0 if h == H else 1.0) for h in (H, HKV, HKV))


def expected(data, b, start, n, **options):
    """float64 attention of tokens [start, start + n) of sequence b over its keys [0, start + n)."""
    Q, K, V = data
    return reference_attention(Q[b:b + 1, start:start + n], K[b:b + 1, :start + n], V[b:b + 1, :start + n],
                               causal=True, q_start=start, **options)[0][0]


def error(out, ref):
    return float((out.double() - ref).abs().max()) if out.numel() else 0.0


def any_length_errors(rank, world):
    """Chunks of every length in LENGTHS for an empty sequence and one after a cached prefix (one call for
    both), split contiguous and zigzag, by both strategies; the chunk is then forgotten (reset / rewind)."""
    data = full_data(2, CAP)
    Q, K, V = data
    cache = cpattn.ShardedKVCache(2, CAP, HKV, D, page_size=16)
    cache.append(K[1:, :PREFIX], V[1:, :PREFIX], batch_index=[1])  # the cached prefix, no attention
    errors = {}
    for n in LENGTHS:
        chunk = [torch.stack([X[0, :n], X[1, PREFIX:PREFIX + n]]) for X in data]
        for order in SPLIT_ORDERS:
            for strategy in STRATEGIES:
                (q, index), (k, _), (v, _) = (cpattn.split_chunk(t, cache, order=order) for t in chunk)
                out = cpattn.prefill(cache, q, k, v, token_index=index, strategy=strategy)
                assert out.shape == q.shape and cache.seqlens.tolist() == [n, PREFIX + n]
                errors[n, order, strategy] = max(error(out[0], expected(data, 0, 0, n)[index]),
                                                 error(out[1], expected(data, 1, PREFIX, n)[index]))
                # The whole chunk's output, gathered, is the reference's on every rank.
                full = gather_chunk(out, cache, n, order=order)
                errors[n, order, strategy, "gathered"] = error(full[1], expected(data, 1, PREFIX, n))
                k_full, v_full = cache.gather()
                assert torch.equal(k_full[0, :n], K[0, :n]) and torch.equal(v_full[1, :PREFIX + n], V[1, :PREFIX + n])
                cache.reset([0])
                cache.rewind(n, [1])
    return errors


def ragged_inputs(data, split, cache):
    """This rank's part of the packed chunk of RAGGED_NEW tokens and its token indices."""
    starts = [RAGGED_CACHED[b] for b in RAGGED_IDS]
    packed = [torch.cat([X[b, s:s + n] for b, s, n in zip(RAGGED_IDS, starts, RAGGED_NEW)])[None] for X in data]
    if split == "scattered":  # any permutation will do: uneven pieces, not in chunk order
        world, total = cache.world_size, sum(RAGGED_NEW)
        index = torch.tensor([t for t in torch.randperm(total, generator=torch.Generator().manual_seed(5)).tolist()
                              if (t * 7) % (world + 1) % world == cache.rank], dtype=torch.int64)
        return [x[:, index] for x in packed], index
    pieces = [cpattn.split_chunk(x, cache, order=split) for x in packed]
    return [piece for piece, _ in pieces], pieces[0][1]


def ragged_cache(data, **storage):
    Q, K, V = data
    cache = cpattn.ShardedKVCache(4, 64, HKV, D, **storage)
    for b, n in RAGGED_CACHED.items():
        if n:
            cache.append(K[b:b + 1, :n], V[b:b + 1, :n], batch_index=[b])
    return cache


def per_sequence_outputs(data, options):
    """The new tokens' outputs of one prefill per sequence (contiguous split), gathered: the packed chunk's."""
    cache = ragged_cache(data)
    outs = []
    for b, n in zip(RAGGED_IDS, RAGGED_NEW):
        if n:
            chunk = [X[b:b + 1, RAGGED_CACHED[b]:RAGGED_CACHED[b] + n] for X in data]
            (q, index), (k, _), (v, _) = (cpattn.split_chunk(t, cache) for t in chunk)
            outs.append(gather_chunk(cpattn.prefill(cache, q, k, v, token_index=index, batch_index=[b], **options),
                                     cache, n))
    return torch.cat(outs, dim=1)


def ragged_errors(rank, world):
    """One prefill of the new tokens of four sequences (one with none) after prefixes of their own, on
    three splits (local attention on one), by both strategies; against float64 and against one prefill
    per sequence."""
    data = full_data(4, 64, seed=1)
    cu = torch.tensor([0, *torch.tensor(RAGGED_NEW).cumsum(0).tolist()], dtype=torch.int32)
    errors = {}
    for name, options, splits in (("plain", {}, ("contiguous", "zigzag", "scattered")), ("local", LOCAL, ("zigzag",))):
        per_sequence = per_sequence_outputs(data, options)
        refs = torch.cat([expected(data, b, RAGGED_CACHED[b], n, **options) for b, n in zip(RAGGED_IDS, RAGGED_NEW)])
        for split in splits:
            for strategy in STRATEGIES:
                cache = ragged_cache(data, **({"page_size": 16} if strategy == "pass-q" else {"stripe": 8}))
                (q, k, v), index = ragged_inputs(data, split, cache)
                pos = cache.positions(token_index=index, batch_index=RAGGED_IDS, cu_seqlens=cu)
                out = cpattn.prefill(cache, q, k, v, token_index=index, batch_index=RAGGED_IDS, cu_seqlens=cu,
                                     strategy=strategy, **options)
                assert out.shape == q.shape
                assert cache.seqlens.tolist() == [RAGGED_CACHED[b] + dict(zip(RAGGED_IDS, RAGGED_NEW))[b]
                                                  for b in range(4)]
                errors[name, split, strategy] = error(out[0], refs[index])
                seq_of = torch.searchsorted(cu[1:].long(), index, right=True)
                assert torch.equal(pos[0], torch.tensor([RAGGED_CACHED[RAGGED_IDS[s]] for s in seq_of.tolist()])
                                   + index - cu.long()[seq_of])
                if split != "scattered":  # the whole chunk, gathered on every rank: the per-sequence prefills'
                    full = gather_chunk(out, cache, int(cu[-1]), order=split)
                    errors[name, split, strategy, "per sequence"] = float((full - per_sequence).abs().max())
    return errors


def bad_packings(rank, world):
    """Refused on every rank (none waits), the cache unchanged."""
    data = full_data(4, 64, seed=1)
    cache = ragged_cache(data, page_size=16)
    before = cache.seqlens
    (q, k, v), index = ragged_inputs(data, "contiguous", cache)
    cu = torch.tensor([0, 5, 5, 18, 19], dtype=torch.int32)
    seen = {}
    for name, call in {
        "cu differs": lambda: cpattn.prefill(cache, q, k, v, token_index=index, batch_index=RAGGED_IDS,
                                             cu_seqlens=cu + torch.tensor([0, 0, 0, rank, rank], dtype=torch.int32)),
        "cu too short": lambda: cpattn.prefill(cache, q, k, v, token_index=index, batch_index=RAGGED_IDS,
                                               cu_seqlens=cu[:-1]),
        "cu not the chunk": lambda: cpattn.prefill(cache, q, k, v, token_index=index, batch_index=RAGGED_IDS,
                                                   cu_seqlens=cu * 2),
        "indices overlap": lambda: cpattn.prefill(cache, q, k, v, token_index=torch.arange(q.shape[1]),
                                                  batch_index=RAGGED_IDS, cu_seqlens=cu),
        "uneven without token_index": lambda: cpattn.prefill(cache, q, k, v, batch_index=RAGGED_IDS, cu_seqlens=cu),
    }.items():
        with pytest.raises(ValueError) as caught:
            call()
        seen[name] = str(caught.value)
        assert torch.equal(cache.seqlens, before), name
    return seen


def all_cases(rank, world):
    return any_length_errors(rank, world), ragged_errors(rank, world), bad_packings(rank, world)


def check(world):
    for rank, (any_length, ragged, bad) in enumerate(run_ranks(all_cases, world, timeout=300)):
        assert len(any_length) == len(LENGTHS) * 2 * 2 * 2
        assert max(any_length.values()) < TOL, (rank, {k: e for k, e in any_length.items() if e >= TOL})
        assert len(ragged) == 3 * 2 + 2 * 2 + 1 * 2 * 2
        assert max(ragged.values()) < TOL, (rank, {k: e for k, e in ragged.items() if e >= TOL})
        assert "disagree on packing" in bad["cu differs"], bad
        assert "cu_seqlens must hold len(batch_index) + 1 = 5" in bad["cu too short"], bad
        assert "permutation of range(n)" in bad["cu not the chunk"] and "cu_seqlens[-1] = 38" in bad["cu not the chunk"]
        assert "permutation of range(n)" in bad["indices overlap"], bad
        assert "disagree on tokens" in bad["uneven without token_index"] or "rejected" in \
            bad["uneven without token_index"], bad


def test_two_ranks():
    check(2)


@pytest.mark.slow  # 4 ranks (14 s); 2 ranks cover the same splits, a rank with no token included
def test_four_ranks():
    check(4)


def test_one_process():
    # No process group: the same code with every token on the one rank.
    ragged = ragged_errors(0, 1)
    assert max(ragged.values()) < TOL, ragged
