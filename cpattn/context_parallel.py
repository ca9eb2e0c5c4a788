"""The public context-parallel API: ``ContextParallel``, its MindSpeed-style
configuration (``from_config``) and the matching argparse options.

A ``ContextParallel`` object is a mesh over a process group: P ranks =
ring_degree x ulysses_degree (``mesh.py`` says which rank is where). It sets up
its communication once, at construction (``comm.Communicator``: process groups
shared with every other ContextParallel over the same ranks, freed by
``close()``). Every call that communicates checks its inputs locally and, the
first time each distinct call signature is seen, exchanges a small summary of
them with the other ranks, so a bad input raises on every rank instead of
leaving some blocked in a collective; later calls with a known signature do no
collective and no device-to-host copy besides the attention itself. A failure
inside a call makes every rank raise within ``timeout`` (faults.py).
"""
import argparse
import struct

import torch
import torch.distributed as dist

from cpattn.kernels import MaskSpec

from . import _cp_ops
from ._checks import check_cu_seqlens, check_qkv, check_scale, check_sinks, check_softcap, check_timeout, check_window, \
    positive_int
from .comm import DEFAULT_TIMEOUT, Communicator, RingComm, UlyssesComm, check_agreement, check_backend, dtype_code, gather_rows, \
    global_ranks
from .faults import comm_error
from .layout import RING_IMPLS, Layout, doc_positions
from .mesh import auto_ulysses_degree, node_of_this_process, plan_mesh
from .ulysses import check_heads
from .usp import MeshComms, usp_attention, usp_attention_backward, usp_attention_forward

__all__ = ["ContextParallel", "add_context_parallel_args", "auto_ulysses_degree", "CP_ALGOS"]

CP_ALGOS = ("ulysses_cp_algo", "megatron_cp_algo", "hybrid_cp_algo")

_CONSTRUCTION_FIELDS = ("ulysses_degree (-1: auto)", "ring_impl index", "num_heads", "num_kv_heads", "timeout ms")
# A call's signature: what must be the same on every rank. Later arguments (window_size, softcap, sinks,
# cu_seqlens: a hash of its host copy) join by appending fields here and in _attention_signature.
_ATTENTION_FIELDS = (*[f"{name}.shape[{i}]" for name in ("q", "k", "v") for i in range(4)], "dtype", "causal",
                     "return_lse", "needs grad", "softmax_scale bits", "sdpa layout", "window left", "window right",
                     "softcap bits", "sinks", "seq_len", "cu_seqlens hash", "compiled")
_GATHER_FIELDS = ("dtype", "ndim", "seq_dim", *[f"size[{i}] (seq_dim: seq_len)" for i in range(8)],
                  "cu_seqlens hash")
_METHODS = {False: "ContextParallel.attention", True: "ContextParallel.scaled_dot_product_attention"}  # by layout
_MAX_SIGNATURES = 4096  # agreed signatures kept per object (shapes that change every call would grow it)


def _check_ulysses_degree(ulysses_degree, world_size, num_heads, where):
    """``ulysses_degree`` as given ("auto" or a valid int); raises TypeError/ValueError."""
    if ulysses_degree == "auto":
        if num_heads is None:
            raise ValueError(f"{where}: ulysses_degree='auto' needs num_heads (the query head count) "
                             "to choose a degree that splits the heads")
        return ulysses_degree
    if isinstance(ulysses_degree, str):
        raise ValueError(f"{where}: ulysses_degree must be a positive int or 'auto', got {ulysses_degree!r}")
    if isinstance(ulysses_degree, bool) or not isinstance(ulysses_degree, int):
        raise TypeError(f"{where}: ulysses_degree must be a positive int or 'auto', "
                        f"got {type(ulysses_degree).__name__}")
    if ulysses_degree < 1:
        raise ValueError(f"{where}: ulysses_degree must be a positive int, got {ulysses_degree}")
    if world_size % ulysses_degree:
        raise ValueError(f"{where}: ulysses_degree {ulysses_degree} does not divide the group size {world_size}")
    return ulysses_degree


