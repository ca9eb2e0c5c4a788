"""ContextParallel's token placement: which tokens a rank holds (``shard``, ``positions``) and the
full tensor back from every rank's shard (``gather``), over a ``mesh.Mesh`` and its layout.

With packed documents the shard order depends on the window the attention will use (dispatch.py
balances the causal work of that window), so the object remembers, per packing, the window ``shard``
cut its shards for (``PackingCuts``): attention plans on that layout whatever window it attends with
(a model whose layers use several), and ``positions``/``gather`` use it unless given a window.
"""
import collections

import torch

from .checks import check_seq_dim, check_window
from .comm import check_backend
from .cp_calls import GatherSignature, gather_key, read_packing
from .dispatch import cut_window
from .layout import doc_positions

CUTS_KEPT = 64  # packings whose cut window an object remembers (training makes a new packing every step)


class PackingCuts:
    """The window left side each recent packing's shards were cut for (-1: none)."""

    def __init__(self, ring_degree):
        self.ring_degree = ring_degree
        self._cuts = collections.OrderedDict()  # packing -> window left, the most recent last

    def cut(self, packing, window_left):
        """``dispatch.cut_window``; -1 with one ring rank, where no cut depends on a window."""
        return -1 if self.ring_degree == 1 else cut_window(packing, window_left)

    def remember(self, packing, window_size, where):
        """The cut for ``window_size`` (checked), remembered for ``packing`` (None: no documents, -1)."""
        left = check_window(window_size, where)[0]
        if packing is None:
            return -1
        cut = self._cuts[packing] = self.cut(packing, left)
        self._cuts.move_to_end(packing)
        while len(self._cuts) > CUTS_KEPT:
            self._cuts.popitem(last=False)
        return cut

    def of(self, packing):
        """The cut this object's shards of ``packing`` have, or None (not sharded here, or forgotten)."""
        return None if packing is None else self._cuts.get(packing)

    def query_cut(self, packing, window_size, where):
        """The cut ``positions`` or ``gather`` means: that of ``window_size``, or with None the one remembered
        (-1 when none is)."""
        if window_size is None:
            remembered = self.of(packing)
            return -1 if remembered is None else remembered
        left = check_window(window_size, where)[0]
        return -1 if packing is None else self.cut(packing, left)

    def shards_cut(self, packing, window_left):
        """The cut a call's shards of ``packing`` have: the one remembered, else the one for the call's own
        window (shards made elsewhere are taken to be cut for it); None without documents."""
        remembered = self.of(packing)
        return remembered if remembered is not None or packing is None else self.cut(packing, window_left)


def shard_positions(mesh, cuts, seq_len, cu_seqlens, window_size, where, remember=False):
    """(this rank's token indices in local order, the packing or None) for a ``seq_len`` sequence; with
    ``remember`` (``shard``) the cut is remembered for the packing, otherwise it is ``query_cut``'s."""
    packing, seq_len = read_packing(cu_seqlens, seq_len, where)
    cut = cuts.remember(packing, window_size, where) if remember else cuts.query_cut(packing, window_size, where)
    return mesh.layout.positions(seq_len, mesh.rank, packing, cut), packing


def document_positions(tokens, packing):
    """Each token's position: global, or inside its document when packed."""
    return tokens if packing is None else doc_positions(packing)[tokens]


def gather_shards(x, seq_dim, seq_len, cu_seqlens, window_size, mesh, calls, cuts, group, where):
    """The full tensor in natural order, on every rank, from every rank's shard ``x`` (agreed first
    through ``calls``, a ``cp_calls.AgreedCalls``)."""
    layout = mesh.layout

    def check():
        dim = check_seq_dim(x, seq_dim, where)
        check_backend(group, x.device, where)
        packing, full = read_packing(cu_seqlens, seq_len, where)
        cut = cuts.query_cut(packing, window_size, where)
        full = layout.full_length(x.shape[dim], full, mesh.rank, where, packing, cut)
        shape = tuple(full if d == dim else size for d, size in enumerate(x.shape))
        return GatherSignature(str(x.dtype), dim, shape, packing, cut)
    call = calls.agree(gather_key(x, seq_dim, seq_len, cu_seqlens, window_size), where, check, hint=x)
    cut_args = (call.cu_seqlens, call.cut_window)
    lengths = [layout.local_lengths(call.shape[call.seq_dim], *cut_args)[m] for m in mesh.mesh_ranks]
    pieces = mesh.all_gather_shards(x, call.seq_dim, lengths, where)
    stacked = torch.cat([p.narrow(call.seq_dim, 0, n) for p, n in zip(pieces, lengths)], dim=call.seq_dim)
    order = layout.order(call.shape[call.seq_dim], mesh.mesh_ranks, *cut_args)
    return torch.empty_like(stacked).index_copy_(call.seq_dim, order.to(x.device), stacked)
