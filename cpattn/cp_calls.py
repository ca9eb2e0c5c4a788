"""The calls of a ContextParallel: their arguments, the checks that need no communication, and what
the ranks must agree on (agreement.py).

* ``ConstructionSignature`` / ``check_construction``: the constructor's arguments.
* ``AttentionArgs``: the arguments of one attention call as one value (the eager
  path, the compiled path and the custom operators of cp_ops.py pass it on);
  ``check_attention_arguments``: the checks that read nothing but them;
  ``AttentionSignature``: what of them must be the same on every rank.
* ``GatherSignature``: the same for ``gather``.
* ``read_packing``: ``cu_seqlens`` checked and read to the host as a tuple, the
  packing the layout and the ring planner take.
* ``AgreedCalls``: the calls a ContextParallel's ranks agreed on already, so that
  a call seen before needs no exchange (``check_across_ranks``).
A signature's field names are what the errors name when ranks differ.
"""
from typing import Any, NamedTuple, Optional

import torch
import torch.distributed as dist

from cpattn.kernels import MaskSpec

from .checks import check_cu_seqlens, check_qkv, check_scale, check_sinks, check_softcap, check_timeout, \
    check_window, positive_int
from .agreement import agree, spoken_list
from .layout import RING_IMPLS, Layout
from .mesh import node_of_this_process
from .ulysses import check_heads

_MAX_AGREED = 4096  # agreed calls kept per object (shapes that change every call would grow it)


class ConstructionSignature(NamedTuple):
    """ContextParallel's arguments, checked: the same on every rank, so that every rank builds one mesh."""
    ulysses_degree: Any  # an int, or "auto"
    ring_impl: str
    num_heads: Optional[int]
    num_kv_heads: Optional[int]
    timeout: float
    node: tuple  # this process's node (mesh.py): not compared, every rank learns every rank's

    LOCAL = ("node",)


def check_construction(world_size, ulysses_degree, ring_impl, num_heads, num_kv_heads, check_across_ranks, timeout,
                       where):
    """The constructor's checks (TypeError/ValueError); returns its ConstructionSignature."""
    node = node_of_this_process(dist.get_rank())
    if ring_impl not in RING_IMPLS:
        raise ValueError(f"{where}: ring_impl must be one of {RING_IMPLS}, got {ring_impl!r}")
    if not (check_across_ranks is True or check_across_ranks is False or check_across_ranks == "always"):
        raise ValueError(f"{where}: check_across_ranks must be True, False or 'always', got {check_across_ranks!r}")
    timeout = check_timeout(timeout, where)
    num_heads = positive_int(num_heads, "num_heads", where, allow_none=True)
    num_kv_heads = positive_int(num_kv_heads, "num_kv_heads", where, allow_none=True)
    if ulysses_degree == "auto":
        if num_heads is None:
            raise ValueError(f"{where}: ulysses_degree='auto' needs num_heads (the query head count) "
                             "to choose a degree that splits the heads")
    else:
        if isinstance(ulysses_degree, str):
            raise ValueError(f"{where}: ulysses_degree must be a positive int or 'auto', got {ulysses_degree!r}")
        positive_int(ulysses_degree, "ulysses_degree", where)
        if world_size % ulysses_degree:
            raise ValueError(f"{where}: ulysses_degree {ulysses_degree} does not divide the group size {world_size}")
        if num_heads is not None:
            check_heads(num_heads, num_kv_heads or num_heads, ulysses_degree, where)
    return ConstructionSignature(ulysses_degree, ring_impl, num_heads, num_kv_heads, timeout, node)


