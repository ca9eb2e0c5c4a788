"""A tiny decoder-only transformer for tests, benchmarks and examples of cpattn's inference API.

Random weights, RMS norm, RoPE from global positions, GQA attention, a GELU MLP.
The attention is a parameter: ``TinyDecoder.forward(tokens, pos, attend)`` calls
``attend(layer, q, k, v)`` for every layer, so the same model runs with torch SDPA
on one device (``generate_reference``) or with ``cpattn.prefill``/``cpattn.decode``
over sharded caches, and the tokens can be compared exactly.
"""
import dataclasses

import torch
import torch.nn.functional as F


@dataclasses.dataclass(frozen=True)
class TinyConfig:
    vocab: int = 97
    dim: int = 64
    heads: int = 4
    kv_heads: int = 2
    head_dim: int = 16
    layers: int = 2


class TinyDecoder:
    def __init__(self, config=TinyConfig(), seed=1234, device="cpu", dtype=torch.float32):
        self.config = c = config
        gen = torch.Generator().manual_seed(seed)

        def w(*shape, scale=1.0):
            return (torch.randn(*shape, generator=gen) * scale / shape[0] ** 0.5).to(device, dtype)

        # Sharp attention with strong values, so that the context (not just the last token) picks the next token.
        self.layers = [{"wq": w(c.dim, c.heads * c.head_dim, scale=2.0),
                        "wk": w(c.dim, c.kv_heads * c.head_dim, scale=2.0),
                        "wv": w(c.dim, c.kv_heads * c.head_dim, scale=2.0), "wo": w(c.heads * c.head_dim, c.dim),
                        "w1": w(c.dim, 4 * c.dim), "w2": w(4 * c.dim, c.dim)} for _ in range(c.layers)]
        self.embedding = torch.randn(c.vocab, c.dim, generator=gen).to(device, dtype)
        # A large output scale spreads the logits, so argmax is far from ties.
        self.head = w(c.dim, c.vocab, scale=8.0)

    def embed(self, tokens):
        return self.embedding[tokens]

    def _rope(self, x, pos):
        """Rotary embedding of x (B, n, heads, head_dim) at global positions pos (B, n)."""
        half = self.config.head_dim // 2
        angle = pos[..., None].float() / 10000 ** (torch.arange(half, device=x.device) / half)
        cos, sin = angle.cos()[:, :, None].to(x.dtype), angle.sin()[:, :, None].to(x.dtype)
        x1, x2 = x[..., :half], x[..., half:]
        return torch.cat([x1 * cos - x2 * sin, x1 * sin + x2 * cos], dim=-1)

    def forward(self, x, pos, attend):
        """Hidden states (B, n, dim) of embedded tokens ``x`` at positions ``pos`` (B, n);
        ``attend(layer, q, k, v)`` -> (B, n, heads, head_dim) is the attention of each layer."""
        c = self.config
        b, n, _ = x.shape
        for i, layer in enumerate(self.layers):
            h = _rms(x)
            q = self._rope((h @ layer["wq"]).view(b, n, c.heads, c.head_dim), pos)
            k = self._rope((h @ layer["wk"]).view(b, n, c.kv_heads, c.head_dim), pos)
            v = (h @ layer["wv"]).view(b, n, c.kv_heads, c.head_dim)
            x = x + attend(i, q, k, v).reshape(b, n, c.heads * c.head_dim) @ layer["wo"]
            x = x + F.gelu(_rms(x) @ layer["w1"]) @ layer["w2"]
        return x

    def logits(self, x):
        return _rms(x) @ self.head


def _rms(x):
    return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + 1e-6)


def sdpa_attend(layer, q, k, v):
    """Causal torch SDPA over the given tokens (flash layout in and out)."""
    return F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2),
                                          is_causal=True, enable_gqa=True).transpose(1, 2)


def generate_reference(model, prompt, new_tokens):
    """Greedy tokens on one device, recomputing the whole sequence with torch SDPA for every new token.

    Returns (tokens, smallest gap between the two largest logits): a gap far from 0 means
    an exact comparison of tokens is meaningful."""
    tokens, gaps = prompt.clone(), []
    for _ in range(new_tokens):
        x = model.forward(model.embed(tokens)[None], torch.arange(len(tokens), device=tokens.device)[None], sdpa_attend)
        scores = model.logits(x[0, -1])
        top2 = scores.topk(2).values
        gaps.append(float(top2[0] - top2[1]))
        tokens = torch.cat([tokens, scores.argmax()[None]])
    return tokens[len(prompt):].tolist(), min(gaps)
