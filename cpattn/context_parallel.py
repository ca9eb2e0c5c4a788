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
import torch
import torch.distributed as dist

from . import cp_ops, mindspeed
from .agreement import agree
from .comm import DEFAULT_TIMEOUT, check_backend
from .cp_calls import AgreedCalls, AttentionArgs, AttentionSignature, check_attention_arguments, check_construction, \
    read_packing, seq_len_fix
from .checks import check_seq_dim
from .cp_sharding import PackingCuts, document_positions, gather_shards, shard_positions
from .mesh import Mesh
from .usp import usp_attention, usp_attention_backward, usp_attention_forward

_METHODS = {False: "ContextParallel.attention", True: "ContextParallel.scaled_dot_product_attention"}  # by layout


class ContextParallel:
    """Attention over a sequence split across the ranks of ``group`` (None: the default group).

    ``ulysses_degree``: ranks per Ulysses (head all-to-all) group, or "auto" (needs ``num_heads``; the
    largest degree whose groups fit inside nodes). ``ring_impl``: "zigzag" or "ring". ``check_across_ranks``:
    True (the first call of each signature agrees across ranks), "always" or False. ``timeout``: how long
    a rank waits for a failed or missing peer (faults.py). Collective: every rank constructs it with the
    same arguments; ``close()`` (or ``with``) frees its communicators. docs/context-parallelism.md has
    the details.
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
        self._cuts = PackingCuts(self.ring_degree)  # the window each packing's shards were cut for
        self._closed = False
        self._handle = cp_ops.register(self._forward_op, self._backward_op)  # how compiled code names it

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

    def positions(self, seq_len, cu_seqlens=None, window_size=None):
        """Positions (CPU LongTensor) of this rank's tokens of a ``seq_len`` sequence, in local order:
        global, or with ``cu_seqlens`` (packed documents) each token's position inside its document
        (for RoPE). Any length: without documents ranks hold token counts differing by at most two.
        ``window_size``: the one ``shard`` was given; None: the one it was given for these cu_seqlens."""
        return document_positions(*shard_positions(self._mesh, self._cuts, seq_len, cu_seqlens, window_size,
                                                   "ContextParallel.positions"))

    def shard(self, x, seq_dim=1, cu_seqlens=None, window_size=(-1, -1)):
        """This rank's tokens of the full tensor ``x`` (a copy), in the order the mesh needs.

        ``cu_seqlens``: the packing of ``x``'s documents (global, int32, the same on every rank); the
        shards then hold equal tokens and equal causal work per ring rank (dispatch.py) and must be used
        with the same ``cu_seqlens``. ``window_size``: the window ``attention`` will use, so the work is
        balanced for it (packed documents; without them the shards do not depend on it); ``attention``
        with another window (layers of several) is exact on these shards, only less balanced."""
        where = "ContextParallel.shard"
        seq_dim = check_seq_dim(x, seq_dim, where)
        self.layout.check_seq_len(x.shape[seq_dim], where)
        positions, _ = shard_positions(self._mesh, self._cuts, x.shape[seq_dim], cu_seqlens, window_size, where,
                                       remember=True)
        return x.index_select(seq_dim, positions.to(x.device))

    def gather(self, x, seq_dim=1, seq_len=None, cu_seqlens=None, window_size=None):
        """The full tensor, in natural order, on every rank, from every rank's shard (not differentiable).

        ``seq_len``: the full length; needed when it is not P x the local length (uneven lengths).
        ``cu_seqlens`` and ``window_size``: those ``shard`` was given (``cu_seqlens`` implies the length;
        ``window_size`` None: the one ``shard`` was given for these cu_seqlens)."""
        self._check_open("ContextParallel.gather")
        return gather_shards(x, seq_dim, seq_len, cu_seqlens, window_size, self._mesh, self._calls, self._cuts,
                             self.group, "ContextParallel.gather")

    @property
    def compiled_handle(self):
        """The int that names this object's forward and backward operators in compiled graphs
        (``cpattn.cp_ops``): what ``compiled_attention`` takes."""
        return self._handle

    # ------------------------------------------------------------------ attention

    def attention(self, q, k, v, causal=False, softmax_scale=None, return_lse=False, window_size=(-1, -1),
                  softcap=0.0, sinks=None, seq_len=None, cu_seqlens=None):
        """Attention of local shards in flash layout: q (B, S/P, H, D), k (B, S/P, Hkv, D) and
        v (B, S/P, Hkv, Dv) from ``shard`` (or in its order); returns this rank's shard of single-device
        attention's output (B, S/P, H, Dv), differentiable in q, k, v, and with ``return_lse`` its lse
        (B, H, S/P) float32, natural log (not differentiable). ``causal``, ``window_size``, ``softcap``
        and ``sinks`` (H,) as in ``cpattn.flash_attn_func``, by global position; the default scale is
        1/sqrt(D). ``seq_len``: the full length (default P x the local length; needed when uneven).
        ``cu_seqlens``: packed documents (batch 1), the global packing given to ``shard`` (it implies
        ``seq_len``; read to the host every call). Semantics, costs and windows' skipped steps:
        docs/context-parallelism.md and docs/packed-documents.md.
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
        if torch.compiler.is_compiling():  # one custom operator, which runs _forward_op (cp_ops.py)
            return cp_ops.compiled_attention(self._handle, args, self.layout, where)
        softmax_scale, seq_len, packing, cut = self._prepare(args, where)
        return usp_attention(*args.flash_views(), self._mesh, seq_len, args.mask(),
                             softmax_scale, bool(args.return_lse), where, float(args.softcap), args.sinks, packing, cut)

    def _prepare(self, args, where, needs_grad=None, compiled=False):
        """A call's checks and agreement, when its key is new; returns (softmax_scale, full length, packing, the
        window left side its shards were cut for). ``needs_grad``: None reads it from q, k, v."""
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
        cut = self._cuts.of(packing)  # the window its shards were cut for
        key = args.key(needs_grad, seq_len, packing, compiled)
        key = None if key is None else (key, cut)
        softmax_scale = args.softmax_scale
        if packing_error is not None or not self._calls.known(key):
            def check():
                if packing_error is not None:
                    raise packing_error
                return self._check_attention(args, where, seq_len, packing, needs_grad, compiled)
            fixes = {"seq_len": lambda signatures: seq_len_fix(signatures, self.layout, self._mesh.mesh_ranks)}
            softmax_scale = self._calls.agree(key, where, check, hint=args.q, fixes=fixes).softmax_scale
        return (softmax_scale, seq_len or args.q.shape[2 if args.sdpa_layout else 1] * self.world_size, packing,
                self._cuts.shards_cut(packing, args.window_size[0]))

    def _check_attention(self, args, where, seq_len, packing, needs_grad, compiled):
        """This rank's checks of an attention call; returns what the ranks must agree on, the window its packed
        shards were cut for among it (``PackingCuts.shards_cut``), which the attention's own window may differ
        from (a model whose layers use several: exact, balanced for the cut)."""
        softmax_scale, window_size, softcap, local_len = check_attention_arguments(args, self.ulysses_degree, where)
        check_backend(self.group, args.q.device, where)
        window_left = -1
        if packing is not None:
            if args.q.shape[0] != 1:
                raise ValueError(f"{where}: packed documents (cu_seqlens) need batch 1, got batch {args.q.shape[0]}")
            window_left = self._cuts.shards_cut(packing, window_size[0])
        seq_len = self.layout.full_length(local_len, seq_len, self.mesh_rank, where, packing, window_left)
        return AttentionSignature.of(args, softmax_scale, window_size, softcap, seq_len, packing, window_left,
                                     needs_grad, compiled, local_len)

    # ------------------------------------------------------------------ under torch.compile (cp_ops.py)

    def _forward_op(self, args, needs_grad):
        """The forward operator: ``_attend``'s eager path without autograd; (out, lse) in flash layout."""
        where = _METHODS[args.sdpa_layout]
        softmax_scale, seq_len, packing, cut = self._prepare(args, where, needs_grad, compiled=True)
        return usp_attention_forward(*args.flash_views(), self._mesh, seq_len,
                                     args.mask(), softmax_scale, where,
                                     args.softcap, args.sinks, packing, cut)

    def _backward_op(self, dout, args, out, lse):
        """The backward operator: (dq, dk, dv in flash layout, d sinks or None) from the forward's inputs and
        outputs (the forward checked and agreed on them)."""
        where = f"{_METHODS[args.sdpa_layout]} backward"
        packing, seq_len = read_packing(args.cu_seqlens, args.seq_len, where)
        q, k, v = args.flash_views()
        return usp_attention_backward(dout, q, k, v, out, lse, self._mesh, seq_len or q.shape[1] * self.world_size,
                                      args.mask(), args.softmax_scale, where,
                                      args.softcap, args.sinks, packing, self._cuts.shards_cut(packing,
                                                                                               args.window_size[0]))

