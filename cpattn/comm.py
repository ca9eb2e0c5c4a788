"""Process groups and collectives for context parallelism.

* ``Communicator``: where one ContextParallel (or ShardedKVCache, or the cache transfers) communicates.
  cpattn creates its own process groups over the given group's ranks, with a timeout: one over
  all of them (ring P2P, agreement, gather) and one per Ulysses group. Each is
  created once per distinct set of ranks, shared by every Communicator over
  those ranks, and destroyed when the last of them is closed. A failed call
  closes them (``Communicator.fail``, see faults.py).
  Creating a group is collective. When the given group spans the world every
  process takes part (plain ``new_group``, in the same order everywhere);
  otherwise only its members do (``use_local_synchronization``), which torch
  can do only when they hold the same number of process groups (it names the
  new group after that number); when they do not, the Communicator uses the
  given group itself, and its Ulysses all-to-all sends zero-size parts to the
  ranks outside the Ulysses group.
* ``RingComm``: one step of a ring, "send to the next ring rank, receive from
  the previous one", posted at once and waited for later.
* ``UlyssesComm``: the all-to-all inside one Ulysses group.
* ``gather_rows``: every rank's few ints, the exchange under the agreement
  across ranks (agreement.py) and the mesh's nodes.
* ``check_backend``: NCCL for CUDA tensors, gloo for CPU tensors.
"""
import collections
import datetime

import torch
import torch.distributed as dist

from .faults import CommError, PeerFailure, close_connections, comm_error, describe, gave_up_waiting, \
    group_store, record_first_failure

def global_ranks(group):
    """Global rank of each rank of ``group``, in group-rank order (P2P peers and new_group speak global ranks)."""
    return [dist.get_global_rank(group, i) for i in range(dist.get_world_size(group))]


def backend_name(group):
    return str(dist.get_backend(group)).lower()


# ----------------------------------------------------------------------------- shared process groups

class _SharedGroup:
    """A process group cpattn created over ``key``'s ranks; ``pg`` is None where this rank is not a member."""

    def __init__(self, key, pg, serial):
        self.key, self.pg, self.users, self.failure = key, pg, 0, None
        self.failure_key = f"cpattn/failure/{serial}"  # a record per creation: a re-created group starts clean


DEFAULT_TIMEOUT = 30.0  # seconds; the bound of faults.py for ContextParallel, ShardedKVCache and transfer_cache

# How long a rank that found its connections closed waits for the rank that closed them to say why.
_CAUSE_GRACE = 2.0

_shared = {}                      # (backend, ranks, timeout) -> _SharedGroup
_creations = collections.Counter()  # (backend, ranks, timeout) -> groups created so far


def live_groups():
    """{(backend, global ranks, timeout): users} of the groups cpattn holds now (for tests and debugging)."""
    return {key: entry.users for key, entry in _shared.items()}


def _acquire(rank_sets, backend, timeout, everyone):
    """The shared group over each of ``rank_sets`` (sorted tuples of global ranks), created where missing.

    Collective: with ``everyone`` every process calls it with the same sets in
    the same order; otherwise the members of each set call it with the sets
    they belong to.
    """
    entries = []
    for ranks in rank_sets:
        key = (backend, ranks, timeout)
        entry = _shared.get(key)
        if entry is None:
            member = dist.get_rank() in ranks
            pg = dist.new_group(list(ranks), timeout=datetime.timedelta(seconds=timeout), backend=backend,
                                use_local_synchronization=not everyone)
            _creations[key] += 1
            entry = _shared[key] = _SharedGroup(key, pg if member else None, _creations[key])
        entry.users += 1
        entries.append(entry)
    return entries


def _destroy(entry):
    if _shared.get(entry.key) is entry:
        del _shared[entry.key]
    if entry.pg is not None:
        try:
            dist.destroy_process_group(entry.pg)
        except (ValueError, RuntimeError):  # already gone with the default group
            pass


def _group_count():
    # torch names a group made with use_local_synchronization after the number of groups this
    # process holds (torch.distributed.distributed_c10d._hash_ranks_to_str): members can make one
    # together only when that number is the same on all of them.
    return len(getattr(dist.distributed_c10d, "_world").pg_names)


