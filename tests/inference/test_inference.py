"""Context-parallel prefill and decode over a ShardedKVCache, against torch SDPA over the full cache.

Every rank builds the same full q, k, v from one seed, feeds its part, and
checks its outputs against SDPA over the unsharded data. Many cases run inside
one run_ranks call to keep the suite fast.
"""
import pytest
import torch
import torch.nn.functional as F

import cpattn
from cpattn.testing import run_ranks

B, H, HKV, D, CAP = 3, 4, 2, 32, 160  # GQA group 2


def sdpa_rows(q, k_full, v_full, start):
    """SDPA of q (1, n, H, D) at positions start.. over keys [0, start + n) of one sequence, causal."""
    n = q.shape[1]
    length = start + n
    mask = torch.arange(length)[None, :] <= (start + torch.arange(n))[:, None]
    out = F.scaled_dot_product_attention(q.transpose(1, 2), k_full[:, :length].transpose(1, 2),
                                         v_full[:, :length].transpose(1, 2), attn_mask=mask, enable_gqa=True)
    return out.transpose(1, 2)


def full_data(seed=0, dtype=torch.float32):
    gen = torch.Generator().manual_seed(seed)
    return (torch.randn(B, CAP, H, D, generator=gen).to(dtype), torch.randn(B, CAP, HKV, D, generator=gen).to(dtype),
            torch.randn(B, CAP, HKV, D, generator=gen).to(dtype))


def zigzag_index(n, world, rank):
    """Rank r holds chunk pieces r and 2P-1-r of 2P: a non-contiguous split of the chunk."""
    piece = n // (2 * world)
    return torch.cat([torch.arange(rank * piece, (rank + 1) * piece),
                      torch.arange((2 * world - 1 - rank) * piece, (2 * world - rank) * piece)])


