"""The split-KV decode kernel against a float64 reference (CPU, Triton interpreter)."""
import pytest
import torch

from cpattn.kernels import decode_attention, merge_splits
from reference import reference_decode, reference_merge


def reference(q, k, v, lens, q_start, key_pos=None, causal=True, window_left=-1, softcap=0.0, sinks=None):
    """The float64 decode reference (``cpattn.kernels.reference``) with this file's arguments: key j
    at key_pos[j], a window bounded on the left only."""
    return reference_decode(q, k, v, lens, q_start=q_start, key_positions=key_pos, causal=causal,
                            window_size=(window_left, -1), softcap=softcap, sinks=sinks)


def to_paged(k, v, page_size, gen):
    """Scatter a contiguous cache into shuffled pages; returns pool k, v and the block table."""
    batch, capacity = k.shape[:2]
    pages_per_seq = -(-capacity // page_size)
    num_pages = batch * pages_per_seq + 3  # a few pages nobody uses
    perm = torch.randperm(num_pages, generator=gen)[: batch * pages_per_seq].view(batch, pages_per_seq)
    kp = torch.full((num_pages, page_size, *k.shape[2:]), float("nan"))  # unused slots must never be read
    vp = kp.clone()
    for b in range(batch):
        for i in range(pages_per_seq):
            n = min(page_size, capacity - i * page_size)
            kp[perm[b, i], :n] = k[b, i * page_size: i * page_size + n]
            vp[perm[b, i], :n] = v[b, i * page_size: i * page_size + n]
    return kp, vp, perm.to(torch.int32)


def close(out, lse, ref_out, ref_lse):
    torch.testing.assert_close(out.double(), ref_out, atol=2e-5, rtol=2e-5)
    finite = torch.isfinite(ref_lse)
    assert torch.equal(torch.isfinite(lse), finite)
    torch.testing.assert_close(lse.double()[finite], ref_lse[finite], atol=2e-5, rtol=2e-5)


@pytest.mark.parametrize("head_dim", [32, 80, 128])
@pytest.mark.parametrize("seqlen_q", [1, 4])
def test_decode_vs_float64(head_dim, seqlen_q):
    gen = torch.Generator().manual_seed(head_dim * 10 + seqlen_q)
    batch, heads, heads_kv, capacity = 3, 4, 2, 80  # GQA group 2
    q = torch.randn(batch, seqlen_q, heads, head_dim, generator=gen)
    k = torch.randn(batch, capacity, heads_kv, head_dim, generator=gen)
    v = torch.randn(batch, capacity, heads_kv, head_dim, generator=gen)
    lens = torch.tensor([seqlen_q, 45, 80], dtype=torch.int32)  # per-sequence lengths, one barely long enough
    ref_out, ref_lse = reference(q, k, v, lens, lens - seqlen_q)
    for splits in (1, 3):
        close(*decode_attention(q, k, v, lens, num_splits=splits), ref_out, ref_lse)
    kp, vp, table = to_paged(k, v, 16, gen)
    close(*decode_attention(q, kp, vp, lens, block_table=table, num_splits=2), ref_out, ref_lse)


def test_gqa_groups_and_mqa():
    gen = torch.Generator().manual_seed(1)
    for heads, heads_kv in [(8, 2), (6, 1), (2, 2)]:
        q = torch.randn(2, 2, heads, 32, generator=gen)
        k = torch.randn(2, 40, heads_kv, 32, generator=gen)
        v = torch.randn(2, 40, heads_kv, 32, generator=gen)
        lens = torch.tensor([40, 17], dtype=torch.int32)
        close(*decode_attention(q, k, v, lens), *reference(q, k, v, lens, lens - 2))


def test_page_sizes_and_tiles_straddling_pages():
    gen = torch.Generator().manual_seed(2)
    q = torch.randn(2, 1, 2, 32, generator=gen)
    k = torch.randn(2, 100, 1, 32, generator=gen)
    v = torch.randn(2, 100, 1, 32, generator=gen)
    lens = torch.tensor([100, 33], dtype=torch.int32)
    ref = reference(q, k, v, lens, lens - 1)
    for page_size in (16, 32, 64):
        kp, vp, table = to_paged(k, v, page_size, gen)
        close(*decode_attention(q, kp, vp, lens, block_table=table, num_splits=3), *ref)


@pytest.mark.parametrize("page_size", [32, 64])
def test_window_on_pages_holding_whole_key_tiles(page_size):
    """Pages of at least one key tile (32 slots on CPU) take one block-table entry per tile; with a
    window the first tile starts before the first visible key, and those keys are read and masked."""
    gen = torch.Generator().manual_seed(20 + page_size)
    q = torch.randn(2, 2, 4, 32, generator=gen)
    k, v = (torch.randn(2, 150, 2, 32, generator=gen) for _ in range(2))
    lens = torch.tensor([150, 77], dtype=torch.int32)
    kp, vp, table = to_paged(k, v, page_size, gen)
    out = decode_attention(q, kp, vp, lens, block_table=table, num_splits=2, window_size=(45, -1))
    close(*out, *reference(q, k, v, lens, lens - 2, window_left=45))


def test_positions_causal_noncausal_and_empty():
    gen = torch.Generator().manual_seed(3)
    q = torch.randn(3, 5, 2, 32, generator=gen)
    k = torch.randn(3, 48, 2, 32, generator=gen)
    v = torch.randn(3, 48, 2, 32, generator=gen)
    lens = torch.tensor([48, 0, 20], dtype=torch.int32)
    # Queries earlier than some cached keys (a prefill chunk in the middle of the cache).
    q_start = torch.tensor([10, 0, 30], dtype=torch.int32)
    out, lse = decode_attention(q, k, v, lens, q_start=q_start)
    close(out, lse, *reference(q, k, v, lens, q_start))
    assert torch.all(out[1] == 0) and torch.all(lse[1] == float("-inf"))  # no keys: (0, -inf)
    close(*decode_attention(q, k, v, lens, q_start=q_start, causal=False),
          *reference(q, k, v, lens, q_start, causal=False))


def test_striped_slot_positions():
    # Slots hold every 3rd stripe of 16 positions, starting at stripe 1: what rank 1 of 3 holds.
    gen = torch.Generator().manual_seed(4)
    stripe, ranks, rank = 16, 3, 1
    slots = torch.arange(64)
    key_pos = rank * stripe + (slots // stripe) * ranks * stripe + slots % stripe
    q = torch.randn(1, 3, 2, 32, generator=gen)
    k = torch.randn(1, 64, 2, 32, generator=gen)
    v = torch.randn(1, 64, 2, 32, generator=gen)
    lens = torch.tensor([64], dtype=torch.int32)
    q_start = torch.tensor([100], dtype=torch.int32)  # sees positions up to 100..102: slots up to 36ish
    out, lse = decode_attention(q, k, v, lens, q_start=q_start, slot_positions=(stripe, ranks * stripe, rank * stripe))
    close(out, lse, *reference(q, k, v, lens, q_start, key_pos=key_pos))


def test_fp16():
    gen = torch.Generator().manual_seed(5)
    q, k, v = (torch.randn(2, n, h, 64, generator=gen) for n, h in ((1, 4), (50, 2), (50, 2)))
    lens = torch.tensor([50, 31], dtype=torch.int32)
    out, lse = decode_attention(q.half(), k.half(), v.half(), lens, num_splits=2)
    assert out.dtype == torch.float16
    ref_out, ref_lse = reference(q.half(), k.half(), v.half(), lens, lens - 1)
    torch.testing.assert_close(out.double(), ref_out, atol=2e-3, rtol=2e-3)
    torch.testing.assert_close(lse.double(), ref_lse, atol=2e-3, rtol=2e-3)


def test_merge_splits_matches_whole():
    gen = torch.Generator().manual_seed(6)
    q = torch.randn(1, 2, 2, 32, generator=gen)
    k = torch.randn(1, 64, 2, 32, generator=gen)
    v = torch.randn(1, 64, 2, 32, generator=gen)
    full = torch.tensor([64], dtype=torch.int32)
    whole = decode_attention(q, k, v, full, causal=False)
    # Two disjoint halves, plus an empty partial, merged.
    a = decode_attention(q, k[:, :32], v[:, :32], torch.tensor([32], dtype=torch.int32), causal=False)
    b = decode_attention(q, k[:, 32:], v[:, 32:], torch.tensor([32], dtype=torch.int32), causal=False)
    empty = (torch.zeros_like(a[0]), torch.full_like(a[1], float("-inf")))
    out, lse = merge_splits(torch.stack([a[0], empty[0], b[0]]), torch.stack([a[1], empty[1], b[1]]))
    torch.testing.assert_close(out, whole[0], atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(lse, whole[1], atol=1e-6, rtol=1e-6)


def test_merge_splits_stays_exact_at_large_lse():
    """The fold keeps fp32 accuracy whatever the lse's size (a running lse rounded to fp32 after every
    fold lost 5e-4 here), reads +inf as an empty partial, and rounds a bf16 out to nearest."""
    gen = torch.Generator().manual_seed(8)
    outs = torch.randn(8, 2, 5, 3, 16, generator=gen)
    for centre in (4e4, -4e4):
        lses = centre + 3 * torch.randn(8, 2, 3, 5, generator=gen)
        lses[2, 0] = float("inf")
        lses[5, 1] = float("-inf")
        lses[:, 0, 0, 0] = float("inf")  # a row with no keys anywhere
        out, lse = merge_splits(outs, lses)
        ref_out, ref_lse = reference_merge(outs, lses)  # from the same fp32 inputs
        torch.testing.assert_close(out.double(), ref_out, rtol=2e-6, atol=2e-6)
        assert lse[0, 0, 0] == float("-inf") and (out[0, 0, 0] == 0).all()
        finite = torch.isfinite(ref_lse)
        assert ((lse.double() - ref_lse)[finite].abs() <= abs(centre) * 2.0 ** -23).all()  # within 1 ulp
        out16, _ = merge_splits(outs.bfloat16(), lses, out=torch.empty(out.shape, dtype=torch.bfloat16))
        assert torch.equal(out16, merge_splits(outs.bfloat16().float(), lses)[0].bfloat16())


def test_merge_splits_of_no_partials_is_empty():
    parts, part_lses = torch.zeros(0, 2, 3, 4, 8), torch.zeros(0, 2, 4, 3)
    out, lse = merge_splits(parts, part_lses)
    assert out.shape == (2, 3, 4, 8) and lse.shape == (2, 4, 3) and lse.dtype == torch.float32
    assert (out == 0).all() and (lse == float("-inf")).all()
    given = (torch.full((2, 3, 4, 8), 7.0, dtype=torch.float16), torch.full((2, 4, 3), 7.0))
    out, lse = merge_splits(parts, part_lses, *given)
    assert out is given[0] and lse is given[1]
    assert (out == 0).all() and (lse == float("-inf")).all()


def test_merge_splits_rejects_bad_input():
    parts, part_lses = torch.zeros(2, 1, 3, 4, 8), torch.zeros(2, 1, 4, 3)
    with pytest.raises(ValueError, match="out_parts must be"):
        merge_splits(parts[0], part_lses)
    with pytest.raises(ValueError, match="lse_parts must have shape"):
        merge_splits(parts, part_lses.transpose(2, 3))
    with pytest.raises(TypeError, match="lse_parts must be float32"):
        merge_splits(parts, part_lses.double())
    with pytest.raises(ValueError, match="out must have shape"):
        merge_splits(parts, part_lses, out=torch.zeros(1, 3, 4, 4))
    with pytest.raises(ValueError, match="lse must have shape"):
        merge_splits(parts, part_lses, lse=torch.zeros(1, 4, 4))
    with pytest.raises(TypeError, match="lse must be float32"):
        merge_splits(parts, part_lses, lse=torch.zeros(1, 4, 3, dtype=torch.float16))
    with pytest.raises(TypeError, match="out_parts must be a torch.Tensor"):
        merge_splits(parts.tolist(), part_lses)


def test_bad_input():
    q = torch.randn(2, 1, 4, 32)
    k = torch.randn(2, 40, 2, 32)
    lens = torch.tensor([40, 10], dtype=torch.int32)
    before = (q.clone(), k.clone(), lens.clone())
    with pytest.raises(ValueError, match="multiple of kv heads"):
        decode_attention(torch.randn(2, 1, 3, 32), k, k, lens)
    with pytest.raises(ValueError, match="head dims differ"):
        decode_attention(torch.randn(2, 1, 4, 16), k, k, lens)
    with pytest.raises(ValueError, match="exceed the cache capacity"):
        decode_attention(q, k, k, torch.tensor([41, 1], dtype=torch.int32))
    with pytest.raises(TypeError, match="cache_seqlens must be an int32"):
        decode_attention(q, k, k, lens.long())
    with pytest.raises(TypeError, match="share one dtype"):
        decode_attention(q.half(), k, k, lens)
    pool = torch.randn(6, 24, 2, 32)
    table = torch.tensor([[0, 1], [2, 3]], dtype=torch.int32)
    with pytest.raises(ValueError, match="power of two"):
        decode_attention(q, pool, pool, lens, block_table=table)
    pool = torch.randn(6, 16, 2, 32)
    with pytest.raises(ValueError, match="points outside the 6 pages"):
        decode_attention(q, pool, pool, torch.tensor([20, 10], dtype=torch.int32),
                         block_table=torch.tensor([[0, 6], [2, 3]], dtype=torch.int32))
    with pytest.raises(ValueError, match="block_table has 2 columns"):
        decode_attention(q, pool, pool, torch.tensor([40, 10], dtype=torch.int32), block_table=table)
    for t, t0 in zip((q, k, lens), before):
        assert torch.equal(t, t0)


@pytest.mark.parametrize("window", [0, 1, 17, 300])
def test_window_softcap_sinks_on_striped_pages(window):
    # Rank 1 of 2 with stripes of 16: the window's edge falls inside, between and across this rank's
    # stripes and pages; softcap 30 against logits of ~100; one sink small, one dominant.
    gen = torch.Generator().manual_seed(10 + window)
    stripe, ranks, rank, head_dim = 16, 2, 1, 40
    key_pos = rank * stripe + (torch.arange(96) // stripe) * ranks * stripe + torch.arange(96) % stripe
    q = torch.randn(3, 3, 4, head_dim, generator=gen) * 8.0
    k, v = (torch.randn(3, 96, 2, head_dim, generator=gen) for _ in range(2))
    lens = torch.tensor([0, 37, 96], dtype=torch.int32)
    q_start = torch.tensor([5, 90, 190], dtype=torch.int32)
    sinks = torch.tensor([-1.0, 0.5, 2.0, 30.0])
    kwargs = dict(q_start=q_start, slot_positions=(stripe, ranks * stripe, rank * stripe), window_size=(window, -1))
    for softcap, with_sinks in ((30.0, True), (0.0, False)):
        ref = reference(q, k, v, lens, q_start, key_pos=key_pos, window_left=window, softcap=softcap,
                        sinks=sinks if with_sinks else None)
        extra = dict(softcap=softcap, sinks=sinks if with_sinks else None)
        for splits in (1, 3):
            close(*decode_attention(q, k, v, lens, num_splits=splits, **kwargs, **extra), *ref)
        kp, vp, table = to_paged(k, v, 16, gen)
        close(*decode_attention(q, kp, vp, lens, block_table=table, num_splits=2, **kwargs, **extra), *ref)
    # The dominant sink takes (nearly) all the weight: out near 0, lse near the sink.
    out, lse = decode_attention(q, k, v, lens, sinks=sinks, **kwargs)
    assert out[..., 3, :].abs().max() < 1e-3 and torch.allclose(lse[:, 3], torch.full_like(lse[:, 3], 30.0), atol=1e-3)


def test_bad_local_attention_arguments():
    q, k = torch.randn(1, 1, 2, 16), torch.randn(1, 20, 1, 16)
    lens = torch.tensor([20], dtype=torch.int32)
    with pytest.raises(ValueError, match="window_size"):
        decode_attention(q, k, k, lens, window_size=(-2, -1))
    with pytest.raises(ValueError, match="softcap"):
        decode_attention(q, k, k, lens, softcap=-1.0)
    with pytest.raises(ValueError, match="sinks"):
        decode_attention(q, k, k, lens, sinks=torch.zeros(3))
    with pytest.raises(TypeError, match="sinks"):
        decode_attention(q, k, k, lens, sinks=torch.zeros(2, dtype=torch.int32))


def test_custom_ops_and_compiled_fixed_grid():
    """The kernels are torch custom ops (opcheck), and a compiled call (fullgraph: no host read,
    no graph break) keeps one graph while the lengths change, equal to eager."""
    gen = torch.Generator().manual_seed(7)
    q = torch.randn(2, 1, 4, 32, generator=gen)
    k, v = (torch.randn(2, 48, 2, 32, generator=gen) for _ in range(2))
    lens = torch.tensor([48, 20], dtype=torch.int32)
    positions = (lens - 1)[:, None]
    torch.library.opcheck(torch.ops.cpattn.decode_attention.default,
                          (q, k, v, lens, positions, None, None, 0.2, 20, 0, 0.0, [1, 1, 0], 3, torch.float32))
    parts, part_lses = torch.randn(3, 2, 1, 4, 32, generator=gen), torch.randn(3, 2, 4, 1, generator=gen)
    torch.library.opcheck(torch.ops.cpattn.merge_splits.default, (parts, part_lses))

    def step(q, k, v, lens):
        return decode_attention(q, k, v, lens, validate=False, num_splits=3, window_size=(20, -1))

    compiled = torch.compile(step, fullgraph=True, backend="aot_eager", dynamic=False)
    for i, lengths in enumerate(([48, 20], [31, 1], [0, 47])):
        lens = torch.tensor(lengths, dtype=torch.int32)
        with torch.compiler.set_stance("fail_on_recompile" if i else "default"):
            got = compiled(q, k, v, lens)
        want = step(q, k, v, lens)
        assert torch.equal(got[0], want[0]) and torch.equal(got[1], want[1])
        close(*got, *reference(q, k, v, lens, lens - 1, window_left=20))


def test_grid_and_wide_offsets_for_huge_shapes(monkeypatch):
    """70000 sequences x 1 kv head: the programs go on grid axis 0 (CUDA allows 2**31 - 1 there,
    65535 on the others); a cache whose slots are 2**28 elements apart gets int64 tile offsets.
    The launches are recorded, not run (the interpreter would take hours)."""
    from cpattn.kernels import decode as decode_module
    from cpattn.kernels.launcher import check_grid
    launches = []

    def record(kernel, grid, args, constants, reference, in_place=False):
        meta = {**constants, "BLOCK_M": 16, "BLOCK_N": 32}
        launches.append((kernel.fn.__name__, check_grid(grid(meta)), constants))

    monkeypatch.setattr(decode_module, "launch", record)
    batch = 70000
    q = torch.zeros(batch, 1, 2, 16)
    k = torch.zeros(batch, 16, 1, 16)
    decode_attention(q, k, k, torch.full((batch,), 16, dtype=torch.int32), num_splits=2, validate=False)
    (name, grid, constants), (merge_name, merge_grid, _) = launches
    assert name == "_decode_kernel" and grid == (batch, 2, 1) and not constants["WIDE"]
    assert merge_name == "_merge_splits_kernel" and merge_grid == (batch, 1, 1)
    # Slots 2**28 elements apart (meta tensors: only the addressing is decided, no memory).
    far = torch.empty(0, device="meta").as_strided((1, 16, 1, 16), (16, 2**28, 16, 1))
    launches.clear()
    decode_attention(torch.empty(1, 1, 2, 16, device="meta"), far, far,
                     torch.full((1,), 16, dtype=torch.int32, device="meta"), num_splits=1, validate=False)
    assert launches[0][2]["WIDE"]