def _check_options(check_across_ranks, timeout, where):
    if not (check_across_ranks is True or check_across_ranks is False or check_across_ranks == "always"):
        raise ValueError(f"{where}: check_across_ranks must be True, False or 'always', got {check_across_ranks!r}")
    check_timeout(timeout, where)


def _float_bits(x):
    return 0 if x is None else struct.unpack("<q", struct.pack("<d", x))[0]


def _flash_layout(q, k, v, sdpa_layout):
    """q, k, v as (B, S, H, D) views: the kernels read any strides."""
    return (q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)) if sdpa_layout else (q, k, v)


def _docs_hash(docs):
    """An int naming a packing (the same in every process: hashes of int tuples are not salted); 0 for none."""
    return 0 if docs is None else hash(docs)


def _packing(cu_seqlens, seq_len, where):
    """(packing as a tuple or None, full length): ``cu_seqlens`` checked (int32, from 0, non-decreasing,
    ending at ``seq_len`` when that is given) and read to the host."""
    if cu_seqlens is None:
        return None, seq_len
    if seq_len is None and isinstance(cu_seqlens, torch.Tensor) and cu_seqlens.dim() == 1 and cu_seqlens.numel():
        seq_len = int(cu_seqlens[-1])
    check_cu_seqlens(cu_seqlens, seq_len, seq_len, cu_seqlens.device, "cu_seqlens", where)
    Layout.check_seq_len(seq_len, where)
    return tuple(cu_seqlens.tolist()), seq_len


