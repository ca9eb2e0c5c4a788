"""The public context-parallel API: ``ContextParallel``.

A ``ContextParallel`` object is a mesh over a process group: P ranks =
ring_degree x ulysses_degree (``mesh.py`` says which rank is where and holds the
communicators). It sets up its communication once, at construction
(``comm.Communicator``: process groups shared with every other ContextParallel
over the same ranks, freed by ``close()``). Every call that communicates checks
its inputs locally and, the first time each distinct call is seen, agrees on a
summary of them with the other ranks (agreement.py, cp_calls.py), so a bad
input raises on every rank instead of leaving some blocked in a collective;
later calls seen before do no collective and no device-to-host copy besides the
attention itself. A failure inside a call makes every rank raise within
``timeout`` (faults.py). The MindSpeed-style configuration (``from_config``,
``from_args``) lives in mindspeed.py.
"""
import collections

import torch
import torch.distributed as dist

from . import _cp_ops, mindspeed
from .agreement import agree
from .comm import DEFAULT_TIMEOUT, check_backend
from .cp_calls import AgreedCalls, AttentionArgs, AttentionSignature, GatherSignature, check_attention_arguments, \
    check_construction, gather_key, read_packing, seq_len_fix
from ._checks import check_window
from .dispatch import cut_window
from .layout import doc_positions
from .mesh import Mesh
from .usp import usp_attention, usp_attention_backward, usp_attention_forward
from cpattn.kernels.mask import causal_window

_CUTS_KEPT = 64  # packings whose cut window an object remembers (training makes a new packing every step)
_METHODS = {False: "ContextParallel.attention", True: "ContextParallel.scaled_dot_product_attention"}  # by layout


def _seq_dim(x, seq_dim, where):
    """``seq_dim`` of tensor ``x`` checked and made non-negative."""
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{where}: expected a torch.Tensor, got {type(x).__name__}")
    if isinstance(seq_dim, bool) or not isinstance(seq_dim, int):
        raise TypeError(f"{where}: seq_dim must be an int, got {type(seq_dim).__name__}")
    if not -x.dim() <= seq_dim < x.dim():
        raise ValueError(f"{where}: seq_dim {seq_dim} is out of range for a {x.dim()}-D tensor")
    return seq_dim % x.dim()


