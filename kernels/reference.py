"""The plain reference: attention written out in float64 torch, for tests, benchmarks and docs.

Nothing here is fast or tiled, and nothing is shared with the Triton kernels beside it:
the visibility rule (DESIGN.md) is spelled out again on purpose, as the statement the
kernels' ``kernels/mask.py`` is checked against. Layout is flash-attn's, (B, S, H, D);
k and v may have fewer heads (GQA/MQA) and v a head dim of its own (Dv != D).

Key position k is visible to query position q when q - left <= k <= q + right for
``window_size=(left, right)`` (-1: unbounded); ``causal`` makes right 0 (or keeps a
smaller right). ``softcap`` caps the scaled scores (``softcap * tanh(s / softcap)``);
``sinks`` (H,) add one value-less logit per head to every row's softmax. A row that sees
no key gives out 0 and lse -inf (natural log), as the kernels do.
"""
import math

import torch

__all__ = ["reference_attention", "reference_varlen", "reference_decode", "reference_merge"]


def _attend(q, k, v, q_pos, k_pos, softmax_scale, causal, window_size, softcap, sinks):
    """(out (B, Sq, H, Dv), lse (B, H, Sq)) in float64 with query i at ``q_pos[i]`` and key j at
    ``k_pos[j]`` (int64 position vectors); differentiable."""
    scale = 1.0 / math.sqrt(q.shape[-1]) if softmax_scale is None else softmax_scale
    group = q.shape[2] // k.shape[2]
    qd = q.double().transpose(1, 2)
    kd = k.double().transpose(1, 2).repeat_interleave(group, dim=1)
    vd = v.double().transpose(1, 2).repeat_interleave(group, dim=1)
    scores = qd @ kd.transpose(-1, -2) * scale
    if softcap:
        scores = softcap * torch.tanh(scores / softcap)
    left, right = window_size
    if causal:
        right = 0 if right < 0 else min(right, 0)
    hidden = torch.zeros(q_pos.numel(), k_pos.numel(), dtype=torch.bool, device=q.device)
    if left >= 0:
        hidden |= k_pos[None, :] < q_pos[:, None] - left
    if right >= 0:
        hidden |= k_pos[None, :] > q_pos[:, None] + right
    scores = scores.masked_fill(hidden, float("-inf"))
    if sinks is not None:  # one more column: the sink's logit, with a zero value
        sink_col = sinks.double()[None, :, None, None].expand(*scores.shape[:-1], 1)
        scores = torch.cat([scores, sink_col], dim=-1)
        vd = torch.cat([vd, vd.new_zeros(*vd.shape[:-2], 1, vd.shape[-1])], dim=-2)
    lse = torch.logsumexp(scores, dim=-1)
    probs = torch.exp(scores - lse[..., None].masked_fill(torch.isinf(lse)[..., None], 0.0))
    return (probs @ vd).transpose(1, 2), lse


def reference_attention(q, k, v, softmax_scale=None, causal=False, q_start=0, k_start=0, window_size=(-1, -1),
                        softcap=0.0, sinks=None):
    """q (B, Sq, H, D), k (B, Sk, Hkv, D), v (B, Sk, Hkv, Dv), query row i at position
    ``q_start + i`` and key column j at ``k_start + j`` (so causal is top-left aligned unless
    the starts say otherwise). Returns (out (B, Sq, H, Dv), lse (B, H, Sq)) in float64;
    differentiable. The scale defaults to 1/sqrt(D)."""
    q_pos = q_start + torch.arange(q.shape[1], device=q.device)
    k_pos = k_start + torch.arange(k.shape[1], device=q.device)
    return _attend(q, k, v, q_pos, k_pos, softmax_scale, causal, window_size, softcap, sinks)


def reference_varlen(q, k, v, cu_seqlens_q, cu_seqlens_k, causal=False, **kwargs):
    """Packed documents one by one: q (total_q, H, D), k (total_k, Hkv, D), v (total_k, Hkv, Dv),
    flash-attn's bottom-right alignment per document. Returns (out (total_q, H, Dv),
    lse (H, total_q)) in float64."""
    outs, lses = [], []
    bounds_q, bounds_k = cu_seqlens_q.tolist(), cu_seqlens_k.tolist()
    for (q0, q1), (k0, k1) in zip(zip(bounds_q, bounds_q[1:]), zip(bounds_k, bounds_k[1:])):
        out, lse = reference_attention(q[None, q0:q1], k[None, k0:k1], v[None, k0:k1], causal=causal,
                                       q_start=(k1 - k0) - (q1 - q0), **kwargs)
        outs.append(out[0])
        lses.append(lse[0])
    return torch.cat(outs), torch.cat(lses, dim=-1)


def reference_decode(q, k_cache, v_cache, cache_seqlens, q_start=None, key_positions=None, block_table=None,
                     softmax_scale=None, causal=True, window_size=(-1, -1), softcap=0.0, sinks=None):
    """What ``decode_attention`` computes, one sequence at a time: q (B, Sq, H, D) over the first
    ``cache_seqlens[b]`` slots of a contiguous cache (B, capacity, Hkv, D or Dv) or, with
    ``block_table`` (B, max_pages), of a page pool (num_pages, page_size, Hkv, D or Dv).
    Query token t of sequence b sits at ``q_start[b] + t`` (default: the cache's last Sq slots);
    slot j holds the key at ``key_positions[j]`` (default j). Returns (out (B, Sq, H, Dv),
    lse (B, H, Sq)) in float64."""
    if block_table is not None:  # the pages of each table row laid end to end
        k_cache, v_cache = (pool[block_table.long()].flatten(1, 2) for pool in (k_cache, v_cache))
    lengths = [int(n) for n in cache_seqlens.tolist()]
    starts = [n - q.shape[1] for n in lengths] if q_start is None else [int(s) for s in q_start.tolist()]
    outs, lses = [], []
    for b, (n, start) in enumerate(zip(lengths, starts)):
        k_pos = torch.arange(n, device=q.device) if key_positions is None else key_positions[:n].to(q.device)
        q_pos = start + torch.arange(q.shape[1], device=q.device)
        out, lse = _attend(q[b:b + 1], k_cache[b:b + 1, :n], v_cache[b:b + 1, :n], q_pos, k_pos.long(),
                           softmax_scale, causal, window_size, softcap, sinks)
        outs.append(out)
        lses.append(lse)
    return torch.cat(outs), torch.cat(lses)


def reference_merge(outs, lses):
    """float64 merge of N partials stacked on dim 0: outs (N, B, S, H, D), lses (N, B, H, S).

    An lse of +inf or -inf is an empty partial; rows with no non-empty partial give (0, -inf).
    """
    lses = lses.double().masked_fill(lses == float("inf"), float("-inf"))
    lse = torch.logsumexp(lses, dim=0)
    weights = torch.exp(lses - lse.masked_fill(torch.isinf(lse), 0.0))  # 0 for empty partials
    return (outs.double() * weights.transpose(-1, -2)[..., None]).sum(dim=0), lse
