"""End to end: a tiny decoder generates greedily with context-parallel prefill and decode.

Two layers, random weights, RoPE from global positions, GQA. Two prompts of
different lengths are prefilled in chunks, each rank holding the tokens of
every chunk that ``cpattn.ContextParallel`` gives it (zigzag, also with a
Ulysses degree of 2), into paged, sequence-sharded caches; 32 tokens are then decoded
as one batch. The tokens must be exactly those of single-device generation
with torch SDPA recomputing the whole sequence at every step.
"""
import torch
import torch.nn.functional as F

import cpattn
from cpattn.testing import run_ranks

VOCAB, DIM, HEADS, KV_HEADS, HEAD_DIM, LAYERS = 97, 64, 4, 2, 16, 2
PROMPTS = (40, 24)      # two sequences of different lengths
CHUNKS = {40: (24, 16), 24: (24,)}
NEW_TOKENS = 32


def weights():
    gen = torch.Generator().manual_seed(1234)

    def w(*shape, scale=1.0):
        return torch.randn(*shape, generator=gen) * scale / shape[0] ** 0.5

    # Sharp attention with strong values, so that the context (not just the last token) picks the next token.
    layers = [{"wq": w(DIM, HEADS * HEAD_DIM, scale=2.0), "wk": w(DIM, KV_HEADS * HEAD_DIM, scale=2.0),
               "wv": w(DIM, KV_HEADS * HEAD_DIM, scale=2.0),
               "wo": w(HEADS * HEAD_DIM, DIM), "w1": w(DIM, 4 * DIM), "w2": w(4 * DIM, DIM)} for _ in range(LAYERS)]
    # A large output scale spreads the logits, so argmax is far from ties (checked below).
    return {"embed": torch.randn(VOCAB, DIM, generator=gen), "layers": layers, "head": w(DIM, VOCAB, scale=8.0)}


def prompts():
    gen = torch.Generator().manual_seed(99)
    return [torch.randint(0, VOCAB, (n,), generator=gen) for n in PROMPTS]


def rms(x):
    return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + 1e-6)


def rope(x, pos):
    """Rotary embedding of x (B, n, heads, HEAD_DIM) at global positions pos (B, n)."""
    half = HEAD_DIM // 2
    angle = pos[..., None].float() / 10000 ** (torch.arange(half) / half)
    cos, sin = angle.cos()[:, :, None], angle.sin()[:, :, None]
    x1, x2 = x[..., :half], x[..., half:]
    return torch.cat([x1 * cos - x2 * sin, x1 * sin + x2 * cos], dim=-1)


def qkv(layer, x, pos):
    b, n, _ = x.shape
    h = rms(x)
    q = (h @ layer["wq"]).view(b, n, HEADS, HEAD_DIM)
    k = (h @ layer["wk"]).view(b, n, KV_HEADS, HEAD_DIM)
    v = (h @ layer["wv"]).view(b, n, KV_HEADS, HEAD_DIM)
    return rope(q, pos), rope(k, pos), v


def finish(layer, x, attn):
    x = x + attn.reshape(*x.shape[:2], HEADS * HEAD_DIM) @ layer["wo"]
    return x + F.gelu(rms(x) @ layer["w1"]) @ layer["w2"]


def logits(w, x):
    return rms(x) @ w["head"]


def generate_reference(w, prompt):
    """Single device: recompute the whole sequence with torch SDPA for every new token."""
    tokens, gaps = prompt.clone(), []
    for _ in range(NEW_TOKENS):
        x = w["embed"][tokens][None]
        pos = torch.arange(len(tokens))[None]
        for layer in w["layers"]:
            q, k, v = qkv(layer, x, pos)
            attn = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2),
                                                  is_causal=True, enable_gqa=True).transpose(1, 2)
            x = finish(layer, x, attn)
        top2 = logits(w, x[0, -1]).topk(2).values
        gaps.append(float(top2[0] - top2[1]))
        tokens = torch.cat([tokens, logits(w, x[0, -1]).argmax()[None]])
    return tokens[len(prompt):].tolist(), min(gaps)


def generate_cp(rank, world, ulysses_degree):
    torch.manual_seed(0)
    w = weights()
    cp = cpattn.ContextParallel(None, ulysses_degree=ulysses_degree, ring_impl="zigzag")
    # The 4-rank run also covers check_across_ranks=False (no agreement all-gather before each call).
    caches = [cpattn.ShardedKVCache(len(PROMPTS), 80, KV_HEADS, HEAD_DIM, page_size=16,
                                    check_across_ranks=world == 2) for _ in range(LAYERS)]
    next_token = []
    for b, prompt in enumerate(prompts()):
        start = 0
        for n in CHUNKS[len(prompt)]:
            index = cp.positions(n)  # this rank's tokens of the chunk (indices into it)
            x = cp.shard(w["embed"][prompt[start:start + n]][None])
            pos = caches[0].positions(n, index, batch_index=[b])
            for layer, cache in zip(w["layers"], caches):
                q, k, v = qkv(layer, x, pos)
                x = finish(layer, x, cpattn.prefill(cache, q, k, v, token_index=index, batch_index=[b]))
            start += n
        # The prompt's last token lives on some rank: gather the chunk's hidden states to read it.
        last = cp.gather(x)[0, n - 1]
        next_token.append(int(logits(w, last).argmax()))
    generated = [[t] for t in next_token]
    tokens = torch.tensor(next_token)
    for _ in range(NEW_TOKENS - 1):
        x = w["embed"][tokens][:, None]
        pos = caches[0].seqlens[:, None].clone()
        for layer, cache in zip(w["layers"], caches):
            q, k, v = qkv(layer, x, pos)
            x = finish(layer, x, cpattn.decode(cache, q, k, v))
        tokens = logits(w, x[:, 0]).argmax(-1)
        for b in range(len(PROMPTS)):
            generated[b].append(int(tokens[b]))
    return generated


def check(world, ulysses_degree):
    w = weights()
    expected, gaps = zip(*(generate_reference(w, p) for p in prompts()))
    assert min(gaps) > 1e-2, f"argmax too close to a tie for an exact comparison: {min(gaps)}"
    assert all(len(set(e)) > 10 for e in expected), "degenerate generation makes a weak test"
    for rank, got in enumerate(run_ranks(generate_cp, world, ulysses_degree, timeout=150)):
        assert got == list(expected), (rank, got, expected)


def test_generate_two_ranks():
    check(2, 1)


def test_generate_four_ranks():
    check(4, 2)