class ContextParallel:
    """Attention over a sequence split across the ranks of ``group``.

    ``group``: a torch.distributed process group (None: the default group).
    ``ulysses_degree``: ranks per Ulysses (head all-to-all) group, a divisor of
    the group size, or "auto" (needs ``num_heads``): the largest degree whose
    Ulysses groups fit inside nodes, learned from the ranks (``mesh.py``).
    ``ring_impl``: "zigzag" (load-balanced causal shards) or "ring" (contiguous).
    ``num_heads``/``num_kv_heads``: optional; checked early, used by "auto".
    ``check_across_ranks``: True (default): the first call with each distinct
    signature (shapes, dtype, flags) all-gathers a few ints describing every
    rank's arguments, so arguments that differ between ranks (or fail on one
    rank only) raise everywhere; later calls with that signature skip it.
    "always": every call does (debugging; on CUDA a host sync per call).
    False: never.
    ``timeout``: seconds after which a rank waiting for a failed or missing
    peer gives up (the bound of faults.py).
    Collective: every rank of ``group`` constructs it with the same arguments.
    ``close()`` (or ``with ContextParallel(...) as cp:``) frees its communicators.
    """

    def __init__(self, group=None, ulysses_degree=1, ring_impl="zigzag", *, num_heads=None, num_kv_heads=None,
                 check_across_ranks=True, timeout=DEFAULT_TIMEOUT):
        if not (dist.is_available() and dist.is_initialized()):
            raise RuntimeError("ContextParallel: torch.distributed is not initialised (call init_process_group first)")
        self.group = dist.group.WORLD if group is None else group
        self.rank = dist.get_rank(self.group)
        if self.rank < 0:
            raise ValueError("ContextParallel: this process is not a member of the given group")
        self.world_size = dist.get_world_size(self.group)
        # Every rank must build the same mesh.
        checked = agree("ContextParallel", lambda: check_construction(
            self.world_size, ulysses_degree, ring_impl, num_heads, num_kv_heads, check_across_ranks, timeout,
            "ContextParallel"), group=self.group)
        self.check_across_ranks, self.timeout = check_across_ranks, checked.timeout
        self._mesh = Mesh(self.group, checked.ulysses_degree, ring_impl, checked.node, checked.num_heads,
                          checked.num_kv_heads, self.timeout)
        self._calls = AgreedCalls(self._mesh.comm, check_across_ranks)
        self._cuts = collections.OrderedDict()  # packing -> the window left its shards were cut for
        self._closed = False
        self._handle = _cp_ops.register(self._forward_op, self._backward_op)  # how compiled code names it

    layout = property(lambda self: self._mesh.layout)
    mesh_rank = property(lambda self: self._mesh.rank)
    ring_index = property(lambda self: self._mesh.ring_index)
    ulysses_index = property(lambda self: self._mesh.ulysses_index)
    ring_degree = property(lambda self: self.layout.ring_degree)
    ulysses_degree = property(lambda self: self.layout.ulysses_degree)
    ring_impl = property(lambda self: self.layout.ring_impl)
    from_config = classmethod(mindspeed.from_config)
    from_args = classmethod(mindspeed.from_args)

    def __repr__(self):
        return (f"ContextParallel(ring_degree={self.ring_degree}, ulysses_degree={self.ulysses_degree}, "
                f"ring_impl={self.ring_impl!r}, rank={self.rank})")

    def describe(self):
        """The mesh and why: degrees, every Ulysses group and ring (global ranks), nodes, communicators."""
        return self._mesh.describe()

    def close(self):
        """Give back the communicators (destroyed when no other ContextParallel uses them). Local; idempotent."""
        self._closed = True
        self._mesh.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc_info):
        self.close()

    def _check_open(self, where, failures=True):
        if self._closed:
            raise RuntimeError(f"{where}: this ContextParallel was closed")
        if failures and self._mesh.comm is not None:
            self._mesh.comm.check(where)

    # ------------------------------------------------------------------ sharding

    def positions(self, seq_len, cu_seqlens=None, window_size=(-1, -1)):
        """Positions (CPU LongTensor) of this rank's tokens of a ``seq_len`` sequence, in local order:
        global, or with ``cu_seqlens`` (packed documents) each token's position inside its document
        (for RoPE). Any length: without documents ranks hold token counts differing by at most two.
        ``window_size``: as ``shard``'s."""
        where = "ContextParallel.positions"
        packing, seq_len = read_packing(cu_seqlens, seq_len, where)
        tokens = self.layout.positions(seq_len, self.mesh_rank, packing, self._cut_for(packing, window_size, where))
        return tokens if packing is None else doc_positions(packing)[tokens]

    def shard(self, x, seq_dim=1, cu_seqlens=None, window_size=(-1, -1)):
        """This rank's tokens of the full tensor ``x`` (a copy), in the order the mesh needs.

        ``cu_seqlens``: the packing of ``x``'s documents (global, int32, the same on every rank); the
        shards then hold equal tokens and equal causal work per ring rank (dispatch.py) and must be used
        with the same ``cu_seqlens``. ``window_size``: the window ``attention`` will use, so the work is
        balanced for it (packed documents; without them the shards do not depend on it); ``attention``
        with another window raises on every rank."""
        where = "ContextParallel.shard"
        seq_dim = _seq_dim(x, seq_dim, where)
        self.layout.check_seq_len(x.shape[seq_dim], where)
        packing, seq_len = read_packing(cu_seqlens, x.shape[seq_dim], where)
        positions = self.layout.positions(seq_len, self.mesh_rank, packing, self._cut_for(packing, window_size, where))
        return x.index_select(seq_dim, positions.to(x.device))

    def _cut_for(self, packing, window_size, where):
        """The window left side the shards of ``packing`` are cut for (``dispatch.cut_window``), remembered
        so that attention with another window raises (the last ``_CUTS_KEPT`` packings)."""
        left = check_window(window_size, where)[0]
        if packing is None:
            return -1
        cut = self._cut_window(packing, left)
        self._cuts[packing] = cut
        self._cuts.move_to_end(packing)
        while len(self._cuts) > _CUTS_KEPT:
            self._cuts.popitem(last=False)
        return cut

    def _cut_window(self, packing, window_left):
        """``dispatch.cut_window``; -1 with one ring rank, where no cut depends on a window."""
        return -1 if self.ring_degree == 1 else cut_window(packing, window_left)

    def gather(self, x, seq_dim=1, seq_len=None, cu_seqlens=None, window_size=(-1, -1)):
        """The full tensor, in natural order, on every rank, from every rank's shard (not differentiable).

        ``seq_len``: the full length; needed when it is not P x the local length (uneven lengths).
        ``cu_seqlens`` and ``window_size``: those ``shard`` was given (``cu_seqlens`` implies the length)."""
        where = "ContextParallel.gather"
        self._check_open(where)

        def check():
            dim = _seq_dim(x, seq_dim, where)
            check_backend(self.group, x.device, where)
            packing, full = read_packing(cu_seqlens, seq_len, where)
            cut = -1 if packing is None else self._cut_window(packing, check_window(window_size, where)[0])
            full = self.layout.full_length(x.shape[dim], full, self.mesh_rank, where, packing, cut)
            shape = tuple(full if d == dim else size for d, size in enumerate(x.shape))
            return GatherSignature(str(x.dtype), dim, shape, packing, cut)
        call = self._calls.agree(gather_key(x, seq_dim, seq_len, cu_seqlens, window_size), where, check, hint=x)
        cut_args = (call.cu_seqlens, call.cut_window)
        lengths = [self.layout.local_lengths(call.shape[call.seq_dim], *cut_args)[m]
                   for m in self._mesh.mesh_ranks]  # of each group rank
        pieces = self._mesh.all_gather_shards(x, call.seq_dim, lengths, where)
        stacked = torch.cat([p.narrow(call.seq_dim, 0, n) for p, n in zip(pieces, lengths)], dim=call.seq_dim)
        order = self.layout.order(call.shape[call.seq_dim], self._mesh.mesh_ranks, *cut_args)
        return torch.empty_like(stacked).index_copy_(call.seq_dim, order.to(x.device), stacked)

    @property
    def compiled_handle(self):
        """The int that names this object's forward and backward operators in compiled graphs
        (``cpattn._cp_ops``): what ``compiled_attention`` takes."""
        return self._handle

    # ------------------------------------------------------------------ attention

    def attention(self, q, k, v, causal=False, softmax_scale=None, return_lse=False, window_size=(-1, -1),
                  softcap=0.0, sinks=None, seq_len=None, cu_seqlens=None):
        """Attention of local shards in flash layout: q (B, S/P, H, D), k (B, S/P, Hkv, D) and
        v (B, S/P, Hkv, Dv); v may have a head dim of its own (MLA: D = 192, Dv = 128), and the
        default scale is 1/sqrt(D).

        The shards must come from ``shard`` (or follow its order). ``causal``
        uses the global positions of the tokens (as on one device). Returns the
        local shard of the output, (B, S/P, H, Dv), differentiable in q, k, v;
        with ``return_lse`` also lse (B, H, S/P) float32, natural log: the rows
        of single-device attention's lse for this rank's tokens (not differentiable).

        ``window_size=(left, right)``, ``softcap`` and ``sinks`` (H,) as in
        ``cpattn.flash_attn_func``, by global position. ``sinks`` must be the same on
        every rank (a replicated parameter); like every replicated parameter's, its
        gradient on a rank is that rank's share, which the data/context-parallel
        gradient all-reduce sums.
        A window shorter than the sequence skips the ring steps (and their kv
        transfers) whose keys no local query sees; ``ring_impl="ring"`` keeps
        neighbouring positions on neighbouring ranks, so it stops after
        ceil(window / piece) + 1 steps.

        ``seq_len``: the full sequence length, any positive int (default: P x the
        local length). Needed when the length is not divisible by the shard
        layout, where ranks hold token counts differing by one or two.

        ``cu_seqlens``: packed documents (batch 1), the GLOBAL packing (int32, the
        same on every rank, as given to ``shard``; it implies ``seq_len``). Every
        document is attended separately, causal and windows by the position inside
        it (as ``flash_attn_varlen_func``); chunks that share no document make no
        kernel call. Read to the host every call (a device sync on CUDA). The shards must have been cut
        for this call's ``window_size`` (``shard(..., window_size=)``): when this object made them for
        another window, every rank raises.
        """
        return self._attend(AttentionArgs(q, k, v, causal, softmax_scale, return_lse, window_size, softcap, sinks,
                                          seq_len, cu_seqlens, sdpa_layout=False, enable_gqa=True))

    def scaled_dot_product_attention(self, query, key, value, is_causal=False, scale=None, enable_gqa=False, *,
                                     window_size=(-1, -1), softcap=0.0, sinks=None, seq_len=None,
                                     cu_seqlens=None):
        """``attention`` in torch SDPA layout: query and key (B, H or Hkv, S/P, D), value (B, Hkv, S/P, Dv)."""
        out = self._attend(AttentionArgs(query, key, value, is_causal, scale, False, window_size, softcap, sinks,
                                         seq_len, cu_seqlens, sdpa_layout=True, enable_gqa=enable_gqa))
        return out.transpose(1, 2)

    def _attend(self, args):
        """Checks (once per distinct call, see ``check_across_ranks``), then attention over the mesh."""
        where = _METHODS[args.sdpa_layout]
        if torch.compiler.is_compiling():  # one custom operator, which runs _forward_op (_cp_ops.py)
            return _cp_ops.compiled_attention(self._handle, args, self.layout, where)
        softmax_scale, seq_len, packing = self._prepare(args, where)
        return usp_attention(*args.flash_views(), self._mesh, seq_len, causal_window(args.causal, args.window_size),
                             softmax_scale, bool(args.return_lse), where, float(args.softcap), args.sinks, packing)

    def _prepare(self, args, where, needs_grad=None, compiled=False):
        """A call's checks and agreement, when its key is new; returns (softmax_scale, full length, packing).
        ``needs_grad``: None reads it from q, k, v."""
        self._check_open(where, failures=False)  # usp_attention checks for failures itself
        packing, seq_len, packing_error = None, args.seq_len, None
        try:  # read on the host every call: the plan depends on the packing (a sync on CUDA)
            packing, seq_len = read_packing(args.cu_seqlens, args.seq_len, where)
        except (TypeError, ValueError) as exc:
            packing_error = exc
        try:
            needs_grad = args.needs_grad() if needs_grad is None else needs_grad
        except AttributeError:  # not tensors: the checks name the culprit
            pass
        cut = None if packing is None else self._cuts.get(packing)  # the window its shards were cut for
        key = args.key(needs_grad, seq_len, packing, compiled)
        key = None if key is None else (key, cut)
        softmax_scale = args.softmax_scale
        if packing_error is not None or not self._calls.known(key):
            def check():
                if packing_error is not None:
                    raise packing_error
                return self._check_attention(args, where, seq_len, packing, needs_grad, compiled, cut)
            fixes = {"seq_len": lambda signatures: seq_len_fix(signatures, self.layout, self._mesh.mesh_ranks)}
            softmax_scale = self._calls.agree(key, where, check, hint=args.q, fixes=fixes).softmax_scale
        return softmax_scale, seq_len or args.q.shape[2 if args.sdpa_layout else 1] * self.world_size, packing

    def _check_attention(self, args, where, seq_len, packing, needs_grad, compiled, cut=None):
        """This rank's checks of an attention call; returns what the ranks must agree on. ``cut``: the
        window left side this object cut the packing's shards for, or None."""
        softmax_scale, window_size, softcap, local_len = check_attention_arguments(args, self.ulysses_degree, where)
        check_backend(self.group, args.q.device, where)
        window_left = -1
        if packing is not None:
            if args.q.shape[0] != 1:
                raise ValueError(f"{where}: packed documents (cu_seqlens) need batch 1, got batch {args.q.shape[0]}")
            window_left = self._cut_window(packing, window_size[0])
            if cut is not None and cut != window_left:
                raise ValueError(f"{where}: the shards of these cu_seqlens were cut for a window of left side {cut} "
                                 f"(-1: none) but attention has window_size={window_size}; pass the same "
                                 "window_size to shard, positions, gather and attention")
        seq_len = self.layout.full_length(local_len, seq_len, self.mesh_rank, where, packing, window_left)
        return AttentionSignature.of(args, softmax_scale, window_size, softcap, seq_len, packing, needs_grad,
                                     compiled, local_len)

    # ------------------------------------------------------------------ under torch.compile (_cp_ops.py)

    def _forward_op(self, args, needs_grad):
        """The forward operator: ``_attend``'s eager path without autograd; (out, lse) in flash layout."""
        where = _METHODS[args.sdpa_layout]
        softmax_scale, seq_len, packing = self._prepare(args, where, needs_grad, compiled=True)
        return usp_attention_forward(*args.flash_views(), self._mesh, seq_len,
                                     causal_window(args.causal, args.window_size), softmax_scale, where,
                                     args.softcap, args.sinks, packing)

    def _backward_op(self, dout, args, out, lse):
        """The backward operator: (dq, dk, dv in flash layout, d sinks or None) from the forward's inputs and
        outputs (the forward checked and agreed on them)."""
        where = f"{_METHODS[args.sdpa_layout]} backward"
        packing, seq_len = read_packing(args.cu_seqlens, args.seq_len, where)
        q, k, v = args.flash_views()
        return usp_attention_backward(dout, q, k, v, out, lse, self._mesh, seq_len or q.shape[1] * self.world_size,
                                      causal_window(args.causal, args.window_size), args.softmax_scale, where,
                                      args.softcap, args.sinks, packing)

