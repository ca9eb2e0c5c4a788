"""Ulysses: all-to-all between a sequence split and a head split.

Over a Ulysses group of U ranks, ``scatter_heads`` turns this rank's
(B, S/U, H, D) sequence part into (B, S, H/U, D): rank u gets heads
[u*H/U, (u+1)*H/U) of the whole (group's) sequence, parts concatenated in
Ulysses-rank order. ``gather_heads`` is its inverse. Several tensors of one
dtype travel in ONE all-to-all (q, k and v forward; dq, dk and dv backward),
packed side by side in a single send buffer, each tensor's heads taking
heads x its own head dim columns (q and k of 192, v of 128 under MLA), so the
packing is the only copy before the transfer.

GQA: rank u's query heads use kv heads [u*Hkv/U, (u+1)*Hkv/U) when U divides
Hkv. When Hkv divides U instead (fewer kv heads than ranks), rank u is sent kv
head u // (U/Hkv), the one its query heads share (the send buffer reads it U/Hkv
times; nothing is materialised), and ``gather_heads`` sums the U/Hkv copies'
gradients. Other head counts cannot be split evenly and raise ValueError.

Uneven lengths: the Ulysses ranks' sequence parts may differ by a token
(``Layout.ulysses_parts``). Every rank then sends slots of the longest part's
length; the rows past a part's end are never read (one all-to-all still).
"""
import torch


def check_heads(heads, heads_kv, ulysses_degree, where):
    if heads % ulysses_degree:
        raise ValueError(f"{where}: {heads} query heads cannot be split over ulysses degree {ulysses_degree} "
                         "(the head count must be divisible by the Ulysses degree)")
    if heads_kv % ulysses_degree and ulysses_degree % heads_kv:
        raise ValueError(f"{where}: {heads_kv} kv heads cannot be split over ulysses degree {ulysses_degree} "
                         "(one of the kv head count and the Ulysses degree must divide the other)")


def _heads_per_rank(heads, degree):
    return heads // degree if heads % degree == 0 else 1


def _write_head_groups(dst, t, degree):
    """dst (U, B, S/U, w, D)[i] = the heads of ``t`` (B, S/U, H, D) that rank i attends with."""
    batch, part, heads, dim = t.shape
    if heads % degree == 0:
        dst.copy_(t.view(batch, part, degree, heads // degree, dim).permute(2, 0, 1, 3, 4))
    else:  # rank i gets head i // (degree // heads): broadcast each head over its ranks
        dst.unflatten(0, (heads, degree // heads)).copy_(t.permute(2, 0, 1, 3)[:, None, :, :, None, :])


def _read_head_groups(src, heads, degree):
    """src (U, B, S/U, w, D)[i] = rank i's heads of this sequence part -> (B, S/U, heads, D); copies summed."""
    _, batch, part, _, dim = src.shape
    if heads % degree == 0:
        return src.permute(1, 2, 0, 3, 4).reshape(batch, part, heads, dim)
    summed = src.unflatten(0, (heads, degree // heads)).sum(1, dtype=torch.float32).to(src.dtype)
    return summed[..., 0, :].permute(1, 2, 0, 3)


def _columns(buffer, col, width, dim):
    """Columns [col, col + width * dim) of ``buffer``'s last axis as ``width`` heads of ``dim``: one
    tensor's place in a send or receive buffer."""
    return buffer[..., col:col + width * dim].unflatten(-1, (width, dim))


def scatter_heads(tensors, comm, parts=None):
    """Sequence parts (B, S/U, H_i, D_i) -> head groups (B, S, H_i/U or 1, D_i), in one all-to-all over ``comm``.

    The tensors share dtype, batch and length; each keeps its head dim. ``parts``: every
    Ulysses rank's part length, in Ulysses order (None: all equal to this rank's). Returns
    views of the received buffer when the parts are equal.
    """
    degree = comm.degree
    batch, mine = tensors[0].shape[:2]
    part = mine if parts is None else max(parts)
    widths = [_heads_per_rank(t.shape[2], degree) for t in tensors]
    dims = [t.shape[3] for t in tensors]
    columns = sum(w * d for w, d in zip(widths, dims))
    send = torch.empty((degree, batch, part, columns), dtype=tensors[0].dtype, device=tensors[0].device)
    col = 0
    for t, width, dim in zip(tensors, widths, dims):
        _write_head_groups(_columns(send[:, :, :mine], col, width, dim), t, degree)
        col += width * dim
    recv = comm.all_to_all(send)  # recv[i]: rank i's sequence part, this rank's heads
    if parts is None or min(parts) == part:
        # (U, B, S/U, columns) -> (B, S, columns): a view when B == 1, one copy otherwise
        full = recv.permute(1, 0, 2, 3).reshape(batch, degree * part, columns)
    else:
        full = torch.cat([recv[i, :, :length] for i, length in enumerate(parts)], dim=1)
    heads, col = [], 0
    for width, dim in zip(widths, dims):
        heads.append(_columns(full, col, width, dim))
        col += width * dim
    return heads


def gather_heads(tensors, heads, comm, parts=None, index=0):
    """Head groups (B, S, w_i, D_i) -> sequence parts (B, S/U, heads[i], D_i), in one all-to-all over ``comm``.

    The inverse of ``scatter_heads``; where a head was replicated (its
    ``heads[i]`` divides U) the copies are summed, as gradients must be.
    ``parts`` as in ``scatter_heads``; ``index``: this rank's Ulysses index (needed with ``parts``).
    """
    degree = comm.degree
    batch, seqlen = tensors[0].shape[:2]
    parts = [seqlen // degree] * degree if parts is None else parts
    part = max(parts)
    widths = [t.shape[2] for t in tensors]
    dims = [t.shape[3] for t in tensors]
    columns = sum(w * d for w, d in zip(widths, dims))
    send = torch.empty((degree, batch, part, columns), dtype=tensors[0].dtype, device=tensors[0].device)
    col = 0
    for t, width, dim in zip(tensors, widths, dims):
        if min(parts) == part:
            _columns(send, col, width, dim).copy_(t.unflatten(1, (degree, part)).permute(1, 0, 2, 3, 4))
        else:
            for i, piece in enumerate(t.split(parts, dim=1)):
                _columns(send[i, :, :parts[i]], col, width, dim).copy_(piece)
        col += width * dim
    recv = comm.all_to_all(send)[:, :, :parts[index]]  # recv[i]: rank i's heads of this rank's sequence part
    parts, col = [], 0
    for count, width, dim in zip(heads, widths, dims):
        parts.append(_read_head_groups(_columns(recv, col, width, dim), count, degree))
        col += width * dim
    return parts