def run_scenario(cache, world, rank, zigzag=False):
    """Prefill sequences to different lengths in chunks, then decode; returns outputs and errors vs SDPA."""
    Q, K, V = full_data()
    errors, outs = [], []

    def prefill(rows, start, n):
        rows_t = torch.tensor(rows)
        index = zigzag_index(n, world, rank) if zigzag else torch.arange(rank * (n // world), (rank + 1) * (n // world))
        q, k, v = (X[rows_t][:, start + index] for X in (Q, K, V))
        out = cpattn.prefill(cache, q, k, v, token_index=index, batch_index=rows)
        for i, b in enumerate(rows):
            ref = sdpa_rows(Q[b:b + 1, start:start + n], K[b:b + 1], V[b:b + 1], start)[:, index]
            errors.append((out[i:i + 1] - ref).abs().max().item())
        outs.append(out)

    # Sequence 0: two chunks (the second sees the first through the cache); 1 and 2 together; 2 grows again.
    prefill([0], 0, 48)
    prefill([0], 48, 16)
    prefill([2, 1], 0, 32)
    prefill([2], 32, 8 * world)
    lengths = [64, 32, 32 + 8 * world]
    assert cache.seqlens.tolist() == lengths
    # Decode: every sequence at its own length, across stripe (page and rank) boundaries at 64 and 32+16k.
    for n_new in (1, 1, 3, 1):
        pos = torch.tensor(lengths)
        q = torch.stack([Q[b, p:p + n_new] for b, p in enumerate(lengths)])
        k = torch.stack([K[b, p:p + n_new] for b, p in enumerate(lengths)])
        v = torch.stack([V[b, p:p + n_new] for b, p in enumerate(lengths)])
        out = cpattn.decode(cache, q, k, v)
        for b in range(B):
            ref = sdpa_rows(Q[b:b + 1, lengths[b]:lengths[b] + n_new], K[b:b + 1], V[b:b + 1], int(pos[b]))
            errors.append((out[b:b + 1] - ref).abs().max().item())
        outs.append(out)
        lengths = [p + n_new for p in lengths]
    # Decode for some sequences only, in another order: the others keep their length.
    rows = [2, 0]
    q, k, v = (torch.stack([X[b, lengths[b]:lengths[b] + 1] for b in rows]) for X in (Q, K, V))
    inputs = [t.clone() for t in (q, k, v)]
    out = cpattn.decode(cache, q, k, v, batch_index=rows)
    assert all(torch.equal(a, b) for a, b in zip((q, k, v), inputs))  # inputs untouched
    for i, b in enumerate(rows):
        ref = sdpa_rows(Q[b:b + 1, lengths[b]:lengths[b] + 1], K[b:b + 1], V[b:b + 1], lengths[b])
        errors.append((out[i:i + 1] - ref).abs().max().item())
        lengths[b] += 1
    assert cache.seqlens.tolist() == lengths
    # The stored shards, gathered, are exactly the full k, v.
    k_full, v_full = cache.gather()
    for b, n in enumerate(lengths):
        assert torch.equal(k_full[b, :n], K[b, :n]) and torch.equal(v_full[b, :n], V[b, :n])
    # The sequences really do cross ranks and pages (stripes) in their middle.
    owners = cache.owner(torch.arange(lengths[0]))
    assert owners.unique().numel() == min(world, -(-lengths[0] // cache.stripe)) > 1 or world == 1
    assert lengths[0] > 2 * cache.stripe
    return errors, outs


def cp_cases(rank, world):
    results = {}
    for name, kwargs, zigzag in [("contiguous", {}, False), ("paged16", {"page_size": 16}, False),
                                 ("paged32", {"page_size": 32}, True)]:
        cache = cpattn.ShardedKVCache(B, CAP, HKV, D, group=None, **kwargs)
        assert cache.world_size == world and cache.rank == rank
        errors, outs = run_scenario(cache, world, rank, zigzag)
        results[name] = (max(errors), [o.numpy() for o in outs])  # numpy: tensors would cross by shared fd
    # Chunked prefill equals one prefill: 64 tokens of sequence 0 in one chunk vs 48 + 16 above.
    Q, K, V = full_data()
    cache = cpattn.ShardedKVCache(B, CAP, HKV, D, page_size=16)
    n_local = 64 // world
    idx = torch.arange(rank * n_local, (rank + 1) * n_local)
    one = cpattn.prefill(cache, Q[:1, idx], K[:1, idx], V[:1, idx], token_index=idx, batch_index=[0])
    results["one_prefill"] = one.numpy()
    return results


def check_cp(world):
    per_rank = run_ranks(cp_cases, world, timeout=150)
    for results in per_rank:
        for name, value in results.items():
            results[name] = torch.from_numpy(value) if name == "one_prefill" else \
                (value[0], [torch.from_numpy(o) for o in value[1]])
    for rank, results in enumerate(per_rank):
        for name in ("contiguous", "paged16", "paged32"):
            err, outs = results[name]
            assert err < 1e-5, (rank, name, err)
        # Paged against contiguous: the same outputs (paged32 split its prompt chunks zigzag: compare decode).
        for name, first in (("paged16", 0), ("paged32", 4)):
            for a, b in zip(results[name][1][first:], results["contiguous"][1][first:]):
                torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)
        # Chunked prefill: rows of this rank from chunks 48 + 16 vs one chunk of 64.
        n_local = 64 // world
        idx = torch.arange(rank * n_local, (rank + 1) * n_local)
        first_local = torch.arange(rank * (48 // world), (rank + 1) * (48 // world))
        second_local = 48 + torch.arange(rank * (16 // world), (rank + 1) * (16 // world))
        chunked = torch.cat([results["contiguous"][1][0], results["contiguous"][1][1]], dim=1)
        positions = torch.cat([first_local, second_local])
        one = results["one_prefill"]
        for j, p in enumerate(positions.tolist()):
            if p in idx.tolist():
                torch.testing.assert_close(chunked[:, j], one[:, idx.tolist().index(p)], atol=1e-5, rtol=1e-5)
    # Decode outputs are bitwise the same on every rank.
    for name in ("contiguous", "paged16", "paged32"):
        for step in range(4, 8):
            for rank in range(1, world):
                assert torch.equal(per_rank[rank][name][1][step], per_rank[0][name][1][step])


def test_cp_one_rank_group():
    check_cp(1)  # a process group of one: no collectives, same results


def test_cp_two_ranks():
    check_cp(2)


def test_cp_four_ranks():
    check_cp(4)


def test_no_process_group():
    # Group size 1 without torch.distributed: plain single-device paged decoding.
    assert not torch.distributed.is_initialized()
    for kwargs in ({}, {"page_size": 16}):
        cache = cpattn.ShardedKVCache(B, CAP, HKV, D, **kwargs)
        assert cache.world_size == 1
        errors, _ = run_scenario(cache, 1, 0)
        assert max(errors) < 1e-5


def test_layout():
    # The formulas for a 3-rank group, seen from every rank.
    layout = cpattn.layout.StripeLayout(16, 3)
    pos = torch.arange(200)
    owner, slot = layout.owner(pos), layout.local_slot(pos)
    for r in range(3):
        mine = pos[owner == r]
        assert torch.equal(slot[owner == r], torch.arange(mine.numel()))  # slots fill in position order
        for length in (0, 1, 15, 16, 17, 47, 48, 49, 100, 200):
            assert int(layout.local_lengths(torch.tensor([length]), r)) == int((mine < length).sum())
        stripe, stride, offset = layout.slot_positions(r)
        j = torch.arange(mine.numel())
        assert torch.equal(offset + (j // stripe) * stride + j % stripe, mine)
        assert torch.equal(layout.positions_of(r, mine.numel()), mine)


def bf16_case(rank, world):
    Q, K, V = full_data(dtype=torch.bfloat16)
    cache = cpattn.ShardedKVCache(B, CAP, HKV, D, dtype=torch.bfloat16, page_size=16)
    n_local = 40 // world
    idx = torch.arange(rank * n_local, (rank + 1) * n_local)
    out = cpattn.prefill(cache, Q[:, idx], K[:, idx], V[:, idx], token_index=idx)
    assert out.dtype == torch.bfloat16
    dec = cpattn.decode(cache, Q[:, 40:41], K[:, 40:41], V[:, 40:41])
    errs = []
    for b in range(B):
        ref = sdpa_rows(Q[b:b + 1, :40].float(), K[b:b + 1].float(), V[b:b + 1].float(), 0)[:, idx]
        errs.append((out[b:b + 1].float() - ref).abs().max().item())
        ref = sdpa_rows(Q[b:b + 1, 40:41].float(), K[b:b + 1].float(), V[b:b + 1].float(), 40)
        errs.append((dec[b:b + 1].float() - ref).abs().max().item())
    return max(errs)


def test_bf16_two_ranks():
    assert max(run_ranks(bf16_case, 2)) < 2e-2


def snapshot(cache):
    return cache.seqlens.clone(), cache.k.clone(), cache.v.clone(), \
        None if cache.block_table is None else cache.block_table.clone()


def unchanged(cache, snap):
    seqlens, k, v, table = snap
    return torch.equal(cache.seqlens, seqlens) and torch.equal(cache.k, k) and torch.equal(cache.v, v) and \
        (table is None or torch.equal(cache.block_table, table))


def bad_input_cases(rank, world):
    Q, K, V = full_data()
    caught = []
    for kwargs in ({}, {"page_size": 16}):
        cache = cpattn.ShardedKVCache(B, 64, HKV, D, **kwargs)
        idx = torch.arange(rank * 16, (rank + 1) * 16)
        cpattn.prefill(cache, Q[:, idx], K[:, idx], V[:, idx], token_index=idx)
        snap = snapshot(cache)
        q1, k1, v1 = Q[:, 32:33], K[:, 32:33], V[:, 32:33]
        cases = [
            # overflow: 32 held + 40 > 64
            (ValueError, "cache overflow", lambda: cpattn.prefill(cache, Q[:, :20], K[:, :20], V[:, :20])),
            (ValueError, "cache overflow", lambda: cpattn.decode(cache, Q[:, :33], K[:, :33], V[:, :33])),
            (ValueError, "multiple of the cache's kv heads", lambda: cpattn.decode(cache, Q[:, :1, :3], k1, v1)),
            (ValueError, "kv_heads=2", lambda: cpattn.decode(cache, q1, K[:, :1].repeat(1, 1, 2, 1), v1)),
            (ValueError, "head_dim=32", lambda: cpattn.decode(cache, q1[..., :16], k1[..., :16], v1[..., :16])),
            (TypeError, "dtype", lambda: cpattn.decode(cache, q1.double(), k1.double(), v1.double())),
            (ValueError, "q has 1 tokens but k, v have 2", lambda: cpattn.decode(cache, q1, K[:, :2], V[:, :2])),
            (ValueError, "batch_index", lambda: cpattn.decode(cache, q1[:1], k1[:1], v1[:1], batch_index=[3])),
            # token indices that overlap across ranks
            (ValueError, "permutation", lambda: cpattn.prefill(cache, Q[:, :2], K[:, :2], V[:, :2],
                                                               token_index=torch.tensor([0, 1]))),
            # only rank 1 passes a wrong shape: every rank raises, none hangs
            (ValueError, "different|rejected|tokens", lambda: cpattn.decode(
                cache, Q[:, :1 + rank], K[:, :1 + rank], V[:, :1 + rank])),
            (ValueError, "rejected|head_dim", lambda: cpattn.decode(
                cache, q1[..., :32 - 16 * rank], k1[..., :32 - 16 * rank], v1[..., :32 - 16 * rank])),
            # ranks asking for different attentions (a window on rank 1 only) would merge nonsense
            (ValueError, "disagree.*window", lambda: cpattn.decode(cache, q1, k1, v1, window_size=(8 * rank - 1, -1))),
            (ValueError, "window_size", lambda: cpattn.decode(cache, q1, k1, v1, window_size=(-3, 0))),
        ]
        for exc, match, call in cases:
            with pytest.raises(exc, match=match):
                call()
            assert unchanged(cache, snap), match
            caught.append(match)
        # The cache still works after the errors.
        out = cpattn.decode(cache, q1, k1, v1)
        for b in range(B):
            assert (out[b:b + 1] - sdpa_rows(q1[b:b + 1], K[b:b + 1], V[b:b + 1], 32)).abs().max() < 1e-5
    # A pool too small for what is asked: refused before anything is written.
    cache = cpattn.ShardedKVCache(2, 128, HKV, D, page_size=16, num_pages=3)
    snap = snapshot(cache)
    n = 64 // world * world
    idx = torch.arange(rank * (n // world), (rank + 1) * (n // world))
    with pytest.raises(ValueError, match="out of pages"):
        cpattn.prefill(cache, Q[:2, idx], K[:2, idx], V[:2, idx], token_index=idx)
    assert unchanged(cache, snap)
    return caught


def test_bad_input_two_ranks():
    results = run_ranks(bad_input_cases, 2)
    assert len(results[0]) == len(results[1]) == 26


def test_bad_constructor_arguments():
    with pytest.raises(ValueError, match="power of two"):
        cpattn.ShardedKVCache(1, 64, 1, 32, page_size=24)
    with pytest.raises(ValueError, match="power of two"):
        cpattn.ShardedKVCache(1, 64, 1, 32, page_size=8)
    with pytest.raises(TypeError, match="dtype"):
        cpattn.ShardedKVCache(1, 64, 1, 32, dtype=torch.int32)
    with pytest.raises(ValueError, match="capacity"):
        cpattn.ShardedKVCache(1, 0, 1, 32)
    with pytest.raises(TypeError, match="head_dim"):
        cpattn.ShardedKVCache(1, 64, 1, 32.0)
    with pytest.raises(ValueError, match="num_pages needs page_size"):
        cpattn.ShardedKVCache(1, 64, 1, 32, num_pages=4)
    for timeout in (0, -1.0, float("inf"), True, "30"):
        with pytest.raises(ValueError, match="timeout must be a positive number of seconds"):
            cpattn.ShardedKVCache(1, 64, 1, 32, timeout=timeout)

def test_split_chunk_any_length():
    """Pieces of every length, a rank with none, both orders; what split_chunk refuses."""
    x = torch.arange(5)[None, :, None]
    group = (lambda rank, world=2: type("Group", (), {"world_size": world, "rank": rank})())  # what it reads
    assert [cpattn.split_chunk(x, group(r))[1].tolist() for r in range(2)] == [[0, 1, 2], [3, 4]]
    assert [cpattn.split_chunk(x, group(r), order="zigzag")[1].tolist() for r in range(2)] == [[0, 1, 4], [2, 3]]
    assert [cpattn.split_chunk(x[:, :3], group(r, 4))[1].tolist() for r in range(4)] == [[0], [1], [2], []]
    piece, index = cpattn.split_chunk(x, group(1))
    assert torch.equal(piece[0, :, 0], index) and piece.data_ptr() == x[:, 3:].data_ptr()  # a view
    with pytest.raises(ValueError, match="no tokens"):
        cpattn.split_chunk(x[:, :0], group(0))
    with pytest.raises(ValueError, match="order must be one of"):
        cpattn.split_chunk(x, group(0), order="striped")
    with pytest.raises(ValueError, match="seq_dim"):
        cpattn.split_chunk(x, group(0), seq_dim=3)


def test_append_and_reset_single_process():
    Q, K, V = full_data()
    cache = cpattn.ShardedKVCache(B, CAP, HKV, D, page_size=16, num_pages=12)
    cache.append(K[:, :20], V[:, :20])
    out = cpattn.decode(cache, Q[:, 20:21], K[:, 20:21], V[:, 20:21])
    for b in range(B):
        torch.testing.assert_close(out[b:b + 1], sdpa_rows(Q[b:b + 1, 20:21], K[b:b + 1], V[b:b + 1], 20),
                                   atol=1e-5, rtol=1e-5)
    with pytest.raises(ValueError, match="out of pages"):
        cache.append(K[:, :60], V[:, :60])  # 3 x 81 tokens need 18 pages > 12
    cache.reset([0, 1])
    assert cache.seqlens.tolist() == [0, 0, 21] and cache.free_pages == 12 - 2
    cache.append(K[:2, :60], V[:2, :60], batch_index=[0, 1])  # the freed pages are reused
    k_full, _ = cache.gather()
    assert torch.equal(k_full[:2, :60], K[:2, :60]) and torch.equal(k_full[2, :21], K[2, :21])


def test_bad_softmax_scale_is_refused_before_anything_is_written():
    cache = cpattn.ShardedKVCache(1, 32, 1, 16)
    q = torch.randn(1, 1, 2, 16)
    kv = torch.randn(1, 1, 1, 16)
    with pytest.raises(TypeError, match="softmax scale must be a float"):
        cpattn.decode(cache, q, kv, kv, softmax_scale="0.5")
    assert int(cache.seqlens[0]) == 0