class Communicator:
    """The process groups one ContextParallel, ShardedKVCache or the cache transfers (``owner``) use, their
    timeout, and the error path of its calls.

    ``parent``: the process group; ``timeout``: seconds; ``parts``: the
    Ulysses groups, lists of group ranks of ``parent`` that partition it (or
    None). Collective over ``parent``. ``group`` carries the ring P2P and the
    small collectives, ``subgroup`` (None when ``parent`` is used itself) this
    rank's Ulysses all-to-all.
    """

    def __init__(self, parent, timeout, parts=None, owner="ContextParallel"):
        self.parent, self.timeout, self.owner = parent, float(timeout), owner
        self.backend = backend_name(parent)
        self._bound = datetime.timedelta(seconds=self.timeout)
        self._failed = None
        ranks, me = global_ranks(parent), dist.get_rank()
        everyone = len(ranks) == dist.get_world_size()
        self.own_groups = everyone or len({row[0] for row in gather_rows(parent, [_group_count()], comm=self)}) == 1
        parts = [sorted(ranks[r] for r in part) for part in parts or ()]
        if self.own_groups:
            wanted = [tuple(sorted(ranks))] + [tuple(p) for p in parts if everyone or me in p]
            self._entries = _acquire(wanted, self.backend, self.timeout, everyone)
            self.group = self._entries[0].pg
            mine = [e for e, p in zip(self._entries[1:], wanted[1:]) if me in p]
            self.subgroup = mine[0].pg if mine else None
            self._failure_key = self._entries[0].failure_key
        else:
            self._entries, self.group, self.subgroup = [], parent, None
            key = (self.backend, tuple(ranks), self.timeout)
            _creations[key] += 1
            self._failure_key = f"cpattn/failure/parent/{_creations[key]}"
        self._store = group_store(self.group)

    def describe(self):
        if self.own_groups:
            return (f"cpattn's own process groups (timeout {self.timeout:g} s, shared by every {self.owner} "
                    "over these ranks)")
        return (f"the given group itself (its ranks hold different numbers of process groups, so they cannot "
                f"create groups among themselves); waits on CPU are bounded by {self.timeout:g} s")

    def wait(self, works, on_cpu):
        """Wait for ``works``: on gloo at most ``timeout`` (NCCL waits only order streams; its watchdog bounds them)."""
        if on_cpu:
            for work in works:
                work.wait(self._bound)
        else:
            for work in works:
                work.wait()

    # -------------------------------------------------------------- failures

    def is_open(self):
        """Whether calls may still use these communicators (not closed, no failure recorded on them)."""
        return self._failed is None and all(entry.failure is None for entry in self._entries)

    def check(self, where):
        """Raise PeerFailure if an earlier call failed: these communicators are closed."""
        failure = self._failed
        for entry in self._entries:  # a group shared with another user may have failed there
            failure = failure or entry.failure
        if failure is not None:
            raise PeerFailure(f"{where}: the communicators of this {self.owner} were closed after a failure "
                              f"({failure}); build a new {self.owner}", rank=_rank_of(failure))

    def fail(self, where, exc):
        """The error path of a call that raised ``exc`` here: record it, close the communicators, raise.

        The rank at fault re-raises its own exception; a rank that only saw a
        collective fail (``CommError``) raises PeerFailure naming the failure
        recorded first.
        """
        if isinstance(exc, PeerFailure):
            raise exc
        symptom = isinstance(exc, CommError)
        text = f"rank {dist.get_rank()} {'could not complete' if symptom else 'failed in'} {where}: {describe(exc)}"
        first = text
        if self._store is not None:
            grace = min(self.timeout / 2, _CAUSE_GRACE) if symptom and not gave_up_waiting(exc) else 0.0
            first = record_first_failure(self._store, self._failure_key, text, grace)
        self._close_after_failure(first)
        closed = f"this {self.owner}'s communicators are closed: build a new one to go on"
        if not symptom:
            exc.add_note(f"cpattn: the other ranks of the group were told and raise PeerFailure; {closed}")
            raise exc
        if first == text:
            first += " (no rank reported a failure: one may have died, hung, or skipped the call)"
        raise PeerFailure(f"{where}: {first}. {closed[0].upper()}{closed[1:]}.", rank=_rank_of(first)) from exc

    def _close_after_failure(self, reason):
        self._failed = reason
        if not self._entries:
            close_connections(self.group, self.backend)
        for entry in self._entries:
            if entry.failure is None:
                entry.failure = reason
                if entry.pg is not None:
                    close_connections(entry.pg, self.backend)
                _destroy(entry)

    def close(self):
        """Give back the shared groups (destroyed when no other Communicator uses them). Local; idempotent."""
        entries, self._entries = self._entries, []
        self._failed = self._failed or "closed by close()"
        for entry in entries:
            entry.users -= 1
            if entry.users == 0 and entry.failure is None:
                _destroy(entry)


def _rank_of(record):
    """The rank a failure record ("rank 3 failed in ...") names, or None."""
    words = record.split(" ", 2)
    return int(words[1]) if len(words) > 2 and words[0] == "rank" and words[1].isdigit() else None


