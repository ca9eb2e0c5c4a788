"""MindSpeed-style configuration of context parallelism: ``ContextParallel.from_config`` and
``from_args``, and the argparse options ``add_context_parallel_args`` adds.

The options have MindSpeed's names and meaning (``--context-parallel-size``,
``--context-parallel-algo``, ``--ulysses-degree-in-cp``); they are translated
into ``ContextParallel``'s own arguments (a Ulysses degree, the heads each rank's
attention sees) and nothing else: the object built is an ordinary ContextParallel.
"""
import argparse

import torch.distributed as dist

from .checks import positive_int
from .comm import DEFAULT_TIMEOUT

CP_ALGOS = ("ulysses_cp_algo", "megatron_cp_algo", "hybrid_cp_algo")


def from_config(cls, context_parallel_size=None, context_parallel_algo="ulysses_cp_algo", ulysses_degree_in_cp=None,
                *, group=None, ring_impl="zigzag", num_heads=None, num_kv_heads=None, tensor_parallel_size=1,
                check_across_ranks=True, timeout=DEFAULT_TIMEOUT):
    """Build a ``cls`` (a ContextParallel) from MindSpeed-style options.

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
    degree = _ulysses_degree(context_parallel_algo, ulysses_degree_in_cp, size, where)
    heads = kv_heads = None
    if num_heads is not None:
        heads = _heads_per_rank(num_heads, "num_heads", tp, where)
        if degree != "auto" and heads % degree:
            raise ValueError(f"{where}: num_heads {num_heads} is not divisible by tensor_parallel_size x "
                             f"ulysses degree = {tp} x {degree}")
        if num_kv_heads is not None:
            kv_heads = _heads_per_rank(num_kv_heads, "num_kv_heads", tp, where)
    return cls(group, degree, ring_impl, num_heads=heads, num_kv_heads=kv_heads,
               check_across_ranks=check_across_ranks, timeout=timeout)


def _ulysses_degree(algo, ulysses_degree_in_cp, size, where):
    """The Ulysses degree ``algo`` means over ``size`` ranks (an int, or "auto" for hybrid)."""
    implied = {"ulysses_cp_algo": size, "megatron_cp_algo": 1}.get(algo)
    if implied is not None:
        if ulysses_degree_in_cp not in (None, implied):
            raise ValueError(f"{where}: ulysses_degree_in_cp={ulysses_degree_in_cp!r} contradicts "
                             f"{algo}, whose Ulysses degree is {implied}")
        return implied
    if ulysses_degree_in_cp is None:
        raise ValueError(f"{where}: hybrid_cp_algo needs ulysses_degree_in_cp")
    if ulysses_degree_in_cp != "auto":
        positive_int(ulysses_degree_in_cp, "ulysses_degree_in_cp", where)
        if size % ulysses_degree_in_cp:
            raise ValueError(f"{where}: context_parallel_size {size} is not divisible by "
                             f"ulysses_degree_in_cp {ulysses_degree_in_cp}")
    return ulysses_degree_in_cp


def _heads_per_rank(count, name, tp, where):
    """The heads of one tensor-parallel rank: ``count`` checked to split over ``tp`` ranks."""
    count = positive_int(count, name, where)
    if count % tp:
        raise ValueError(f"{where}: {name} {count} is not divisible by tensor_parallel_size {tp}")
    return count // tp


def from_args(cls, args, **kwargs):
    """``from_config`` with the options ``add_context_parallel_args`` parsed into ``args``."""
    return from_config(cls, args.context_parallel_size, args.context_parallel_algo, args.ulysses_degree_in_cp,
                       **kwargs)


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
