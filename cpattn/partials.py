"""Host helpers on attention partials (out, lse): the pieces the ring and the inference code merge.

A partial is (out fp32 (B, S, H, D), lse fp32 (B, H, S), natural log) of some
rows over some keys; partials merge exactly by their log-sum-exp (DESIGN.md,
kernels/merge.py). The helpers here are the host side of that rule:

* ``empty_partial``: rows that saw no key, out 0 and lse -inf: the merge's identity;
* ``merge_sinks`` / ``sinks_grad``: an attention sink is the partial (0, sink_h),
  merged once after every key, and its gradient;
* ``stack_partial`` / ``unstack_partial``: (out, lse) as one tensor, so that one
  collective moves both.
"""
import torch

from cpattn.kernels import merge_attention


def empty_partial(q, value_dim=None):
    """(out 0, lse -inf) for the rows of q (B, S, H, D): rows that see no key. out has
    ``value_dim`` columns (default D: v's head dim when it has one of its own)."""
    batch, seqlen, heads, dim = q.shape
    return (torch.zeros((batch, seqlen, heads, dim if value_dim is None else value_dim), dtype=torch.float32,
                        device=q.device),
            torch.full((batch, heads, seqlen), float("-inf"), dtype=torch.float32, device=q.device))


def merge_sinks(out, lse, sinks):
    """Fold attention sinks into a finished (out, lse), in place: a sink is the partial
    (out 0, lse sink_h), merged once after every key (DESIGN.md). The zero partial is a
    stride-0 view, so it costs no memory."""
    batch, seqlen, heads, _ = out.shape
    zero = out.new_zeros(()).expand(out.shape)
    merge_attention(out, lse, zero, sinks.float()[None, :, None].expand(batch, heads, seqlen), inplace=True)


def sinks_grad(sinks, lse, delta):
    """d loss / d sinks (float32) from these rows: a sink's probability is exp(sink - lse), and
    d out / d sink = -p_sink * out, so each row adds -p_sink * rowsum(dout * out) (``delta``)."""
    return -(torch.exp(sinks.float()[None, :, None] - lse) * delta).sum(dim=(0, 2))


def stack_partial(out, lse):
    """(out (B, n, H, D) fp32, lse (B, H, n)) -> one (B, n, H, D + 1) tensor: one collective instead of two."""
    return torch.cat([out, lse.transpose(1, 2).unsqueeze(-1)], dim=-1)


def unstack_partial(stacked):
    """(..., B, n, H, D + 1) -> out (..., B, n, H, D), lse (..., B, H, n): the inverse of ``stack_partial``."""
    return stacked[..., :-1], stacked[..., -1].transpose(-1, -2)
