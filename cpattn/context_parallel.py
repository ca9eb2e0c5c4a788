"""The public context-parallel API: ``ContextParallel``, its MindSpeed-style
configuration (``from_config``) and the matching argparse options.

A ``ContextParallel`` object is a mesh over a process group: P ranks =
ring_degree x ulysses_degree, rank = ring_index * ulysses_degree + ulysses_index.
It sets up its communication (and subgroups) once, at construction. Every
method that communicates first checks its inputs on every rank and exchanges a
small summary of them, so a bad input raises on every rank instead of leaving
some blocked in a collective.
"""
import argparse
import os

import torch
import torch.distributed as dist

from ._checks import check_qkv, check_scale, positive_int
from .comm import agree_on_inputs, build_mesh_comms, check_backend, dtype_code
from .layout import RING_IMPLS, Layout
from .ulysses import check_heads
from .usp import usp_attention

CP_ALGOS = ("ulysses_cp_algo", "megatron_cp_algo", "hybrid_cp_algo")
_SIGNATURE_FIELDS = (*[f"{name}.shape[{i}]" for name in ("q", "k", "v") for i in range(4)], "dtype", "causal")


def auto_ulysses_degree(world_size, num_heads, num_kv_heads=None, local_world_size=None):
    """The Ulysses degree ``ulysses_degree="auto"`` picks.

    The largest d that divides the group size, the query head count and the
    ranks per node (LOCAL_WORLD_SIZE, or the group size when unset), and for
    which the kv heads split or replicate evenly (d divides Hkv or Hkv divides
    d). The all-to-all then stays inside a node (Ulysses ranks are adjacent)
    and the ring, whose P2P traffic is lighter and overlapped, spans the rest.
    """
    num_kv_heads = num_heads if num_kv_heads is None else num_kv_heads
    if local_world_size is None:
        local_world_size = int(os.environ.get("LOCAL_WORLD_SIZE", world_size))
    for degree in range(min(world_size, local_world_size), 0, -1):
        if (world_size % degree == 0 and local_world_size % degree == 0 and num_heads % degree == 0
                and (num_kv_heads % degree == 0 or degree % num_kv_heads == 0)):
            return degree
    return 1


def _resolve_ulysses_degree(ulysses_degree, world_size, num_heads, num_kv_heads):
    if ulysses_degree == "auto":
        if num_heads is None:
            raise ValueError("ContextParallel: ulysses_degree='auto' needs num_heads (the query head count) "
                             "to choose a degree that splits the heads")
        return auto_ulysses_degree(world_size, num_heads, num_kv_heads)
    if isinstance(ulysses_degree, str):
        raise ValueError(f"ContextParallel: ulysses_degree must be a positive int or 'auto', got {ulysses_degree!r}")
    if isinstance(ulysses_degree, bool) or not isinstance(ulysses_degree, int):
        raise TypeError(f"ContextParallel: ulysses_degree must be a positive int or 'auto', "
                        f"got {type(ulysses_degree).__name__}")
    if ulysses_degree < 1:
        raise ValueError(f"ContextParallel: ulysses_degree must be a positive int, got {ulysses_degree}")
    if world_size % ulysses_degree:
        raise ValueError(f"ContextParallel: ulysses_degree {ulysses_degree} does not divide the group size "
                         f"{world_size}")
    return ulysses_degree