class AttentionArgs(NamedTuple):
    """The arguments of one ContextParallel attention call, as given (checked by ``check_attention_arguments``)."""
    q: Any
    k: Any
    v: Any
    causal: Any
    softmax_scale: Any
    return_lse: Any
    window_size: Any
    softcap: Any
    sinks: Any
    seq_len: Any
    cu_seqlens: Any
    sdpa_layout: bool  # q, k, v in torch SDPA's layout (B, H, S, D) rather than flash's (B, S, H, D)
    enable_gqa: bool

    def flash_views(self):
        """q, k, v as (B, S, H, D) views: the kernels read any strides."""
        if self.sdpa_layout:
            return self.q.transpose(1, 2), self.k.transpose(1, 2), self.v.transpose(1, 2)
        return self.q, self.k, self.v

    def mask(self):
        """The call's one mask description (``MaskSpec``): causal and window at global positions."""
        return MaskSpec(bool(self.causal), self.window_size)

    def needs_grad(self):
        return torch.is_grad_enabled() and (self.q.requires_grad or self.k.requires_grad or self.v.requires_grad)

    def key(self, needs_grad, seq_len, packing, compiled):
        """What the local checks depend on, as a dict key (the same key: the same verdict); None when an
        argument is not a tensor or not hashable."""
        def key():
            sinks = None if self.sinks is None else (self.sinks.shape, self.sinks.dtype, self.sinks.device)
            return (*[(t.shape, t.dtype, t.device) for t in (self.q, self.k, self.v)], bool(self.causal),
                    self.softmax_scale, bool(self.return_lse), self.enable_gqa, self.sdpa_layout, needs_grad,
                    tuple(self.window_size), self.softcap, sinks, seq_len, packing, compiled)
        return _key_or_none(key)


def check_attention_arguments(args, ulysses_degree, where):
    """The checks that read nothing but the arguments (no host data, no group); returns the softmax scale,
    window size and softcap checked, and the local sequence length."""
    _, seqlen_q, seqlen_k, heads, heads_kv, _ = check_qkv(args.q, args.k, args.v, where,
                                                          "sdpa" if args.sdpa_layout else "flash",
                                                          same_value_dim=False)
    softmax_scale = check_scale(args.softmax_scale, where)
    window_size = check_window(args.window_size, where)
    softcap = check_softcap(args.softcap, where)
    check_sinks(args.sinks, heads, args.q.device, where)
    if heads != heads_kv and not args.enable_gqa:
        raise ValueError(f"{where}: query has {heads} heads but key/value have {heads_kv}; "
                         "pass enable_gqa=True for grouped-query attention")
    if seqlen_q != seqlen_k:
        raise ValueError(f"{where}: queries and keys must have the same local sequence length "
                         f"(self-attention over one sharded sequence), got {seqlen_q} and {seqlen_k}")
    check_heads(heads, heads_kv, ulysses_degree, where)
    return softmax_scale, window_size, softcap, seqlen_q


class AttentionSignature(NamedTuple):
    """What must be the same on every rank in one attention call. The local sequence lengths may differ
    by a token or two, so they count only through the full ``seq_len``, which each rank checked against
    its own. ``compiled``: the call is torch.compile's operator, whose forward also sends lse back and
    whose backward sends its inputs again, so it cannot meet an eager call on another rank."""
    q_shape: tuple  # the sequence dimension as None
    k_shape: tuple
    v_shape: tuple
    dtype: str
    sdpa_layout: bool
    causal: bool
    softmax_scale: Optional[float]
    window_size: tuple
    softcap: float
    sinks_given: bool
    seq_len: int  # the full length: given, implied by cu_seqlens, or this rank's tokens x the group size
    cu_seqlens: Optional[tuple]
    cut_window: int  # the window left side the packed shards were cut for (dispatch.cut_window), -1 without
    return_lse: bool
    requires_grad: bool
    compiled: bool
    local_tokens: int  # shown in errors, not compared
    seq_len_given: bool  # shown in errors, not compared

    LOCAL = ("local_tokens", "seq_len_given")
    FIXES = {"q_shape": "every rank passes its shard of the same q (batch, heads and head dim alike)",
             "k_shape": "every rank passes its shard of the same k (batch, heads and head dim alike)",
             "v_shape": "every rank passes its shard of the same v (batch, heads and head dim alike)",
             "dtype": "cast q, k, v to the same dtype on every rank",
             "sinks_given": "pass sinks on every rank or on none",
             "cu_seqlens": "pass the same global cu_seqlens on every rank",
             "cut_window": "shard the packed batch with the same window_size on every rank",
             "requires_grad": "q, k, v require grad on every rank or on none",
             "compiled": "run the call under torch.compile on every rank or on none"}

    @classmethod
    def of(cls, args, softmax_scale, window_size, softcap, seq_len, packing, cut, needs_grad, compiled, local_tokens):
        seq_dim = 2 if args.sdpa_layout else 1
        shapes = [tuple(None if dim == seq_dim else size for dim, size in enumerate(t.shape))
                  for t in (args.q, args.k, args.v)]
        return cls(*shapes, str(args.q.dtype), bool(args.sdpa_layout), bool(args.causal), softmax_scale,
                   window_size, softcap, args.sinks is not None, seq_len, packing, cut, bool(args.return_lse),
                   bool(needs_grad), bool(compiled), local_tokens,
                   args.seq_len is not None or args.cu_seqlens is not None)