def _attention_signature(q, k, v, causal, scale, return_lse, sdpa_layout, window, softcap, sinks, seq_len, docs,
                         needs_grad, compiled):
    """What must agree across ranks; the local sequence lengths (which may differ by a token) count only
    through the full ``seq_len``, which each rank has checked against its own. ``compiled``: the call is
    torch.compile's operator, whose forward also sends lse back and whose backward sends its inputs
    again, so it cannot meet an eager call on another rank."""
    seq_dim = 2 if sdpa_layout else 1
    shapes = [size if dim != seq_dim else -1 for t in (q, k, v) for dim, size in enumerate(t.shape)]
    return (*shapes, dtype_code(q.dtype), int(causal), int(return_lse), int(needs_grad),
            _float_bits(scale), int(sdpa_layout), *window, _float_bits(softcap), int(sinks is not None), seq_len,
            _docs_hash(docs), int(compiled))


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
        where = "ContextParallel"
        error, row, node = None, [0] * len(_CONSTRUCTION_FIELDS), (0, 0)
        try:
            node = node_of_this_process(dist.get_rank())  # "auto" needs every rank's node
            if ring_impl not in RING_IMPLS:
                raise ValueError(f"{where}: ring_impl must be one of {RING_IMPLS}, got {ring_impl!r}")
            _check_options(check_across_ranks, timeout, where)
            num_heads = positive_int(num_heads, "num_heads", where, allow_none=True)
            num_kv_heads = positive_int(num_kv_heads, "num_kv_heads", where, allow_none=True)
            requested = _check_ulysses_degree(ulysses_degree, self.world_size, num_heads, where)
            if num_heads is not None and requested != "auto":
                check_heads(num_heads, num_kv_heads or num_heads, requested, where)
            row = [-1 if requested == "auto" else requested, RING_IMPLS.index(ring_impl), num_heads or 0,
                   num_kv_heads or 0, round(timeout * 1000)]
        except (TypeError, ValueError) as exc:
            error = exc
        # Every rank must build the same mesh: the ranks agree on the arguments and learn each other's nodes.
        rows = [[0 if error is None else 1, *row, *node]]
        if self.world_size > 1:
            rows = gather_rows(self.group, rows[0])
        check_agreement([r[:1 + len(row)] for r in rows], error, where, _CONSTRUCTION_FIELDS)
        self.check_across_ranks, self.timeout = check_across_ranks, float(timeout)
        self._plan = plan_mesh(requested, [tuple(r[-2:]) for r in rows], num_heads, num_kv_heads)
        degree = self._plan.ulysses_degree
        self.layout = Layout(self.world_size // degree, degree, ring_impl)
        self.mesh_rank = self._plan.order.index(self.rank)
        self.ring_index, self.ulysses_index = divmod(self.mesh_rank, degree)
        self._mesh_ranks = [self._plan.order.index(g) for g in range(self.world_size)]  # of each group rank
        self._agreed = {}  # keys of the calls checked here and agreed on across ranks
        self._closed = False
        self._comm = None
        if self.world_size > 1:
            self._comm = Communicator(self.group, self.timeout, self._plan.ulysses_groups() if degree > 1 else None)
        self._mesh = self._build_mesh()
        self._handle = _cp_ops.register(self._forward_op, self._backward_op)  # how compiled code names it

    def _build_mesh(self):
        comm, degree, ring_degree = self._comm, self.ulysses_degree, self.ring_degree
        ring = ulysses = None
        if comm is not None:
            ranks, order = global_ranks(self.group), self._plan.order
            if ring_degree > 1:
                ring = RingComm(comm, [ranks[order[r * degree + self.ulysses_index]] for r in range(ring_degree)])
            if degree > 1:
                ulysses = UlyssesComm(comm, [ranks[g] for g in self._plan.ulysses_groups()[self.ring_index]])
        return MeshComms(self.layout, self.ring_index, comm, ring, ulysses)

    ring_degree = property(lambda self: self.layout.ring_degree)
    ulysses_degree = property(lambda self: self.layout.ulysses_degree)
    ring_impl = property(lambda self: self.layout.ring_impl)

    def __repr__(self):
        return (f"ContextParallel(ring_degree={self.ring_degree}, ulysses_degree={self.ulysses_degree}, "
                f"ring_impl={self.ring_impl!r}, rank={self.rank})")

    def describe(self):
        """The mesh and why: degrees, every Ulysses group and ring (global ranks), nodes, communicators."""
        ranks, order, degree = global_ranks(self.group), self._plan.order, self.ulysses_degree
        return {
            "ring_degree": self.ring_degree, "ulysses_degree": degree, "ring_impl": self.ring_impl,
            "rank": self.rank, "mesh_rank": self.mesh_rank, "ring_index": self.ring_index,
            "ulysses_index": self.ulysses_index,
            "ulysses_groups": [[ranks[g] for g in group] for group in self._plan.ulysses_groups()],
            "rings": [[ranks[order[r * degree + u]] for r in range(self.ring_degree)] for u in range(degree)],
            "node_of_rank": {ranks[g]: node for g, node in enumerate(self._plan.nodes)},
            "communicators": "none (one rank)" if self._comm is None else self._comm.describe(),
            "why": self._plan.reason,
        }

    # ------------------------------------------------------------------ lifetime

    def close(self):
        """Give back the communicators (destroyed when no other ContextParallel uses them). Local; idempotent."""
        self._closed = True
        if self._comm is not None:
            self._comm.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc_info):
        self.close()

    # ------------------------------------------------------------------ configuration

    @classmethod
    def from_config(cls, context_parallel_size=None, context_parallel_algo="ulysses_cp_algo",
                    ulysses_degree_in_cp=None, *, group=None, ring_impl="zigzag", num_heads=None,
                    num_kv_heads=None, tensor_parallel_size=1, check_across_ranks=True,
                    timeout=DEFAULT_TIMEOUT):
        """Build from MindSpeed-style options.

        ``context_parallel_algo``: "ulysses_cp_algo" (all ranks in one Ulysses
        group), "megatron_cp_algo" (ring over all ranks), "hybrid_cp_algo"
        (Ulysses groups of ``ulysses_degree_in_cp`` ranks, ring across them;
        "auto" allowed). ``context_parallel_size`` must equal the group size
        (None: take it from the group). With ``num_heads`` (the model's query
        heads) the heads must be divisible by tensor_parallel_size x Ulysses
        degree; ``num_heads // tensor_parallel_size`` are the heads each rank's
        attention sees.
        """
        where = "ContextParallel.from_config"
        if context_parallel_algo not in CP_ALGOS:
            raise ValueError(f"{where}: context_parallel_algo must be one of {CP_ALGOS}, got {context_parallel_algo!r}")
        if not (dist.is_available() and dist.is_initialized()):
            raise RuntimeError(f"{where}: torch.distributed is not initialised (call init_process_group first)")
        group_size = dist.get_world_size(dist.group.WORLD if group is None else group)
        size = positive_int(context_parallel_size, "context_parallel_size", where, allow_none=True) or group_size
        if size != group_size:
            raise ValueError(f"{where}: context_parallel_size {size} differs from the process group's size "
                             f"{group_size}; pass the context-parallel group as group=")
        tp = positive_int(tensor_parallel_size, "tensor_parallel_size", where)
        implied = {"ulysses_cp_algo": size, "megatron_cp_algo": 1}.get(context_parallel_algo)
        if implied is None:  # hybrid
            if ulysses_degree_in_cp is None:
                raise ValueError(f"{where}: hybrid_cp_algo needs ulysses_degree_in_cp")
            degree = ulysses_degree_in_cp
            if degree != "auto":
                positive_int(degree, "ulysses_degree_in_cp", where)
                if size % degree:
                    raise ValueError(f"{where}: context_parallel_size {size} is not divisible by "
                                     f"ulysses_degree_in_cp {degree}")
        else:
            if ulysses_degree_in_cp not in (None, implied):
                raise ValueError(f"{where}: ulysses_degree_in_cp={ulysses_degree_in_cp!r} contradicts "
                                 f"{context_parallel_algo}, whose Ulysses degree is {implied}")
            degree = implied
        heads = kv_heads = None
        if num_heads is not None:
            num_heads = positive_int(num_heads, "num_heads", where)
            if num_heads % tp:
                raise ValueError(f"{where}: num_heads {num_heads} is not divisible by tensor_parallel_size {tp}")
            heads = num_heads // tp
            if degree != "auto" and heads % degree:
                raise ValueError(f"{where}: num_heads {num_heads} is not divisible by tensor_parallel_size x "
                                 f"ulysses degree = {tp} x {degree}")
            if num_kv_heads is not None:
                num_kv_heads = positive_int(num_kv_heads, "num_kv_heads", where)
                if num_kv_heads % tp:
                    raise ValueError(f"{where}: num_kv_heads {num_kv_heads} is not divisible by "
                                     f"tensor_parallel_size {tp}")
                kv_heads = num_kv_heads // tp
        return cls(group, degree, ring_impl, num_heads=heads, num_kv_heads=kv_heads,
                   check_across_ranks=check_across_ranks, timeout=timeout)

    @classmethod
    def from_args(cls, args, **kwargs):
        """``from_config`` with the options ``add_context_parallel_args`` parsed into ``args``."""
        return cls.from_config(args.context_parallel_size, args.context_parallel_algo, args.ulysses_degree_in_cp,
                               **kwargs)

    # ------------------------------------------------------------------ sharding

    def _seq_dim(self, x, seq_dim, where):
        if not isinstance(x, torch.Tensor):
            raise TypeError(f"{where}: expected a torch.Tensor, got {type(x).__name__}")
        if isinstance(seq_dim, bool) or not isinstance(seq_dim, int):
            raise TypeError(f"{where}: seq_dim must be an int, got {type(seq_dim).__name__}")
        if not -x.dim() <= seq_dim < x.dim():
            raise ValueError(f"{where}: seq_dim {seq_dim} is out of range for a {x.dim()}-D tensor")
        return seq_dim % x.dim()

    def positions(self, seq_len, cu_seqlens=None):
        """Positions (CPU LongTensor) of this rank's tokens of a ``seq_len`` sequence, in local order:
        global, or with ``cu_seqlens`` (packed documents) each token's position inside its document
        (for RoPE). Any length: without documents ranks hold token counts differing by at most two."""
        docs, seq_len = _packing(cu_seqlens, seq_len, "ContextParallel.positions")
        tokens = self.layout.positions(seq_len, self.mesh_rank, docs)
        return tokens if docs is None else doc_positions(docs)[tokens]

    def _full_length(self, local_len, seq_len, where, docs=None):
        """The full sequence length (``seq_len``, or local_len x P when None), checked against the
        ``local_len`` tokens this rank holds."""
        if seq_len is None:
            seq_len = local_len * self.world_size
        self.layout.check_seq_len(seq_len, where)
        expected = self.layout.local_lengths(seq_len, docs)[self.mesh_rank]
        if local_len != expected:
            raise ValueError(f"{where}: this rank holds {local_len} tokens, but its shard of a {seq_len}-token "
                             f"sequence has {expected} (with uneven lengths pass the full length as seq_len=)")
        return seq_len

    def shard(self, x, seq_dim=1, cu_seqlens=None):
        """This rank's tokens of the full tensor ``x`` (a copy), in the order the mesh needs.

        ``cu_seqlens``: the packing of ``x``'s documents (global, int32, the same on every rank); the
        shards then balance causal work (``Layout``) and must be used with the same ``cu_seqlens``."""
        where = "ContextParallel.shard"
        seq_dim = self._seq_dim(x, seq_dim, where)
        self.layout.check_seq_len(x.shape[seq_dim], where)
        docs, seq_len = _packing(cu_seqlens, x.shape[seq_dim], where)
        return x.index_select(seq_dim, self.layout.positions(seq_len, self.mesh_rank, docs).to(x.device))

    def gather(self, x, seq_dim=1, seq_len=None, cu_seqlens=None):
        """The full tensor, in natural order, on every rank, from every rank's shard (not differentiable).

        ``seq_len``: the full length; needed when it is not P x the local length (uneven lengths).
        ``cu_seqlens``: the packing ``shard`` was given (it implies the length)."""
        where = "ContextParallel.gather"
        self._check_open(where)
        error, signature = None, None
        try:
            seq_dim = self._seq_dim(x, seq_dim, where)
            if x.dim() > 8:
                raise ValueError(f"{where}: at most 8 dimensions are supported, got {x.dim()}")
            check_backend(self.group, x.device, where)
            docs, seq_len = _packing(cu_seqlens, seq_len, where)
            seq_len = self._full_length(x.shape[seq_dim], seq_len, where, docs)
            shape = [seq_len if dim == seq_dim else size for dim, size in enumerate(x.shape)]
            signature = (dtype_code(x.dtype), x.dim(), seq_dim, *shape, *[0] * (8 - x.dim()), _docs_hash(docs))
        except (TypeError, ValueError) as exc:
            error = exc
        self._agree(("gather", signature), signature, error, where, _GATHER_FIELDS, x)
        lengths = [self.layout.local_lengths(seq_len, docs)[m] for m in self._mesh_ranks]  # of each group rank
        pieces = [x]
        if self._comm is not None:
            # all_gather moves equal shapes: every shard travels padded to the longest one
            longest = max(lengths)
            padded = x.new_zeros([longest if dim == seq_dim else size for dim, size in enumerate(x.shape)])
            padded.narrow(seq_dim, 0, x.shape[seq_dim]).copy_(x)
            pieces = [torch.empty_like(padded) for _ in range(self.world_size)]
            try:
                work = dist.all_gather(pieces, padded, group=self._comm.group, async_op=True)
                self._comm.wait([work], x.device.type == "cpu")
            except Exception as exc:
                self._comm.fail(where, comm_error("all-gather", exc))
        stacked = torch.cat([p.narrow(seq_dim, 0, n) for p, n in zip(pieces, lengths)], dim=seq_dim)
        order = self.layout.order(seq_len, self._mesh_ranks, docs).to(x.device)  # group rank after group rank
        return torch.empty_like(stacked).index_copy_(seq_dim, order, stacked)

    # ------------------------------------------------------------------ agreement

    def _check_open(self, where, failures=True):
        if self._closed:
            raise RuntimeError(f"{where}: this ContextParallel was closed")
        if failures and self._comm is not None:
            self._comm.check(where)

    def _agree(self, key, signature, error, where, field_names, hint):
        """Make every rank reach the same verdict on a call (see ``check_across_ranks``); raises like
        ``comm.check_agreement``. ``key``: what identifies the call here; ``signature``: ints, None on error."""
        mode = self.check_across_ranks
        if self._comm is None or mode is False:
            if error is not None:
                raise error
            return
        if error is None and mode is True and key in self._agreed:
            return
        if error is not None and mode is True and self._agreed:
            # The other ranks may know their signature already and skip the exchange: rather than
            # wait for them in it, close the communicators, which makes them raise at once.
            self._comm.fail(where, error)
        try:
            rows = gather_rows(self._comm.group, [0 if error is None else 1, *(signature or [0] * len(field_names))],
                               hint, self._comm)
        except Exception as exc:
            self._comm.fail(where, error if error is not None else comm_error("agreement all-gather", exc))
        check_agreement(rows, error, where, field_names)
        if len(self._agreed) >= _MAX_SIGNATURES:
            self._agreed.clear()
        self._agreed[key] = True

    # ------------------------------------------------------------------ attention

    def _attention(self, q, k, v, causal, softmax_scale, return_lse, where, sdpa_layout, enable_gqa=True,
                   window_size=(-1, -1), softcap=0.0, sinks=None, seq_len=None, cu_seqlens=None):
        """Checks (once per distinct call, see ``check_across_ranks``), then attention over the mesh."""
        if torch.compiler.is_compiling():
            return self._compiled_attention(q, k, v, causal, softmax_scale, return_lse, where, sdpa_layout,
                                            enable_gqa, window_size, softcap, sinks, seq_len, cu_seqlens)
        softmax_scale, seq_len, docs = self._prepare(q, k, v, causal, softmax_scale, return_lse, where, sdpa_layout,
                                                     enable_gqa, window_size, softcap, sinks, seq_len, cu_seqlens)
        q, k, v = _flash_layout(q, k, v, sdpa_layout)
        window = MaskSpec(bool(causal), window_size).window  # causal is the right bound 0
        return usp_attention(q, k, v, self._mesh, seq_len, window, softmax_scale, bool(return_lse), where,
                             float(softcap), sinks, docs)

    def _prepare(self, q, k, v, causal, softmax_scale, return_lse, where, sdpa_layout, enable_gqa, window_size,
                 softcap, sinks, seq_len, cu_seqlens, needs_grad=None, compiled=False):
        """A call's checks and agreement (``_check_attention``, when its key is new); returns (softmax_scale,
        full length, packed documents or None). ``needs_grad``: None reads it from q, k, v."""
        self._check_open(where, failures=False)  # usp_attention checks for failures itself
        docs, packing_error = None, None
        try:  # read on the host every call: the plan depends on the packing (a sync on CUDA)
            docs, seq_len = _packing(cu_seqlens, seq_len, where)
        except (TypeError, ValueError) as exc:
            packing_error = exc
        try:  # what the local checks depend on; a new key is checked and agreed on
            if needs_grad is None:
                needs_grad = torch.is_grad_enabled() and (q.requires_grad or k.requires_grad or v.requires_grad)
            key = (q.shape, k.shape, v.shape, q.dtype, k.dtype, v.dtype, q.device, k.device, v.device, bool(causal),
                   softmax_scale, bool(return_lse), enable_gqa, sdpa_layout, needs_grad, tuple(window_size), softcap,
                   None if sinks is None else (sinks.shape, sinks.dtype, sinks.device), seq_len, docs, compiled)
            known = packing_error is None and self.check_across_ranks != "always" and key in self._agreed
        except (AttributeError, TypeError):  # not tensors, or an unhashable argument
            key, known = None, False
        if not known:
            softmax_scale = self._check_attention(key, q, k, v, causal, softmax_scale, return_lse, where,
                                                  sdpa_layout, enable_gqa, window_size, softcap, sinks, seq_len,
                                                  docs, packing_error, needs_grad, compiled)
        return softmax_scale, seq_len or q.shape[2 if sdpa_layout else 1] * self.world_size, docs

    def _check_arguments(self, q, k, v, softmax_scale, where, sdpa_layout, enable_gqa, window_size, softcap,
                         sinks):
        """The checks that read nothing but the arguments (no host data, no group); returns (softmax_scale,
        window_size, softcap) checked and the local sequence length."""
        _, seqlen_q, seqlen_k, heads, heads_kv, _ = check_qkv(q, k, v, where, "sdpa" if sdpa_layout else "flash",
                                                             same_value_dim=False)
        softmax_scale = check_scale(softmax_scale, where)
        window_size = check_window(window_size, where)
        softcap = check_softcap(softcap, where)
        check_sinks(sinks, heads, q.device, where)
        if heads != heads_kv and not enable_gqa:
            raise ValueError(f"{where}: query has {heads} heads but key/value have {heads_kv}; "
                             "pass enable_gqa=True for grouped-query attention")
        if seqlen_q != seqlen_k:
            raise ValueError(f"{where}: queries and keys must have the same local sequence length "
                             f"(self-attention over one sharded sequence), got {seqlen_q} and {seqlen_k}")
        check_heads(heads, heads_kv, self.ulysses_degree, where)
        return softmax_scale, window_size, softcap, seqlen_q

    def _check_attention(self, key, q, k, v, causal, softmax_scale, return_lse, where, sdpa_layout, enable_gqa,
                         window_size, softcap, sinks, seq_len, docs, packing_error, needs_grad, compiled):
        """Local checks, then the cross-rank agreement; returns the softmax scale."""
        error, signature = None, None
        try:
            if packing_error is not None:
                raise packing_error
            softmax_scale, window_size, softcap, seqlen = self._check_arguments(
                q, k, v, softmax_scale, where, sdpa_layout, enable_gqa, window_size, softcap, sinks)
            check_backend(self.group, q.device, where)
            if docs is not None and q.shape[0] != 1:
                raise ValueError(f"{where}: packed documents (cu_seqlens) need batch 1, got batch {q.shape[0]}")
            seq_len = self._full_length(seqlen, seq_len, where, docs)
            signature = _attention_signature(q, k, v, causal, softmax_scale, return_lse, sdpa_layout, window_size,
                                             softcap, sinks, seq_len, docs, needs_grad, compiled)
        except (TypeError, ValueError) as exc:
            error = exc
        self._agree(key, signature, error, where, _ATTENTION_FIELDS, q if error is None else None)
        return softmax_scale

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
        kernel call. Read to the host every call (a device sync on CUDA).
        """
        return self._attention(q, k, v, causal, softmax_scale, return_lse, _METHODS[False], False, True,
                               window_size, softcap, sinks, seq_len, cu_seqlens)

    def scaled_dot_product_attention(self, query, key, value, is_causal=False, scale=None, enable_gqa=False, *,
                                     window_size=(-1, -1), softcap=0.0, sinks=None, seq_len=None,
                                     cu_seqlens=None):
        """``attention`` in torch SDPA layout: query and key (B, H or Hkv, S/P, D), value (B, Hkv, S/P, Dv)."""
        out = self._attention(query, key, value, is_causal, scale, False, _METHODS[True], True, enable_gqa,
                              window_size, softcap, sinks, seq_len, cu_seqlens)
        return out.transpose(1, 2)

    # ------------------------------------------------------------------ under torch.compile (_cp_ops.py)

    def _compiled_attention(self, q, k, v, causal, softmax_scale, return_lse, where, sdpa_layout, enable_gqa,
                            window_size, softcap, sinks, seq_len, cu_seqlens):
        """``_attention`` while dynamo traces: the checks of the arguments alone run here (a bad argument
        raises while compiling), then the call is one custom operator that runs ``_forward_op``."""
        softmax_scale, window_size, softcap, _ = self._check_arguments(q, k, v, softmax_scale, where, sdpa_layout,
                                                                       enable_gqa, window_size, softcap, sinks)
        if seq_len is not None:
            self.layout.check_seq_len(seq_len, where)
        if cu_seqlens is not None and not isinstance(cu_seqlens, torch.Tensor):
            raise TypeError(f"{where}: cu_seqlens must be an int32 tensor, got {type(cu_seqlens).__name__}")
        out, lse = _cp_ops.attention(self._handle, q, k, v, causal, softmax_scale, return_lse, sdpa_layout,
                                     enable_gqa, window_size, softcap, sinks, seq_len, cu_seqlens)
        return (out, lse) if return_lse else out

    def _forward_op(self, q, k, v, sinks, cu_seqlens, causal, softmax_scale, return_lse, sdpa_layout, enable_gqa,
                    window_size, softcap, seq_len, needs_grad):
        """The forward operator: ``_attention``'s eager path without autograd; (out, lse) in flash layout."""
        where = _METHODS[sdpa_layout]
        softmax_scale, seq_len, docs = self._prepare(q, k, v, causal, softmax_scale, return_lse, where, sdpa_layout,
                                                     enable_gqa, window_size, softcap, sinks, seq_len, cu_seqlens,
                                                     needs_grad, compiled=True)
        q, k, v = _flash_layout(q, k, v, sdpa_layout)
        window = MaskSpec(causal, window_size).window
        return usp_attention_forward(q, k, v, self._mesh, seq_len, window, softmax_scale, where, softcap, sinks,
                                     docs)

    def _backward_op(self, dout, q, k, v, out, lse, sinks, cu_seqlens, causal, softmax_scale, sdpa_layout,
                     window_size, softcap, seq_len):
        """The backward operator: (dq, dk, dv in flash layout, d sinks or None) from the forward's inputs and
        outputs (the forward checked and agreed on them)."""
        where = f"{_METHODS[sdpa_layout]} backward"
        docs, seq_len = _packing(cu_seqlens, seq_len, where)
        q, k, v = _flash_layout(q, k, v, sdpa_layout)
        window = MaskSpec(causal, window_size).window
        return usp_attention_backward(dout, q, k, v, out, lse, self._mesh, seq_len or q.shape[1] * self.world_size,
                                      window, softmax_scale, where, softcap, sinks, docs)

def _ulysses_degree_arg(text):
    if text == "auto":
        return text
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive int or 'auto', got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive int or 'auto', got {value}")
    return value


def add_context_parallel_args(parser):
    """Add --context-parallel-size, --context-parallel-algo, --ulysses-degree-in-cp to ``parser``.

    Same names and meaning as MindSpeed's; read them back with
    ``ContextParallel.from_args(args)``. The size defaults to the whole process group.
    """
    group = parser.add_argument_group("context parallelism")
    group.add_argument("--context-parallel-size", type=int, default=None,
                       help="ranks in the context-parallel group (default: the whole process group)")
    group.add_argument("--context-parallel-algo", choices=CP_ALGOS, default="ulysses_cp_algo",
                       help="ulysses_cp_algo: head all-to-all; megatron_cp_algo: (zigzag) ring; "
                            "hybrid_cp_algo: Ulysses inside groups of --ulysses-degree-in-cp ranks, ring across")
    group.add_argument("--ulysses-degree-in-cp", type=_ulysses_degree_arg, default=None,
                       help="Ulysses group size for hybrid_cp_algo (a divisor of the CP size, or 'auto')")
    return parser