# ----------------------------------------------------------------------------- ring and Ulysses

class RingComm:
    """P2P along one ring of ``comm.group``: rank i sends to i+1 and receives from i-1 (mod ring size).

    ``exchange`` only posts the transfers; the caller launches its kernels and
    waits afterwards, so communication overlaps computation.
    """

    def __init__(self, comm, members):
        """``members``: global ranks of the ring, in ring order; this process is one of them."""
        self.comm, self.size = comm, len(members)
        self.index = members.index(dist.get_rank())
        self.next_rank = members[(self.index + 1) % self.size]
        self.prev_rank = members[(self.index - 1) % self.size]
        self._pg = comm.group
        self._next = dist.get_group_rank(self._pg, self.next_rank)
        self._prev = dist.get_group_rank(self._pg, self.prev_rank)
        self._coalesce = "nccl" in comm.backend

    def exchange(self, sends, recvs, tag):
        """Post: send each of ``sends`` to the next rank, receive the previous rank's into ``recvs``."""
        pg = self._pg
        try:
            if self._coalesce:
                # What dist.batch_isend_irecv does on NCCL, without its per-call Python checks: one
                # group call, else a send and a receive between the same two ranks can deadlock.
                device = sends[0].device
                pg._start_coalescing(device)
                for t in sends:
                    pg.send([t], self._next, tag)
                for t in recvs:
                    pg.recv([t], self._prev, tag)
                return [pg._end_coalescing(device)]
            return [pg.send([t], self._next, tag) for t in sends] + [pg.recv([t], self._prev, tag) for t in recvs]
        except Exception as exc:
            raise self._error(exc) from exc

    def wait(self, works, on_cpu):
        try:
            self.comm.wait(works, on_cpu)
        except Exception as exc:
            raise self._error(exc) from exc

    def _error(self, exc):
        return comm_error(f"ring exchange (send to rank {self.next_rank}, receive from rank {self.prev_rank})", exc)


class UlyssesComm:
    """The all-to-all among the ranks ``members`` (global ranks, ascending) of one Ulysses group."""

    def __init__(self, comm, members):
        self.comm, self.members, self.degree = comm, members, len(members)
        if comm.subgroup is not None:
            self.group, self.splits = comm.subgroup, []
        else:  # the group itself: one part for each Ulysses rank, none for the others
            self.group = comm.group
            self.splits = [int(r in members) for r in global_ranks(self.group)]
        self._options = dist.AllToAllOptions()

    def all_to_all(self, x):
        """x (degree, ...) contiguous; returns y with y[i] = Ulysses rank i's x[this rank's index]."""
        y = torch.empty_like(x)
        try:
            # the process group's own call: dist.all_to_all_single without its per-call Python checks
            work = self.group.alltoall_base(y, x, self.splits, self.splits, self._options)
            self.comm.wait([work], x.device.type == "cpu")
        except Exception as exc:
            raise comm_error(f"Ulysses all-to-all among ranks {self.members}", exc) from exc
        return y


# ----------------------------------------------------------------------------- small collectives

def check_backend(group, device, where):
    """Raise ValueError if ``group``'s backend cannot move tensors on ``device``."""
    backend = backend_name(group)
    if device.type == "cuda" and "nccl" not in backend:
        raise ValueError(f"{where}: CUDA tensors need an NCCL process group, this group's backend is {backend!r}")
    if device.type == "cpu" and "gloo" not in backend:
        raise ValueError(f"{where}: CPU tensors need a gloo process group, this group's backend is {backend!r}")


def _exchange_device(group, hint):
    backend = backend_name(group)
    on_cuda = isinstance(hint, torch.Tensor) and hint.device.type == "cuda"
    if "nccl" in backend and (on_cuda or "gloo" not in backend):
        return hint.device if on_cuda else torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def gather_rows(group, row, hint=None, comm=None):
    """Collective: every rank's ``row`` (ints; the same length on every rank), in group-rank order.

    ``hint``: a tensor on the device the backend needs; ``comm``: bounds the wait by its timeout.
    """
    size = dist.get_world_size(group)
    device = _exchange_device(group, hint)
    mine = torch.tensor(row, dtype=torch.int64, device=device)
    # Prefilled with this rank's row, so that a backend that moves nothing (torch's "fake"
    # backend, used by the host-overhead benchmark) reads as agreement.
    everyone = [mine.clone() for _ in range(size)]
    work = dist.all_gather(everyone, mine, group=group, async_op=True)
    if comm is None:
        work.wait()
    else:
        comm.wait([work], device.type == "cpu")
    return torch.stack(everyone).tolist()
