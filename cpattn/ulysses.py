"""Ulysses: all-to-all between a sequence split and a head split.

Over a Ulysses group of U ranks, ``seq_to_head`` turns this rank's
(B, S/U, H, D) into (B, S, H/U, D): rank u gets heads [u*H/U, (u+1)*H/U) of the
whole (group's) sequence, parts concatenated in Ulysses-rank order.
``head_to_seq`` is its inverse, and each is the other's backward.

GQA: rank u's query heads use kv heads [u*Hkv/U, (u+1)*Hkv/U) when U divides
Hkv. When Hkv divides U instead (fewer kv heads than ranks), each kv head is
repeated U/Hkv times before the all-to-all, so every rank receives exactly the
one kv head its query heads share; the repeat's backward sums the copies'
gradients. Other head counts cannot be split evenly and raise ValueError.
"""
import torch


def check_heads(heads, heads_kv, ulysses_degree, where):
    if heads % ulysses_degree:
        raise ValueError(f"{where}: {heads} query heads cannot be split over ulysses degree {ulysses_degree} "
                         "(the head count must be divisible by the Ulysses degree)")
    if heads_kv % ulysses_degree and ulysses_degree % heads_kv:
        raise ValueError(f"{where}: {heads_kv} kv heads cannot be split over ulysses degree {ulysses_degree} "
                         "(one of the kv head count and the Ulysses degree must divide the other)")


def kv_heads_for_ranks(kv, ulysses_degree):
    """Repeat kv heads so the head all-to-all hands each rank the kv heads it needs, and no more."""
    heads_kv = kv.shape[2]
    if heads_kv % ulysses_degree == 0:
        return kv
    return kv.repeat_interleave(ulysses_degree // heads_kv, dim=2)


def _seq_to_head(x, comm):
    degree = comm.degree
    batch, part_len, heads, head_dim = x.shape
    x = x.reshape(batch, part_len, degree, heads // degree, head_dim).permute(2, 0, 1, 3, 4).contiguous()
    y = comm.all_to_all(x)  # (U, B, S/U, H/U, D): y[i] is rank i's sequence part
    return y.permute(1, 0, 2, 3, 4).reshape(batch, degree * part_len, heads // degree, head_dim)


def _head_to_seq(x, comm):
    degree = comm.degree
    batch, seqlen, heads, head_dim = x.shape
    part_len = seqlen // degree
    x = x.reshape(batch, degree, part_len, heads, head_dim).permute(1, 0, 2, 3, 4).contiguous()
    y = comm.all_to_all(x)  # (U, B, S/U, H/U, D): y[i] is rank i's head group
    return y.permute(1, 2, 0, 3, 4).reshape(batch, part_len, degree * heads, head_dim)


class _SeqToHead(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, comm):
        ctx.comm = comm
        return _seq_to_head(x, comm)

    @staticmethod
    def backward(ctx, grad):
        return _head_to_seq(grad, ctx.comm), None


class _HeadToSeq(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, comm):
        ctx.comm = comm
        return _head_to_seq(x, comm)

    @staticmethod
    def backward(ctx, grad):
        return _seq_to_head(grad, ctx.comm), None


def seq_to_head(x, comm):
    """(B, S/U, H, D) sequence part -> (B, S, H/U, D) head group over a ``UlyssesComm``, differentiable."""
    return _SeqToHead.apply(x, comm)


def head_to_seq(x, comm):
    """(B, S, H/U, D) head group -> (B, S/U, H, D) sequence part over a ``UlyssesComm``, differentiable."""
    return _HeadToSeq.apply(x, comm)
