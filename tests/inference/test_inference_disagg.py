"""Prefill/decode disaggregation on 4 gloo processes: ranks 0-1 prefill the tiny decoder's prompts, then
``transfer_cache`` hands the caches to ranks 2-3 (pages of another size: every page is resharded) and
to rank 0 alone (a group overlapping the prefill group, contiguous storage); both decode groups
generate 32 greedy tokens, which must be those of single-device SDPA generation. Bad transfers raise
on every rank first, without hanging."""
import pytest
import torch
import torch.distributed as dist

import cpattn
from cpattn.testing import run_ranks
from cpattn.examples.tiny_decoder import TinyDecoder
from test_inference_e2e import NEW_TOKENS, decode_tokens, expected_tokens, prefill_prompts, prompts


def bad_transfers(rank, src, make_dst):
    """Refused on every rank, the source ranks included, before anything moves."""
    caught = []
    for kwargs, match in (({"heads": 1}, "differ in kv heads"), ({"capacity": 32}, "does not fit")):
        dst = make_dst(**kwargs)
        with pytest.raises(ValueError, match=match):
            cpattn.transfer_cache(src, dst)
        caught.append(match)
    return caught


def disaggregated(rank, world):
    prefill_group, decode_pair, decode_single = (dist.new_group(r) for r in ([0, 1], [2, 3], [0]))
    model = TinyDecoder()
    c = model.config
    src, first = None, None
    if rank < 2:
        src = [cpattn.ShardedKVCache(2, 80, c.kv_heads, c.head_dim, group=prefill_group, page_size=16)
               for _ in range(c.layers)]

        def last_hidden(x, n):  # the prompt's last token is on the last rank
            parts = [torch.empty_like(x) for _ in range(2)]
            dist.all_gather(parts, x, group=prefill_group)
            return torch.cat(parts, dim=1)[0, n - 1]

        first = prefill_prompts(model, src, lambda x, n: cpattn.split_chunk(x, src[0]), last_hidden)
    box = [first]
    dist.broadcast_object_list(box, src=0)  # the first generated token travels with the request
    first = torch.tensor(box[0])

    def pair_cache(heads=c.kv_heads, capacity=96):
        return cpattn.ShardedKVCache(2, capacity, heads, c.head_dim, group=decode_pair, page_size=32) \
            if rank >= 2 else None

    caught = bad_transfers(rank, src[0] if src else None, pair_cache)
    dst_pair = [pair_cache() for _ in range(c.layers)]
    dst_single = [cpattn.ShardedKVCache(2, 80, c.kv_heads, c.head_dim, group=decode_single)
                  if rank == 0 else None for _ in range(c.layers)]
    moved = []
    for dst in (dst_pair, dst_single):
        transfers = [cpattn.transfer_cache(src[i] if src else None, dst[i]) for i in range(c.layers)]
        for t in transfers:
            t.wait([1])  # the shorter prompt first: it could start decoding while the other is in flight
            t.wait()
        moved.append(sum(t.tokens_received for t in transfers))
    if rank >= 2:
        tokens = decode_tokens(model, dst_pair, first, NEW_TOKENS - 1)
    elif rank == 0:
        tokens = decode_tokens(model, dst_single, first, NEW_TOKENS - 1)
    else:
        tokens = None
    return tokens, caught, moved


def test_prefill_two_ranks_decode_on_one_and_on_two():
    expected = expected_tokens()
    results = run_ranks(disaggregated, 4, timeout=240)
    for rank, (tokens, caught, moved) in enumerate(results):
        assert len(caught) == 2, rank
        if rank != 1:
            assert tokens == expected, (rank, tokens, expected)
    # Only the tokens in use travelled: each decode group stored every prompt token of every layer once.
    layers, total = TinyDecoder().config.layers, sum(len(p) for p in prompts())
    assert results[2][2][0] + results[3][2][0] == layers * total
    assert results[0][2][1] == layers * total
