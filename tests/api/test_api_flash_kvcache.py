"""flash_attn_with_kvcache and flash_attn_varlen_func with block_table against a float64
reference written from the same cache: flash-attn's kvcache test cases (contiguous and paged
caches, with and without new k/v, one and several queries, causal, windows, GQA/MQA, rotary
embedding interleaved and not, cache_batch_idx, cache_leftpad, softcap, num_splits), the
in-place cache update checked exactly, bad input raising with the cache left as it was."""
import itertools

import pytest
import torch
import torch.nn.functional as F

import cpattn
from reference import reference_attention, reference_varlen

NAN = float("nan")


def _t(*shape, gen, dtype=torch.float32):
    return torch.randn(*shape, generator=gen).to(dtype)


def rotate_reference(x, cos, sin, positions, interleaved):
    """float64 rotary embedding as complex multiplication: pair (a, b) is the number a + ib,
    turned by cos + i sin at its position. Pairs: dims (2i, 2i + 1) interleaved, else
    (i, i + rotary_dim / 2). x (B, S, H, D), positions (B, S)."""
    x = x.double()
    half = cos.shape[1]
    turn = torch.complex(cos.double()[positions], sin.double()[positions])[:, :, None, :]  # (B, S, 1, half)
    head = x[..., :2 * half]
    if interleaved:
        z = torch.view_as_complex(head.reshape(*head.shape[:-1], half, 2).contiguous()) * turn
        head = torch.view_as_real(z).flatten(-2)
    else:
        z = torch.complex(head[..., :half], head[..., half:]) * turn
        head = torch.cat([z.real, z.imag], dim=-1)
    return torch.cat([head, x[..., 2 * half:]], dim=-1)


def reference_kvcache(q, k_rows, v_rows, total, first, causal, window, softcap):
    """float64 (out, lse) of q (B, Sq, H, D) over k_rows[b] (capacity, Hkv, D) slots first[b] .. total[b] - 1,
    key position = slot, query i at total[b] - Sq + i (bottom-right)."""
    outs, lses = [], []
    for b in range(q.shape[0]):
        lo, hi = int(first[b]), int(total[b])
        out, lse = reference_attention(q[b:b + 1].double(), k_rows[b:b + 1, lo:hi].double(),
                                       v_rows[b:b + 1, lo:hi].double(), causal=causal, q_start=hi - q.shape[1],
                                       k_start=lo, window_size=window, softcap=softcap)
        outs.append(out)
        lses.append(lse)
    return torch.cat(outs), torch.cat(lses)