class ContextParallel:
    """Attention over a sequence split across the ranks of ``group``.

    ``group``: a torch.distributed process group (None: the default group).
    ``ulysses_degree``: ranks per Ulysses (head all-to-all) group, a divisor of
    the group size, or "auto" (see ``auto_ulysses_degree``; needs ``num_heads``).
    ``ring_impl``: "zigzag" (load-balanced causal shards) or "ring" (contiguous).
    ``num_heads``/``num_kv_heads``: optional; checked early, used by "auto".
    ``check_across_ranks``: the constructor and every communicating call
    all-gather a few ints describing each rank's arguments, so arguments that
    differ between ranks (or fail on one rank only) raise everywhere instead
    of leaving the other ranks hanging. On CUDA that costs a host sync per
    call; turn it off once shapes are known to agree.
    """

    def __init__(self, group=None, ulysses_degree=1, ring_impl="zigzag", *, num_heads=None, num_kv_heads=None,
                 check_across_ranks=True):
        if not (dist.is_available() and dist.is_initialized()):
            raise RuntimeError("ContextParallel: torch.distributed is not initialised (call init_process_group first)")
        self.group = dist.group.WORLD if group is None else group
        self.rank = dist.get_rank(self.group)
        if self.rank < 0:
            raise ValueError("ContextParallel: this process is not a member of the given group")
        self.world_size = dist.get_world_size(self.group)
        self.check_across_ranks = bool(check_across_ranks)
        where = "ContextParallel"
        error, signature = None, [0, 0]
        try:
            if ring_impl not in RING_IMPLS:
                raise ValueError(f"{where}: ring_impl must be one of {RING_IMPLS}, got {ring_impl!r}")
            num_heads = positive_int(num_heads, "num_heads", where, allow_none=True)
            num_kv_heads = positive_int(num_kv_heads, "num_kv_heads", where, allow_none=True)
            degree = _resolve_ulysses_degree(ulysses_degree, self.world_size, num_heads, num_kv_heads)
            if num_heads is not None:
                check_heads(num_heads, num_kv_heads or num_heads, degree, where)
            signature = [degree, RING_IMPLS.index(ring_impl)]
        except (TypeError, ValueError) as exc:
            error = exc
        # Every rank must build the same mesh (e.g. "auto" reads LOCAL_WORLD_SIZE, which could differ).
        self._agree(signature, error, where, ("ulysses_degree", "ring_impl index"), None)
        self.layout = Layout(self.world_size // degree, degree, ring_impl)
        self.ring_index, self.ulysses_index = divmod(self.rank, degree)
        self._ring_comm, self._ulysses_comm = build_mesh_comms(self.group, degree)

    ring_degree = property(lambda self: self.layout.ring_degree)
    ulysses_degree = property(lambda self: self.layout.ulysses_degree)
    ring_impl = property(lambda self: self.layout.ring_impl)

    def __repr__(self):
        return (f"ContextParallel(ring_degree={self.ring_degree}, ulysses_degree={self.ulysses_degree}, "
                f"ring_impl={self.ring_impl!r}, rank={self.rank})")

    # ------------------------------------------------------------------ configuration

    @classmethod
    def from_config(cls, context_parallel_size=None, context_parallel_algo="ulysses_cp_algo",
                    ulysses_degree_in_cp=None, *, group=None, ring_impl="zigzag", num_heads=None,
                    num_kv_heads=None, tensor_parallel_size=1, check_across_ranks=True):
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
                   check_across_ranks=check_across_ranks)

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

    def positions(self, seq_len):
        """Global positions (CPU LongTensor) of this rank's tokens of a ``seq_len`` sequence, in local order."""
        return self.layout.positions(seq_len, self.rank)

    def shard(self, x, seq_dim=1):
        """This rank's tokens of the full tensor ``x`` (a copy), in the order the mesh needs."""
        seq_dim = self._seq_dim(x, seq_dim, "ContextParallel.shard")
        self.layout.check_seq_len(x.shape[seq_dim], "ContextParallel.shard")
        return x.index_select(seq_dim, self.positions(x.shape[seq_dim]).to(x.device))

    def gather(self, x, seq_dim=1):
        """The full tensor, in natural order, on every rank, from every rank's shard (not differentiable)."""
        where = "ContextParallel.gather"
        error, signature = None, [0] * 11
        try:
            seq_dim = self._seq_dim(x, seq_dim, where)
            if x.dim() > 8:
                raise ValueError(f"{where}: at most 8 dimensions are supported, got {x.dim()}")
            check_backend(self.group, x.device, where)
            self.layout.check_seq_len(x.shape[seq_dim] * self.world_size, where)
            signature = [dtype_code(x.dtype), x.dim(), seq_dim, *x.shape, *[0] * (8 - x.dim())]
        except (TypeError, ValueError) as exc:
            error = exc
        self._agree(signature, error, where, ("dtype", "ndim", "seq_dim", *[f"size[{i}]" for i in range(8)]), x)
        pieces = [torch.empty_like(x, memory_format=torch.contiguous_format) for _ in range(self.world_size)]
        dist.all_gather(pieces, x.contiguous(), group=self.group)
        stacked = torch.cat(pieces, dim=seq_dim)  # rank after rank: tokens at positions layout.order
        order = self.layout.order(stacked.shape[seq_dim]).to(x.device)
        return torch.empty_like(stacked).index_copy_(seq_dim, order, stacked)

    def _agree(self, signature, error, where, field_names, hint):
        if self.world_size > 1 and self.check_across_ranks:
            agree_on_inputs(self.group, signature, error, where, field_names, hint)
        elif error is not None:
            raise error

    # ------------------------------------------------------------------ attention

    def _check_attention(self, q, k, v, causal, softmax_scale, where, layout, enable_gqa=True):
        """Local checks, then the cross-rank agreement; returns the softmax scale."""
        error, signature = None, [0] * len(_SIGNATURE_FIELDS)
        try:
            _, seqlen_q, seqlen_k, heads, heads_kv, _ = check_qkv(q, k, v, where, layout)
            softmax_scale = check_scale(softmax_scale, where)
            if heads != heads_kv and not enable_gqa:
                raise ValueError(f"{where}: query has {heads} heads but key/value have {heads_kv}; "
                                 "pass enable_gqa=True for grouped-query attention")
            if seqlen_q != seqlen_k:
                raise ValueError(f"{where}: queries and keys must have the same local sequence length "
                                 f"(self-attention over one sharded sequence), got {seqlen_q} and {seqlen_k}")
            check_backend(self.group, q.device, where)
            check_heads(heads, heads_kv, self.ulysses_degree, where)
            self.layout.check_seq_len(seqlen_q * self.world_size, where)
            signature = [*q.shape, *k.shape, *v.shape, dtype_code(q.dtype), int(bool(causal))]
        except (TypeError, ValueError) as exc:
            error = exc
        self._agree(signature, error, where, _SIGNATURE_FIELDS, q)
        return softmax_scale

    def attention(self, q, k, v, causal=False, softmax_scale=None):
        """Attention of local shards in flash layout: q (B, S/P, H, D), k and v (B, S/P, Hkv, D).

        The shards must come from ``shard`` (or follow its order). ``causal``
        uses the global positions of the tokens (as on one device). Returns the
        local shard of the output, (B, S/P, H, D); differentiable in q, k, v.
        """
        softmax_scale = self._check_attention(q, k, v, causal, softmax_scale, "ContextParallel.attention", "flash")
        return usp_attention(q, k, v, self.layout, self.ring_index, self._ring_comm, self._ulysses_comm,
                             bool(causal), softmax_scale)

    def scaled_dot_product_attention(self, query, key, value, is_causal=False, scale=None, enable_gqa=False):
        """``attention`` in torch SDPA layout: query (B, H, S/P, D), key and value (B, Hkv, S/P, D)."""
        where = "ContextParallel.scaled_dot_product_attention"
        scale = self._check_attention(query, key, value, is_causal, scale, where, "sdpa", enable_gqa)
        # (B, H, S, D) -> (B, S, H, D) is a view; the kernels read any strides.
        out = usp_attention(query.transpose(1, 2), key.transpose(1, 2), value.transpose(1, 2), self.layout,
                            self.ring_index, self._ring_comm, self._ulysses_comm, bool(is_causal), scale)
        return out.transpose(1, 2)


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