def seq_len_fix(signatures, layout, mesh_ranks):
    """How to fix ranks that disagree on the full length (``AttentionSignature.seq_len``): which
    ``seq_len`` to pass. ``mesh_ranks``: the mesh rank of each group rank."""
    if all(s.seq_len_given for s in signatures):
        return "pass the same seq_len, the full sequence length, on every rank"
    tokens = [s.local_tokens for s in signatures]
    held = f"ranks hold {spoken_list(tokens)} tokens"
    total = sum(tokens)
    if [layout.local_lengths(total)[m] for m in mesh_ranks] == tokens:
        return f"{held}: pass seq_len={total} on every rank"
    return f"{held}, which no sequence length splits into: make the shards with ContextParallel.shard"


class GatherSignature(NamedTuple):
    """What must be the same on every rank in one ``gather``: the full tensor it makes."""
    dtype: str
    seq_dim: int
    shape: tuple  # the full tensor's: the sequence dimension is the full length
    cu_seqlens: Optional[tuple]
    cut_window: int  # the window left side the packed shards were cut for (dispatch.cut_window), -1 without

    FIXES = {"shape": "gather every rank's shard of one tensor (with uneven lengths pass seq_len= on every rank)",
             "cu_seqlens": "pass the same global cu_seqlens on every rank",
             "cut_window": "pass the same window_size on every rank (the one given to shard)"}


def gather_key(x, seq_dim, seq_len, cu_seqlens, window_size=(-1, -1)):
    """What ``gather``'s checks depend on, as a dict key; None when an argument is not hashable."""
    def key():
        packing = None if cu_seqlens is None else (cu_seqlens.dtype, cu_seqlens.device, tuple(cu_seqlens.tolist()))
        return ("gather", x.shape, x.dtype, x.device, seq_dim, seq_len, packing,
                None if window_size is None else tuple(window_size))
    return _key_or_none(key)


def _key_or_none(make_key):
    """``make_key()`` if it makes a hashable key; None if it reads what an argument lacks or is not hashable
    (the checks then name the culprit)."""
    try:
        key = make_key()
        hash(key)
        return key
    except (AttributeError, TypeError):
        return None


def read_packing(cu_seqlens, seq_len, where):
    """(packing, full length): ``cu_seqlens`` checked (int32, from 0, non-decreasing, ending at ``seq_len``
    when that is given) and read to the host as a tuple, or (None, ``seq_len``) without it."""
    if cu_seqlens is None:
        return None, seq_len
    if seq_len is None and isinstance(cu_seqlens, torch.Tensor) and cu_seqlens.dim() == 1 and cu_seqlens.numel():
        seq_len = int(cu_seqlens[-1])
    check_cu_seqlens(cu_seqlens, seq_len, seq_len, cu_seqlens.device, "cu_seqlens", where)
    Layout.check_seq_len(seq_len, where)
    return tuple(cu_seqlens.tolist()), seq_len


class AgreedCalls:
    """The calls a ContextParallel's ranks agreed on, by key (see ``check_across_ranks``): True, agree
    the first time a key is seen; "always", every call; False, never (local checks only)."""

    def __init__(self, comm, mode):
        self._comm, self.mode, self._keys = comm, mode, set()

    def known(self, key):
        """Whether a call with this key was checked and agreed on before (and need not be again)."""
        return self.mode != "always" and key in self._keys

    def agree(self, key, where, check, hint=None, fixes=None):
        """``agreement.agree`` on a call, exchanging only when the mode asks for it; returns the signature."""
        exchange = self._comm is not None and self.mode is not False and not (self.mode is True and key in self._keys)
        # The peers may know this call already and skip the exchange: a rank whose check fails then
        # closes the communicators rather than wait for them in it.
        signature = agree(where, check, comm=self._comm if exchange else None, hint=hint, fixes=fixes,
                          peers_may_skip=self.mode is True and bool(self._keys))
        if exchange and key is not None:
            if len(self._keys) >= _MAX_AGREED:
                self._keys.clear()
            self._keys.add(key)
        return signature