def paged_copy(k_cache, v_cache, lengths, page_size, gen):
    """The same caches as pools of shuffled pages (NaN where no sequence has a key) and their block table."""
    batch, capacity = k_cache.shape[:2]
    per_seq = -(-capacity // page_size)
    num_pages = batch * per_seq + 2
    table = torch.randperm(num_pages, generator=gen)[:batch * per_seq].view(batch, per_seq).to(torch.int32)
    pools = [torch.full((num_pages, page_size, *k_cache.shape[2:]), NAN, dtype=k_cache.dtype) for _ in range(2)]
    for pool, cache in zip(pools, (k_cache, v_cache)):
        for b in range(batch):
            for slot in range(int(lengths[b])):
                pool[table[b, slot // page_size], slot % page_size] = cache[b, slot]
    return *pools, table


def logical_rows(pool, table, capacity):
    """(batch, capacity, Hkv, D): the pages of each table row laid end to end."""
    return pool[table.long()].flatten(1, 2)[:, :capacity]


MASKS = {"none": (False, (-1, -1)), "causal": (True, (-1, -1)), "window": (False, (5, 2)),
         "causal+window": (True, (4, -1))}
LAYOUTS = ["contiguous", "paged", "batch_idx", "leftpad", "batch_idx+leftpad"]
CASES = list(itertools.product(LAYOUTS, [False, True], [1, 3], MASKS))


@pytest.mark.parametrize("layout,new_kv,seqlen_q,mask", CASES)
def test_kvcache_vs_float64(layout, new_kv, seqlen_q, mask):
    i = CASES.index((layout, new_kv, seqlen_q, mask))
    gen = torch.Generator().manual_seed(i)
    # Cycled through the cases with coprime periods: head layout (MHA, GQA, MQA), head dim (odd sizes among
    # them), rotary (none, interleaved, NeoX, on part of the head), softcap, num_splits, seqlen_new < seqlen_q.
    heads, heads_kv = [(4, 4), (6, 2), (4, 1)][i % 3]
    head_dim = [16, 40, 24, 32][i % 4]
    rotary_dim, interleaved = [(0, True), (head_dim, True), (head_dim, False), (16, False), (16, True)][i % 5]
    softcap = 4.0 if i % 7 in (2, 5) else 0.0
    num_splits = [0, 1, 3][(i // 2) % 3]
    seqlen_new = (seqlen_q - 1 if seqlen_q > 1 and i % 7 == 0 else seqlen_q) if new_kv else 0
    causal, window = MASKS[mask]
    batch, capacity = 3, 37
    leftpad = "leftpad" in layout
    cache_rows = batch + 2 if "batch_idx" in layout else batch

    q = _t(batch, seqlen_q, heads, head_dim, gen=gen)
    k_cache = _t(cache_rows, capacity, heads_kv, head_dim, gen=gen)
    v_cache = _t(cache_rows, capacity, heads_kv, head_dim, gen=gen)
    old = torch.tensor([0, 9, capacity - seqlen_new], dtype=torch.int32)  # empty, short, full after the update
    old = old[torch.randperm(batch, generator=gen)]
    rows = torch.randperm(cache_rows, generator=gen)[:batch].to(torch.int32) if "batch_idx" in layout else None
    row_of = rows.long() if rows is not None else torch.arange(batch)
    first = torch.tensor([min(int(n), 4 + b) for b, n in enumerate(old)], dtype=torch.int32) if leftpad else None
    for b in range(batch):  # slots nobody may read: before the first key and after the last
        r = int(row_of[b])
        k_cache[r, int(old[b]) + seqlen_new:] = NAN
        v_cache[r, int(old[b]) + seqlen_new:] = NAN
        if leftpad:
            k_cache[r, :int(first[b])] = NAN
            v_cache[r, :int(first[b])] = NAN
    k = _t(batch, seqlen_new, heads_kv, head_dim, gen=gen) if new_kv else None
    v = _t(batch, seqlen_new, heads_kv, head_dim, gen=gen) if new_kv else None
    cos = sin = None
    if rotary_dim and new_kv:
        angle = torch.rand(capacity + seqlen_q, rotary_dim // 2, generator=gen, dtype=torch.float64) * 6.3
        cos, sin = angle.cos().float(), angle.sin().float()

    # What the call must leave in the cache, and what it attends to (float64, from the same cache).
    expect_k, expect_v = k_cache.clone(), v_cache.clone()
    q_ref, k_new = q.double(), None if k is None else k.double()
    if cos is not None:
        q_pos = old[:, None].long() + (torch.arange(seqlen_q) if causal or window != (-1, -1) else 0)
        q_ref = rotate_reference(q, cos, sin, q_pos.expand(batch, seqlen_q), interleaved)
        k_new = rotate_reference(k, cos, sin, old[:, None].long() + torch.arange(seqlen_new), interleaved)
    ref_k, ref_v = expect_k.double(), expect_v.double()
    for b in range(batch):
        slots = slice(int(old[b]), int(old[b]) + seqlen_new)
        if new_kv:
            expect_k[row_of[b], slots], expect_v[row_of[b], slots] = k_new[b].float(), v[b]
            ref_k[row_of[b], slots], ref_v[row_of[b], slots] = k_new[b], v[b].double()
    total = old + seqlen_new
    ref_out, ref_lse = reference_kvcache(q_ref, ref_k[row_of], ref_v[row_of], total,
                                         first if leftpad else torch.zeros(batch), causal, window, softcap)

    kwargs = dict(rotary_cos=cos, rotary_sin=sin, cache_seqlens=old.clone(), cache_batch_idx=rows,
                  cache_leftpad=first, causal=causal, window_size=window, softcap=softcap,
                  rotary_interleaved=interleaved, num_splits=num_splits, return_softmax_lse=True)
    if layout == "paged":
        pool_k, pool_v, table = paged_copy(k_cache, v_cache, old, 16, gen)
        out, lse = cpattn.flash_attn_with_kvcache(q, pool_k, pool_v, k, v, block_table=table, **kwargs)
        got_k, got_v = logical_rows(pool_k, table, capacity), logical_rows(pool_v, table, capacity)
    else:
        out, lse = cpattn.flash_attn_with_kvcache(q, k_cache, v_cache, k, v, **kwargs)
        got_k, got_v = k_cache, v_cache

    assert torch.equal(kwargs["cache_seqlens"], old)  # the caller's lengths are not advanced
    # The cache: exactly as expected, NaN for NaN (rotated keys: to fp32 rounding of the float64 rotation).
    live = torch.zeros(got_k.shape[:2], dtype=torch.bool)
    for b in range(batch):
        live[row_of[b], :int(total[b])] = True
    if cos is None:
        assert torch.equal(got_k.nan_to_num(7.0), expect_k.nan_to_num(7.0))
    else:
        torch.testing.assert_close(got_k, expect_k, atol=1e-6, rtol=1e-6, equal_nan=True)
        assert torch.equal(got_k[~live].nan_to_num(7.0), expect_k[~live].nan_to_num(7.0))
    assert torch.equal(got_v.nan_to_num(7.0), expect_v.nan_to_num(7.0))
    torch.testing.assert_close(out.double(), ref_out, atol=2e-5, rtol=2e-5)
    assert lse.shape == (batch, heads, seqlen_q) and lse.dtype == torch.float32
    assert torch.equal(torch.isfinite(lse), torch.isfinite(ref_lse))
    torch.testing.assert_close(lse.double()[torch.isfinite(ref_lse)], ref_lse[torch.isfinite(ref_lse)],
                               atol=2e-5, rtol=2e-5)


def test_returns_and_cache_seqlens_forms():
    """out alone by default; cache_seqlens as an int is every sequence's length, None is the whole cache."""
    gen = torch.Generator().manual_seed(1)
    q, k_cache, v_cache = _t(2, 2, 4, 16, gen=gen), _t(2, 20, 2, 16, gen=gen), _t(2, 20, 2, 16, gen=gen)
    out = cpattn.flash_attn_with_kvcache(q, k_cache, v_cache, cache_seqlens=11, causal=True)
    assert isinstance(out, torch.Tensor) and out.shape == q.shape
    as_tensor = torch.full((2,), 11, dtype=torch.int32)
    assert torch.equal(out, cpattn.flash_attn_with_kvcache(q, k_cache, v_cache, cache_seqlens=as_tensor, causal=True))
    whole, lse = cpattn.flash_attn_with_kvcache(q, k_cache, v_cache, return_softmax_lse=True)
    ref_out, ref_lse = reference_kvcache(q, k_cache, v_cache, [20, 20], [0, 0], False, (-1, -1), 0.0)
    torch.testing.assert_close(whole.double(), ref_out, atol=2e-5, rtol=2e-5)
    torch.testing.assert_close(lse.double(), ref_lse, atol=2e-5, rtol=2e-5)


def test_cache_views_of_one_kv_tensor_are_written_through():
    """k_cache and v_cache as strided views of one (B, S, 2, Hkv, D) tensor, q a transposed view: the
    new keys land in the shared tensor, the output is the contiguous call's."""
    gen = torch.Generator().manual_seed(9)
    kv = _t(2, 20, 2, 2, 16, gen=gen)
    q = _t(2, 4, 2, 16, gen=gen).transpose(1, 2)  # (B, Sq=2, H=4, D) with odd strides
    k, v = _t(2, 2, 2, 16, gen=gen), _t(2, 2, 2, 16, gen=gen)
    lens = torch.tensor([5, 17], dtype=torch.int32)
    k_flat, v_flat = kv[:, :, 0].contiguous(), kv[:, :, 1].contiguous()
    want = cpattn.flash_attn_with_kvcache(q.contiguous(), k_flat, v_flat, k, v, cache_seqlens=lens, causal=True)
    got = cpattn.flash_attn_with_kvcache(q, kv[:, :, 0], kv[:, :, 1], k, v, cache_seqlens=lens, causal=True)
    assert torch.equal(got, want)
    assert torch.equal(kv[:, :, 0], k_flat) and torch.equal(kv[:, :, 1], v_flat)
    assert torch.equal(kv[1, 17:19, 0], k[1]) and torch.equal(kv[0, 5:7, 1], v[0])


def test_queries_before_the_first_key_see_nothing():
    """Causal with more queries than keys: the first rows sit before position 0 (out 0, lse -inf), as in
    flash-attn's bottom-right mask; an empty sequence gives every row out 0."""
    gen = torch.Generator().manual_seed(2)
    q, k_cache, v_cache = _t(2, 4, 2, 16, gen=gen), _t(2, 8, 1, 16, gen=gen), _t(2, 8, 1, 16, gen=gen)
    lens = torch.tensor([2, 0], dtype=torch.int32)
    out, lse = cpattn.flash_attn_with_kvcache(q, k_cache, v_cache, cache_seqlens=lens, causal=True,
                                             return_softmax_lse=True)
    ref_out, ref_lse = reference_kvcache(q, k_cache, v_cache, lens, [0, 0], True, (-1, -1), 0.0)
    assert torch.equal(torch.isinf(lse), torch.isinf(ref_lse)) and int(torch.isinf(lse).sum()) == 2 * 2 + 4 * 2
    assert torch.all(out[0, :2] == 0) and torch.all(out[1] == 0)
    torch.testing.assert_close(out.double(), ref_out, atol=2e-5, rtol=2e-5)


def test_a_prefill_chunk_spans_several_query_tiles():
    """A chunk of 21 new tokens (63 query rows per kv head with GQA 3) appended to a paged cache and attended
    causally with a window: several tiles of query rows, each with its own key range."""
    gen = torch.Generator().manual_seed(10)
    batch, seqlen_q, heads, heads_kv, head_dim = 2, 21, 6, 2, 16
    q = _t(batch, seqlen_q, heads, head_dim, gen=gen)
    k, v = _t(batch, seqlen_q, heads_kv, head_dim, gen=gen), _t(batch, seqlen_q, heads_kv, head_dim, gen=gen)
    k_cache, v_cache = _t(batch, 64, heads_kv, head_dim, gen=gen), _t(batch, 64, heads_kv, head_dim, gen=gen)
    old = torch.tensor([0, 37], dtype=torch.int32)
    pool_k, pool_v, table = paged_copy(k_cache, v_cache, old, 16, gen)
    out, lse = cpattn.flash_attn_with_kvcache(q, pool_k, pool_v, k, v, cache_seqlens=old, block_table=table,
                                             causal=True, window_size=(9, -1), return_softmax_lse=True)
    keys, values = k_cache.double(), v_cache.double()
    for b in range(batch):
        keys[b, int(old[b]):int(old[b]) + seqlen_q], values[b, int(old[b]):int(old[b]) + seqlen_q] = k[b], v[b]
    ref_out, ref_lse = reference_kvcache(q, keys, values, old + seqlen_q, [0, 0], True, (9, -1), 0.0)
    torch.testing.assert_close(out.double(), ref_out, atol=2e-5, rtol=2e-5)
    torch.testing.assert_close(lse.double(), ref_lse, atol=2e-5, rtol=2e-5)


def _masked_sdpa(q, k_rows, v_rows, total, causal):
    """torch SDPA (q's dtype) per sequence over its first total[b] keys, bottom-right causal."""
    outs = []
    for b in range(q.shape[0]):
        n, sq = int(total[b]), q.shape[1]
        mask = torch.ones(sq, n, dtype=torch.bool)
        if causal:
            mask = torch.arange(n)[None, :] <= (n - sq + torch.arange(sq))[:, None]
        out = F.scaled_dot_product_attention(q[b:b + 1].transpose(1, 2), k_rows[b:b + 1, :n].transpose(1, 2),
                                             v_rows[b:b + 1, :n].transpose(1, 2), attn_mask=mask, enable_gqa=True)
        outs.append(out.transpose(1, 2))
    return torch.cat(outs)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_low_precision_within_twice_torch_error(dtype):
    """flash-attn's rule: our error against float64 at most about twice torch's in the same dtype (rotary
    embedding and the cache update included)."""
    gen = torch.Generator().manual_seed(3)
    batch, seqlen_q, heads, heads_kv, head_dim, capacity = 2, 3, 4, 2, 64, 96
    q = _t(batch, seqlen_q, heads, head_dim, gen=gen, dtype=dtype)
    k, v = (_t(batch, seqlen_q, heads_kv, head_dim, gen=gen, dtype=dtype) for _ in range(2))
    k_cache, v_cache = (_t(batch, capacity, heads_kv, head_dim, gen=gen, dtype=dtype) for _ in range(2))
    angle = torch.rand(capacity, 16, generator=gen, dtype=torch.float64) * 6.3
    cos, sin = angle.cos().to(dtype), angle.sin().to(dtype)
    old = torch.tensor([40, 93], dtype=torch.int32)
    new_slots = old[:, None].long() + torch.arange(seqlen_q)
    q_exact = rotate_reference(q, cos, sin, new_slots, False)
    k_exact = rotate_reference(k, cos, sin, new_slots, False)
    keys, values = k_cache.double(), v_cache.double()
    for b in range(batch):
        keys[b, new_slots[b]], values[b, new_slots[b]] = k_exact[b], v[b].double()
    exact, _ = reference_kvcache(q_exact, keys, values, old + seqlen_q, [0, 0], True, (-1, -1), 0.0)
    theirs = _masked_sdpa(q_exact.to(dtype), keys.to(dtype), values.to(dtype), old + seqlen_q, True)
    ours = cpattn.flash_attn_with_kvcache(q, k_cache, v_cache, k, v, cos, sin, old, causal=True,
                                          rotary_interleaved=False)
    assert ours.dtype == dtype
    err_ours, err_torch = ((x.double() - exact).abs().max().item() for x in (ours, theirs))
    assert err_ours <= 2 * err_torch + 1e-5, f"ours {err_ours:.3g} vs torch {err_torch:.3g}"
    for b in range(batch):  # the cache holds the new values exactly and the rotated keys rounded once
        assert torch.equal(v_cache[b, new_slots[b]], v[b])
        torch.testing.assert_close(k_cache[b, new_slots[b]].double(), k_exact[b], atol=1e-6,
                                   rtol=torch.finfo(dtype).eps)


def _bad_call_inputs():
    gen = torch.Generator().manual_seed(4)
    q = _t(2, 1, 4, 32, gen=gen)
    k, v = _t(2, 1, 2, 32, gen=gen), _t(2, 1, 2, 32, gen=gen)
    k_cache, v_cache = _t(2, 24, 2, 32, gen=gen), _t(2, 24, 2, 32, gen=gen)
    pool_k, pool_v = _t(5, 16, 2, 32, gen=gen), _t(5, 16, 2, 32, gen=gen)
    table = torch.tensor([[0, 1], [3, 4]], dtype=torch.int32)
    lens = torch.tensor([3, 20], dtype=torch.int32)
    cos, sin = torch.ones(24, 8), torch.zeros(24, 8)
    return dict(q=q, k_cache=k_cache, v_cache=v_cache, k=k, v=v, cache_seqlens=lens), \
        dict(q=q, k_cache=pool_k, v_cache=pool_v, k=k, v=v, cache_seqlens=lens, block_table=table), (cos, sin)


I32 = dict(dtype=torch.int32)
BAD_CALLS = [  # (paged, changes to the arguments, exception, message)
    (False, dict(alibi_slopes=torch.zeros(4)), NotImplementedError, "alibi_slopes"),
    (False, dict(q=torch.zeros(2, 4, 32)), ValueError, "q must be 4-D"),
    (False, dict(k_cache=torch.zeros(2, 24, 2, 32, dtype=torch.float16)), TypeError, "share one dtype"),
    (False, dict(v_cache=torch.zeros(2, 23, 2, 32)), ValueError, "k_cache and v_cache shapes differ"),
    (False, dict(q=torch.zeros(2, 1, 3, 32)), ValueError, r"query heads \(3\) must be a multiple of kv heads"),
    (False, dict(q=torch.zeros(2, 1, 4, 16)), ValueError, "head dims differ"),
    (False, dict(v=None), ValueError, "both k and v"),
    (False, dict(k=torch.zeros(2, 1, 1, 32), v=torch.zeros(2, 1, 1, 32)), ValueError, "k and v have 1 heads"),
    (False, dict(k=torch.zeros(3, 1, 2, 32), v=torch.zeros(3, 1, 2, 32)), ValueError, "batch sizes differ"),
    (False, dict(cache_seqlens=None), ValueError, "need cache_seqlens"),
    (False, dict(cache_seqlens=torch.tensor([3, 20])), TypeError, "cache_seqlens must be an int32 tensor"),
    (False, dict(cache_seqlens=torch.tensor([3, 20, 1], **I32)), TypeError, r"shape \(2,\)"),
    (False, dict(cache_seqlens=torch.tensor([-1, 20], **I32)), ValueError, "cache_seqlens must be >= 0"),
    (False, dict(cache_seqlens=torch.tensor([3, 24], **I32)), ValueError, "exceeds the cache's 24 slots"),
    (False, dict(cache_seqlens=2.0), TypeError, "cache_seqlens must be an int32 tensor"),
    (False, dict(k_cache=torch.zeros(3, 24, 2, 32), v_cache=torch.zeros(3, 24, 2, 32)), ValueError,
     "k_cache has 3 rows but q a batch of 2"),
    (False, dict(cache_batch_idx=torch.tensor([0, 2], **I32)), ValueError, r"cache_batch_idx\[1\] = 2 is not a row"),
    (False, dict(cache_batch_idx=torch.tensor([0, 1])), TypeError, "cache_batch_idx must be an int32 tensor"),
    (False, dict(cache_leftpad=torch.tensor([4, 0], **I32)), ValueError, r"cache_leftpad\[0\] = 4 must be between"),
    (False, dict(k=None, v=None, rotary="cos only"), ValueError, "both rotary_cos and rotary_sin"),
    (False, dict(k=None, v=None, rotary="both"), ValueError, "rotary embedding needs the new k and v"),
    (False, dict(rotary=(torch.ones(24, 17), torch.ones(24, 17))), ValueError, "rotary_dim .* between 2 and"),
    (False, dict(rotary=(torch.ones(24, 8), torch.ones(24, 4))), ValueError, "rotary_cos and rotary_sin shapes"),
    (False, dict(rotary=(torch.ones(24, 8, dtype=torch.int32),) * 2), TypeError, "rotary_cos has dtype"),
    (False, dict(rotary=(torch.ones(20, 8), torch.ones(20, 8))), ValueError, "up to position 20"),
    (False, dict(num_splits=-1), ValueError, "num_splits must be 0"),
    (False, dict(num_splits=129), ValueError, "num_splits must be 0"),
    (False, dict(num_splits=True), TypeError, "num_splits must be an int"),
    (False, dict(window_size=(-2, 0)), ValueError, "window_size left"),
    (False, dict(softcap=-1.0), ValueError, "softcap"),
    (False, dict(softmax_scale="0.1"), TypeError, "softmax scale"),
    (True, dict(cache_batch_idx=torch.tensor([0, 1], **I32)), ValueError, "cache_batch_idx cannot be combined"),
    (True, dict(cache_leftpad=torch.tensor([0, 1], **I32)), ValueError, "cache_leftpad cannot be combined"),
    (True, dict(k_cache=torch.zeros(5, 8, 2, 32), v_cache=torch.zeros(5, 8, 2, 32)), ValueError,
     "power of two >= 16, got 8"),
    (True, dict(k_cache=torch.zeros(5, 24, 2, 32), v_cache=torch.zeros(5, 24, 2, 32)), ValueError,
     "power of two >= 16, got 24"),
    (True, dict(block_table=torch.tensor([[0, 1], [3, 4]])), TypeError, "block_table must be an int32 tensor"),
    (True, dict(block_table=torch.tensor([0, 1], **I32)), TypeError, "block_table must be a 2-D int32 tensor"),
    (True, dict(block_table=torch.tensor([[0], [3]], **I32)), ValueError, "exceeds the cache's 16 slots"),
    (True, dict(block_table=torch.tensor([[0, 1], [3, 5]], **I32)), ValueError, "points outside the 5 pages"),
    (True, dict(cache_seqlens=torch.tensor([3, 32], **I32)), ValueError, "exceeds the cache's 32 slots"),
]


@pytest.mark.parametrize("paged,changes,exc,match", BAD_CALLS, ids=[c[3][:30] for c in BAD_CALLS])
def test_bad_input_raises_and_leaves_the_cache_as_it_was(paged, changes, exc, match):
    contiguous, paged_args, (cos, sin) = _bad_call_inputs()
    args = dict(paged_args if paged else contiguous)
    changes = dict(changes)
    rotary = changes.pop("rotary", None)
    if rotary == "cos only":
        args["rotary_cos"] = cos
    elif rotary == "both":
        args["rotary_cos"], args["rotary_sin"] = cos, sin
    elif rotary is not None:
        args["rotary_cos"], args["rotary_sin"] = rotary
    args.update(changes)
    before = {name: t.clone() for name, t in args.items() if isinstance(t, torch.Tensor)}
    with pytest.raises(exc, match=match):
        cpattn.flash_attn_with_kvcache(**args)
    for name, t in before.items():
        assert torch.equal(args[name], t), f"{name} was modified"


def test_gradients_are_refused():
    """No backward (as in flash-attn): a call autograd would record raises instead of returning an output
    that silently carries no gradient; under no_grad the same call works."""
    gen = torch.Generator().manual_seed(5)
    q, k_cache, v_cache = _t(1, 1, 2, 16, gen=gen), _t(1, 16, 2, 16, gen=gen), _t(1, 16, 2, 16, gen=gen)
    q.requires_grad_()
    with pytest.raises(NotImplementedError, match="no backward"):
        cpattn.flash_attn_with_kvcache(q, k_cache, v_cache, cache_seqlens=4)
    with torch.no_grad():
        assert cpattn.flash_attn_with_kvcache(q, k_cache, v_cache, cache_seqlens=4).shape == q.shape


def test_decode_loop_compiles_with_fullgraph():
    """A decode loop (paged cache, rotary embedding, new keys written in place) under
    torch.compile(fullgraph=True): one graph for every step, outputs and cache equal to eager."""
    torch._dynamo.reset()
    gen = torch.Generator().manual_seed(6)
    batch, heads, heads_kv, head_dim = 2, 4, 2, 16
    pool_k, pool_v = _t(6, 16, heads_kv, head_dim, gen=gen), _t(6, 16, heads_kv, head_dim, gen=gen)
    table = torch.tensor([[4, 0, 2], [1, 5, 3]], dtype=torch.int32)
    angle = torch.rand(48, 8, generator=gen)
    cos, sin = angle.cos(), angle.sin()
    lens = torch.tensor([7, 30], dtype=torch.int32)

    def step(q, k, v, k_cache, v_cache, lens):
        return cpattn.flash_attn_with_kvcache(q, k_cache, v_cache, k, v, cos, sin, lens, block_table=table,
                                             causal=True, window_size=(12, 0), return_softmax_lse=True)

    compiled = torch.compile(step, fullgraph=True, dynamic=False)
    graphs = torch._dynamo.utils.counters["stats"]["unique_graphs"]
    eager_k, eager_v = pool_k.clone(), pool_v.clone()
    for _ in range(3):
        q = _t(batch, 1, heads, head_dim, gen=gen)
        k, v = _t(batch, 1, heads_kv, head_dim, gen=gen), _t(batch, 1, heads_kv, head_dim, gen=gen)
        got = compiled(q, k, v, pool_k, pool_v, lens)
        want = step(q, k, v, eager_k, eager_v, lens)
        for a, b in zip(got, want):
            torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-6)
        torch.testing.assert_close(pool_k, eager_k, atol=1e-6, rtol=1e-6)
        assert torch.equal(pool_v, eager_v)
        lens = lens + 1
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] == graphs + 1
    torch._dynamo.reset()


# ---- flash_attn_varlen_func with block_table ---------------------------------------------------------------
def _paged_documents(lens_k, page_size, heads_kv, head_dim, gen):
    """Packed keys/values (total_k, Hkv, D) and the same keys in a shuffled page pool with its table."""
    k, v = (_t(sum(lens_k), heads_kv, head_dim, gen=gen) for _ in range(2))
    per_doc = max(1, -(-max(lens_k) // page_size))
    num_pages = len(lens_k) * per_doc + 1
    table = torch.randperm(num_pages, generator=gen)[:len(lens_k) * per_doc].view(len(lens_k), per_doc)
    pool_k, pool_v = (torch.full((num_pages, page_size, heads_kv, head_dim), NAN) for _ in range(2))
    start = 0
    for b, n in enumerate(lens_k):
        for j in range(n):
            pool_k[table[b, j // page_size], j % page_size] = k[start + j]
            pool_v[table[b, j // page_size], j % page_size] = v[start + j]
        start += n
    return k, v, pool_k, pool_v, table.to(torch.int32)


def _cu(lens):
    return torch.tensor([0, *itertools.accumulate(lens)], dtype=torch.int32)


@pytest.mark.parametrize("causal,window,softcap,heads", [
    (False, (-1, -1), 0.0, (4, 2)), (True, (-1, -1), 0.0, (6, 2)), (True, (3, -1), 5.0, (4, 1)),
    (False, (2, 1), 0.0, (3, 3)),
])
def test_varlen_block_table_vs_float64(causal, window, softcap, heads):
    """Documents with more queries than keys, an empty one, single-token decodes next to a long prefill;
    max_seqlen_q larger than any document (padding rows); NaN in every slot no document owns."""
    gen = torch.Generator().manual_seed(7)
    lens_q, lens_k = [3, 1, 0, 5, 1, 9], [20, 1, 4, 3, 40, 9]
    (h, h_kv), head_dim = heads, 24
    k, v, pool_k, pool_v, table = _paged_documents(lens_k, 16, h_kv, head_dim, gen)
    q = _t(sum(lens_q), h, head_dim, gen=gen)
    cu_q, cu_k = _cu(lens_q), _cu(lens_k)
    sinks = torch.randn(h, generator=gen) if causal else None
    out, lse, probs = cpattn.flash_attn_varlen_func(q, pool_k, pool_v, cu_q, cu_k, 12, 40, 0.0, None, causal,
                                                    window, softcap, None, False, True, table, sinks=sinks)
    ref_out, ref_lse = reference_varlen(q, k, v, cu_q, cu_k, causal=causal, window_size=window, softcap=softcap,
                                        sinks=sinks)
    assert probs is None and out.shape == q.shape and lse.shape == (h, sum(lens_q))
    torch.testing.assert_close(out.double(), ref_out, atol=2e-5, rtol=2e-5)
    assert torch.equal(torch.isfinite(lse), torch.isfinite(ref_lse))
    torch.testing.assert_close(lse.double()[torch.isfinite(ref_lse)], ref_lse[torch.isfinite(ref_lse)],
                               atol=2e-5, rtol=2e-5)


def test_varlen_block_table_refuses_gradients_and_bad_tables():
    gen = torch.Generator().manual_seed(8)
    k, v, pool_k, pool_v, table = _paged_documents([5, 17], 16, 2, 16, gen)
    q, cu_q, cu_k = _t(3, 2, 16, gen=gen), _cu([1, 2]), _cu([5, 17])
    call = cpattn.flash_attn_varlen_func
    with pytest.raises(NotImplementedError, match="no backward"):
        call(q.requires_grad_(), pool_k, pool_v, cu_q, cu_k, 2, 17, block_table=table)
    q = q.detach()
    with pytest.raises(ValueError, match="17 keys = 2 pages, but block_table has 1"):
        call(q, pool_k, pool_v, cu_q, cu_k, 2, 17, block_table=table[:, :1].contiguous())
    with pytest.raises(ValueError, match="points outside"):
        call(q, pool_k, pool_v, cu_q, cu_k, 2, 17, block_table=table + 10)
    with pytest.raises(TypeError, match=r"block_table must be an int32 tensor of shape \(2, 2\)"):
        call(q, pool_k, pool_v, cu_q, cu_k, 2, 17, block_table=table[:1])
    with pytest.raises(ValueError, match="power of two >= 16, got 8"):
        call(q, pool_k[:, :8], pool_v[:, :8], cu_q, cu_k, 2, 17, block_table=table)
    with pytest.raises(ValueError, match="longer than max_seqlen 16"):
        call(q, pool_k, pool_v, cu_q, cu_k, 2, 16, block_table=table)
