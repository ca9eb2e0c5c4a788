"""When one rank fails inside a collective call, every rank raises, in bounded time (DESIGN.md,
"Agreement and faults").

A context-parallel call is collective: if one rank raises in the middle of it
(bad input found late, out of memory, a kernel error), its peers would wait for
it in a send, receive or all-to-all until the process group's timeout (10 to 30
minutes) or forever. ``comm.Communicator`` prevents that with three measures:

* **A bound.** The process groups cpattn creates have a timeout (``timeout=``
  of ``ContextParallel``, default 30 s): on gloo every operation gives up
  after it, on NCCL the watchdog aborts the communicator after it.
* **The error path** (``Communicator.fail``, run by ``fault_path``, the context
  manager around each communicating call; nothing runs on the normal path): the rank records
  "rank r failed in <where>: <error>" in the group's store (``compare_set``:
  the first record wins), then closes its connections (``close_connections``),
  so that peers blocked on it fail at once instead of at the timeout, and do
  the same to the ranks blocked on them. A rank that only found a connection
  closed waits briefly (at most 2 s) for the record of the rank that closed it
  before recording its own symptom, so that the cause (or the timeout) is what
  every rank names.
* **Every rank raises**: the rank at fault its own exception (with a note), the
  others ``PeerFailure`` naming the rank recorded first, or, when no rank
  recorded anything (a process that died or hangs), the collective that timed
  out or lost its connection.

Tests make a rank fail at named places with ``inject_faults``; ``fault_point``
costs one global lookup when no hook is set.
"""
import contextlib
import datetime

import torch


class PeerFailure(RuntimeError):
    """Raised on a rank because another rank of its group failed (``rank``), or a collective timed out."""

    def __init__(self, message, rank=None):
        super().__init__(message)
        self.rank = rank


class CommError(RuntimeError):
    """A send, receive or collective failed (timeout, closed connection): a symptom, not a cause."""


# ----------------------------------------------------------------------------- test hook

_fault_hook = None


def fault_point(where, step=None):
    """A place a test can make this rank fail: calls the ``inject_faults`` hook, if any."""
    if _fault_hook is not None:
        _fault_hook(where, step)


@contextlib.contextmanager
def inject_faults(hook):
    """Within the block, ``hook(where, step)`` runs at every ``fault_point`` (raise there to inject a fault).

    Places: "ring forward" and "ring backward" (step = ring step, after the
    step's transfer is posted and before its kernels), "ulysses forward" and
    "ulysses backward" (between the two all-to-alls), "prefill" (pass-KV: step =
    ring step, as in the ring; pass-Q: step None, before the all-to-all of the
    partials), "decode" (after the local attention, before the merge),
    "transfer_cache" (step "posted": after every message is posted) and
    "CacheTransfer.wait" (step = destination sequence, after its messages
    completed and before this rank stores it).
    """
    global _fault_hook
    previous, _fault_hook = _fault_hook, hook
    try:
        yield
    finally:
        _fault_hook = previous


# ----------------------------------------------------------------------------- error path

def comm_error(what, exc):
    """The CommError for a collective ``what`` that raised ``exc`` (kept as its cause)."""
    error = CommError(f"{what}: {describe(exc)}")
    error.__cause__ = exc
    return error


@contextlib.contextmanager
def collective(what):
    """Within the block, an exception is a failed collective ``what``: re-raised as CommError."""
    try:
        yield
    except Exception as exc:
        raise comm_error(what, exc) from exc


@contextlib.contextmanager
def fault_path(comm, where, cause=None):
    """Within the block, an exception takes the error path of ``comm`` (``Communicator.fail``): it is
    recorded, the communicators are closed and every rank raises. ``cause``: the exception to report
    instead (this rank's own error, found before the collective that failed). With ``comm`` None (one
    rank, or no communicator yet) exceptions pass unchanged."""
    if comm is None:
        yield
        return
    try:
        yield
    except Exception as exc:
        comm.fail(where, exc if cause is None else cause)


def describe(exc):
    """One line: the exception's type and the first line of its message."""
    lines = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {lines[0][:300] if lines else ''}"


def gave_up_waiting(exc):
    """Whether a failed collective timed out itself (rather than finding a connection closed by a peer)."""
    text = str(exc.__cause__ or exc).lower()
    return "timed out" in text or "timeout" in text


def record_first_failure(store, key, text, grace=0.0):
    """Store ``text`` under ``key`` unless a failure is recorded there already; return the record that stands.

    ``grace``: seconds to wait for another rank's record first. A rank that only
    found its connections closed passes one: on gloo a timed-out receive closes
    every connection of the rank that timed out *before* that rank can record
    why, so the closed connection is seen first, and without the wait its
    symptom would win over the cause.
    """
    try:
        if grace > 0:
            with contextlib.suppress(Exception):  # nothing recorded within the grace: record our own
                store.wait([key], datetime.timedelta(seconds=grace))
                return store.get(key).decode(errors="replace")
        return store.compare_set(key, "", text).decode(errors="replace")
    except Exception:  # the store itself is gone (e.g. rank 0 died): nobody can be told
        return text


def close_connections(pg, backend):
    """Make the ranks blocked on this one in ``pg`` fail now rather than at the timeout.

    NCCL: ``abort()``. gloo: its ``abort`` leaves the connections open, but a
    receive that times out closes its connection (both ends see it closed), so
    a receive with a 1 ms timeout from every peer closes them all.
    """
    if "nccl" in backend:
        with contextlib.suppress(Exception):
            pg.abort()
        return
    me, probe, instant = pg.rank(), torch.empty(1), datetime.timedelta(milliseconds=1)
    for peer in range(pg.size()):
        if peer != me:
            with contextlib.suppress(Exception):
                pg.recv([probe], peer, _CLOSE_TAG).wait(instant)


_CLOSE_TAG = 0x7FFF_0000  # never used by a real message


def group_store(pg):
    """The store of ``pg`` (for failure records); None for backends without one."""
    try:
        return pg.get_group_store()
    except Exception:
        return None
