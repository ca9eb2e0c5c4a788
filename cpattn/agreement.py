"""Agreement across ranks: before its first collective, every collective entry point makes sure that
all ranks were called alike (DESIGN.md, "Agreement and faults", with the fault path of faults.py).

A rank whose arguments are bad would raise before a collective its peers already
wait in, and ranks called with different arguments (shapes, options) would
exchange tensors that do not fit, or hang. So every entry point that
communicates (``ContextParallel`` and its calls, ``ShardedKVCache``, ``prefill``,
``decode``, ``transfer_cache``, the transformers integration) runs ``agree``:

1. this rank's checks run (``check()``: raises TypeError, ValueError or
   NotImplementedError on bad input and returns the call's signature, a
   NamedTuple of what must be the same on every rank, when there is one);
2. one small all-gather: [did the check fail, a hash of the signature] of
   every rank;
3. every rank reaches the same verdict from the same rows. A rank whose check
   failed raises its own error, the others a ValueError naming it and its
   error; signatures that differ make every rank raise a ValueError naming each
   field that differs, its value on every rank, and the fix. Only on these
   error paths does a second exchange send the errors or the signatures
   themselves (to name them).

A signature class may say how to fix a difference (``FIXES``: field -> text, or
a function of every rank's signature returning the text) and name fields that
errors show but ranks may differ in (``LOCAL``, e.g. this rank's token count).
"""
import hashlib

import torch
import torch.distributed as dist

from .comm import gather_rows
from .faults import collective, describe, fault_path

# What a check raises for bad input; any other exception is a fault, not a verdict on the arguments.
REJECTIONS = (TypeError, ValueError, NotImplementedError)


def agree(where, check, *, comm=None, group=None, hint=None, fixes=None, peers_may_skip=False):
    """Run this rank's ``check`` and make every rank reach the same verdict; returns what ``check`` returned.

    Collective over ``comm.group`` (a ``comm.Communicator``: the wait is bounded by its
    timeout and a failed exchange takes its fault path) or ``group`` (a process group,
    before a Communicator exists); with neither, or on one rank, only ``check`` runs.
    ``check()`` returns the call's signature, a NamedTuple of what must be the same on every rank;
    anything else it returns (None, say) is passed back and not compared.
    ``hint``: a tensor on the device the backend exchanges on. ``fixes``: more FIXES for this
    call. ``peers_may_skip``: the peers may know this call already and skip the exchange, so a
    rank whose check fails does not wait for them in it but closes the communicators
    (``Communicator.fail``), which makes them raise at once.
    """
    error, signature = None, None
    try:
        signature = check()
    except REJECTIONS as exc:
        error = exc
    if comm is not None:
        group = comm.group
    if group is None or dist.get_world_size(group) == 1:
        if error is not None:
            raise error
        return signature
    if error is not None and peers_may_skip and comm is not None:
        comm.fail(where, error)
    with fault_path(comm, where, cause=error):
        with collective("agreement all-gather"):
            rows = gather_rows(group, [int(error is not None), _digest(signature)], hint, comm)
            failed = [rank for rank, (rejected, _) in enumerate(rows) if rejected]
            differ = any(digest != rows[0][1] for _, digest in rows)
            if failed:  # the second exchange: what each rank rejected
                reasons = _everyone(group, None if error is None else describe(error))
            elif differ:  # the second exchange: the signatures, to name what differs
                signatures = _everyone(group, signature)
    if error is not None:
        raise error
    if failed:
        raise ValueError(f"{where}: rank(s) {failed} of the context-parallel group rejected their inputs "
                         f"(rank {failed[0]}: {reasons[failed[0]]}); see the error raised there")
    if differ:
        raise ValueError(_disagreement(where, signatures, fixes or {}))
    return signature


def _digest(signature):
    """A 64-bit int naming the compared fields of ``signature`` (the same in every process, unlike hash())."""
    if not hasattr(signature, "_fields"):  # not a NamedTuple: nothing to compare
        return 0
    local = getattr(signature, "LOCAL", ())
    compared = tuple(value for name, value in zip(signature._fields, signature) if name not in local)
    return int.from_bytes(hashlib.blake2b(repr(compared).encode(), digest_size=8).digest(), "little", signed=True)


# Never traced: where torch.compile falls back to eager after a graph break, dynamo still compiles the frames
# the eager code calls, and it cannot trace all_gather_object (it stops with a hard error).
@torch.compiler.disable
def _everyone(group, value):
    """Every rank's ``value`` (picklable), in group-rank order: for the error paths only."""
    values = [None] * dist.get_world_size(group)
    dist.all_gather_object(values, value, group=group)
    return values


def _disagreement(where, signatures, fixes):
    """The message for signatures that differ: each differing field, its value on every rank, and the fix."""
    kind = type(signatures[0])
    fixes = {**getattr(kind, "FIXES", {}), **fixes}
    local = getattr(kind, "LOCAL", ())
    clauses = []
    for name in kind._fields:
        values = [getattr(s, name) for s in signatures]
        if name in local or len({repr(v) for v in values}) == 1:
            continue
        fix = fixes.get(name, f"pass the same {name} on every rank")
        clauses.append(f"{name} ({per_rank(values)}): {fix(signatures) if callable(fix) else fix}")
    return f"{where}: ranks disagree on " + "; and on ".join(clauses)


def per_rank(values):
    """``values`` (one per rank) as "rank 0: a, rank 1: b", ranks with the same value together."""
    ranks = {}
    for rank, value in enumerate(values):
        ranks.setdefault(_show(value), []).append(rank)
    return ", ".join(f"rank {r[0]}: {shown}" if len(r) == 1 else f"ranks {r}: {shown}" for shown, r in ranks.items())


def _show(value, width=60):
    text = value if isinstance(value, str) else repr(value)
    return text if len(text) <= width else f"{text[:width - 20]} ... {text[-15:]}"


def spoken_list(items):
    """"a", "a and b", "a, b and c"."""
    items = [str(i) for i in items]
    return items[0] if len(items) == 1 else f"{', '.join(items[:-1])} and {items[-1]}"
