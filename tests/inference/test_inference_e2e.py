"""End to end: a tiny decoder generates greedily with context-parallel prefill and decode.

Two layers, random weights, RoPE from global positions, GQA. Two prompts of
different lengths are prefilled in chunks, each rank holding the tokens of
every chunk that ``cpattn.ContextParallel`` gives it (zigzag, also with a
Ulysses degree of 2), into paged, sequence-sharded caches; 32 tokens are then decoded
as one batch. The tokens must be exactly those of single-device generation
with torch SDPA recomputing the whole sequence at every step.
"""
import pytest
import torch

import cpattn
from cpattn.testing import run_ranks
from cpattn.examples.tiny_decoder import TinyDecoder, generate_reference

PROMPTS = (40, 24)      # two sequences of different lengths
CHUNKS = {40: (24, 16), 24: (24,)}
NEW_TOKENS = 32


def prompts():
    gen = torch.Generator().manual_seed(99)
    return [torch.randint(0, TinyDecoder().config.vocab, (n,), generator=gen) for n in PROMPTS]


def expected_tokens():
    """The single-device tokens, checked to be a meaningful target for an exact comparison."""
    model = TinyDecoder()
    expected, gaps = zip(*(generate_reference(model, p, NEW_TOKENS) for p in prompts()))
    assert min(gaps) > 1e-2, f"argmax too close to a tie for an exact comparison: {min(gaps)}"
    assert all(len(set(e)) > 10 for e in expected), "degenerate generation makes a weak test"
    return list(expected)


def prefill_prompts(model, caches, split, last_hidden):
    """Chunked context-parallel prefill of every prompt; returns each prompt's first generated token.

    ``split(x, n)``: this rank's part of a chunk's hidden states and its token indices;
    ``last_hidden(x, n)``: the hidden state of the chunk's last token, from every rank's part."""
    first = []
    for b, prompt in enumerate(prompts()):
        start = 0
        for n in CHUNKS[len(prompt)]:
            x, index = split(model.embed(prompt[start:start + n])[None], n)
            pos = caches[0].positions(n, index, batch_index=[b])
            x = model.forward(x, pos, lambda i, q, k, v: cpattn.prefill(caches[i], q, k, v, token_index=index,
                                                                         batch_index=[b]))
            start += n
        first.append(int(model.logits(last_hidden(x, n)).argmax()))
    return first


def decode_tokens(model, caches, tokens, steps):
    """``steps`` greedy steps of every sequence with cpattn.decode; returns the tokens per sequence."""
    generated = [[int(t)] for t in tokens]
    for _ in range(steps):
        x = model.embed(tokens)[:, None]
        pos = caches[0].seqlens[:, None]
        x = model.forward(x, pos, lambda i, q, k, v: cpattn.decode(caches[i], q, k, v))
        tokens = model.logits(x[:, 0]).argmax(-1)
        for b, t in enumerate(tokens.tolist()):
            generated[b].append(t)
    return generated


def generate_cp(rank, world, ulysses_degree):
    torch.manual_seed(0)
    model = TinyDecoder()
    c = model.config
    cp = cpattn.ContextParallel(None, ulysses_degree=ulysses_degree, ring_impl="zigzag")
    # The 4-rank run also covers check_across_ranks=False (no agreement all-gather before each call).
    caches = [cpattn.ShardedKVCache(len(PROMPTS), 80, c.kv_heads, c.head_dim, page_size=16,
                                    check_across_ranks=world == 2) for _ in range(c.layers)]
    # The prompt's last token lives on some rank: gather the chunk's hidden states to read it.
    next_token = prefill_prompts(model, caches, lambda x, n: (cp.shard(x), cp.positions(n)),
                                 lambda x, n: cp.gather(x)[0, n - 1])
    return decode_tokens(model, caches, torch.tensor(next_token), NEW_TOKENS - 1)


def check(world, ulysses_degree):
    expected = expected_tokens()
    for rank, got in enumerate(run_ranks(generate_cp, world, ulysses_degree, timeout=150)):
        assert got == expected, (rank, got, expected)


def test_generate_two_ranks():
    check(2, 1)


@pytest.mark.slow  # 4 ranks: test_inference_chunks' and the transformers generate() tests run 4 ranks by default
def test_generate_four_ranks():
    check(4, 2)
