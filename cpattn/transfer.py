"""Prefill/decode disaggregation: move a prefilled ShardedKVCache from one group of ranks to another.

Serving systems prefill on one set of GPUs and decode on another (DistServe;
vLLM's and SGLang's prefill and decode instances): a long prompt's prefill does
not stall the decode steps of running requests, and each side gets the
parallelism that suits it. ``transfer_cache`` hands the keys and values of some
sequences from the prefill group's cache (P ranks) to the decode group's (Q
ranks, Q may differ from P, the groups disjoint or overlapping, the two caches
with their own stripes, pages or contiguous storage):

* every position of a sequence has an owner in each layout, so position p goes
  from prefill rank ``src.owner(p)`` to decode rank ``dst.owner(p)``: one
  point-to-point message per sequence and pair of ranks that share positions,
  holding only the tokens in use (never whole pages or the capacity);
  a rank in both groups copies its own part locally;
* first, one small all-gather of each rank's description (layout, shapes,
  lengths, free pages) over ``group``; every rank runs the same checks on it,
  so a bad transfer (head counts or dtypes that differ, a decode cache too
  small, sequences not empty) raises on every rank and none waits forever;
* all messages are posted at once; ``CacheTransfer.wait(b)`` completes sequence
  b only, so decoding b can start as soon as its pages arrived while the rest
  are still in flight.

Faults (faults.py; DESIGN.md, "Agreement and faults"): the transfer runs on a ``comm.Communicator`` over
``group`` with ``timeout``, cpattn's own process group over those ranks. Every rank of ``group`` creates
it at the first transfer over those ranks and that timeout and keeps it for the later ones (serving
transfers every request: a new NCCL communicator each time would cost more than the transfer), until a
failure closes it (the next transfer then creates a new one) or ``close_transfer_groups()``. The ranks
agree on whether they hold a usable one before any of them creates one. The description exchange, the
posting of the messages and ``CacheTransfer.wait`` run in ``fault_path``: a rank that raises there
records why and closes the group, and every rank raises within the timeout, that rank its own error,
the others ``PeerFailure`` naming it. So that a rank whose own messages are done (a sender) learns of a
failure elsewhere too, the wait that completes a rank's last sequence ends with a small all-gather over
the group: every rank of ``group`` waits for every sequence (``wait()``, or ``wait(b)`` for each b), and
the transfer completes on all of them or raises on all.
"""
from typing import NamedTuple

import torch
import torch.distributed as dist

from .agreement import agree
from .checks import check_timeout
from .comm import DEFAULT_TIMEOUT, Communicator, gather_rows, global_ranks
from .faults import collective, fault_path, fault_point
from .kv_cache import ShardedKVCache
from .layout import StripeLayout
from .pages import check_pages


# (global ranks, timeout) -> the Communicator transfers over those ranks use, kept for the next transfer
_kept_groups = {}


def close_transfer_groups():
    """Give back the process groups kept for transfers (local; call it on every rank, e.g. at shutdown)."""
    for comm in _kept_groups.values():
        comm.close()
    _kept_groups.clear()


class CacheTransferCall(NamedTuple):
    """What the ranks of one ``transfer_cache`` agree on before any of them creates a process group, and
    this rank's description of its caches (``record``, which ranks differ in)."""
    timeout: float
    keeps_group: bool  # a usable Communicator over these ranks and timeout, kept from an earlier transfer
    record: dict

    LOCAL = ("record",)
    FIXES = {"timeout": "pass the same timeout on every rank",
             "keeps_group": "a rank closed its transfer group (close_transfer_groups) while others kept theirs: "
                            "call close_transfer_groups() on every rank"}


def _describe(cache, ids, role):
    """What the other ranks need to know about this rank's cache (plain Python values)."""
    info = {"rank": cache.rank, "world": cache.world_size, "batch": cache.batch, "heads": cache.num_kv_heads,
            "head_dim": cache.head_dim, "v_head_dim": cache.v_head_dim, "latent": cache.latent,
            "dtype": str(cache.dtype), "stripe": cache.stripe,
            "capacity": cache.capacity, "ids": ids.tolist(), "seqlens": cache.seqlens.tolist()}
    if role == "dst":
        info.update(paged=cache.paged, page_size=cache.page_size, num_pages=cache.num_pages,
                    limit=cache.limit.tolist())
    return info


def _one_side(records, role):
    """The description shared by the caches of one side, checked to come from one whole group."""
    sides = [r[role] for r in records if r[role] is not None]
    if not sides:
        raise ValueError(f"transfer_cache: no rank passed a {'source' if role == 'src' else 'destination'} cache")
    world = sides[0]["world"]
    same = [k for k in ("world", "batch", "heads", "head_dim", "v_head_dim", "latent", "dtype", "stripe", "capacity",
                        "ids", "seqlens")
            if any(s[k] != sides[0][k] for s in sides)]
    if same or sorted(s["rank"] for s in sides) != list(range(world)):
        raise ValueError(f"transfer_cache: the {role} caches must be one cache per rank of one group, the same "
                         f"call everywhere; got ranks {sorted(s['rank'] for s in sides)} of {world}"
                         + (f", differing in {same}" if same else ""))
    return sides[0]


def _check_plan(src, dst):
    """The checks every rank runs on the same descriptions (so all reach the same verdict)."""
    where = "transfer_cache"
    for key, name in (("heads", "kv heads"), ("head_dim", "head dim"), ("v_head_dim", "value head dim"),
                      ("latent", "latent layout"), ("dtype", "dtype")):
        if src[key] != dst[key]:
            raise ValueError(f"{where}: the caches differ in {name}: source {src[key]}, destination {dst[key]}")
    if len(src["ids"]) != len(dst["ids"]):
        raise ValueError(f"{where}: {len(src['ids'])} source sequences but {len(dst['ids'])} destination ones")
    lengths = [src["seqlens"][b] for b in src["ids"]]
    if max(lengths) > dst["capacity"]:
        raise ValueError(f"{where}: a sequence of {max(lengths)} tokens does not fit the destination's capacity "
                         f"{dst['capacity']}")
    busy = [b for b in dst["ids"] if dst["seqlens"][b]]
    if busy:
        raise ValueError(f"{where}: destination sequences {busy} are not empty (reset them first)")
    if dst["paged"]:
        target = torch.tensor(dst["limit"])
        target[dst["ids"]] = torch.maximum(target[dst["ids"]], torch.tensor(lengths))
        check_pages(StripeLayout(dst["stripe"], dst["world"]), dst["page_size"], dst["num_pages"], target, where,
                    "destination rank")
    return lengths


class CacheTransfer:
    """The messages of one ``transfer_cache`` call in flight; ``wait`` completes them, over ``comm`` (the
    transfers' kept Communicator over the group's ranks; None on one rank)."""

    def __init__(self, comm, dst, ids, lengths, on_cpu):
        self.dst, self.ids, self.lengths = dst, ids, lengths
        self._comm = comm                      # until the transfer completes (None then, and on one rank)
        self._on_cpu = on_cpu                  # CPU tensors (gloo): the Communicator bounds their waits
        self._works = {b: [] for b in ids}     # destination sequence -> outstanding works (sends or receives)
        self._pieces = {b: [] for b in ids}    # destination sequence -> (positions, k/v) this rank stores
        self._sent = {b: [] for b in ids}      # the buffers being sent, alive until their sends complete
        self._done = set()

    def send(self, b, kv, peer, tag):
        """Post ``kv`` (n, Hkv, stored width: ``ValueLayout.pack``) of destination sequence ``b`` to global
        rank ``peer``."""
        with collective(f"transfer_cache: a send to rank {peer}"):
            self._works[b].append(dist.isend(kv, dst=peer, group=self._comm.group, tag=tag))
        self._sent[b].append(kv)

    def receive(self, b, positions, kv, peer=None, tag=None):
        """``kv`` (n, Hkv, stored width) holds, or once the message from global rank ``peer`` arrives will
        hold, the keys and values at ``positions`` of destination sequence ``b``, to store on this rank
        (``peer`` None: kept from this rank's own source cache, no message)."""
        if peer is not None:
            with collective(f"transfer_cache: a receive from rank {peer}"):
                self._works[b].append(dist.irecv(kv, src=peer, group=self._comm.group, tag=tag))
        self._pieces[b].append((positions, kv))

    @property
    def tokens_received(self):
        """How many positions this rank stores (received, or kept from its own source cache)."""
        return sum(positions.numel() for pieces in self._pieces.values() for positions, _ in pieces)

    def wait(self, batch_index=None):
        """Complete sequences ``batch_index`` (destination ids; default all). On a decode rank their keys
        and values are then stored and their lengths set: they can be decoded. Every rank of the
        transfer's group waits for every sequence: the wait that completes this rank's last one is
        collective (it learns that every rank completed, or raises with them)."""
        where = "CacheTransfer.wait"
        if self._comm is not None:
            self._comm.check(where)  # PeerFailure if the transfer failed or was closed
        with fault_path(self._comm, where):
            for b in self._sequences(batch_index, where):
                if b not in self._done:
                    self._complete_sequence(b)
            if len(self._done) == len(self.ids) and self._comm is not None:
                with collective(f"{where}: the closing all-gather"):
                    gather_rows(self._comm.group, [0], comm=self._comm)
                self._comm = None  # complete: a later wait has nothing to do

    def close(self):
        """Abandon the transfer (local, idempotent; nothing to do once it completed): this closes the
        transfers' group over these ranks, so the other ranks' waits, and those of every other transfer
        in flight on it, raise PeerFailure within the timeout; the next transfer creates a new group."""
        if self._comm is not None:
            self._comm.close()
            self._comm = None

    def _sequences(self, batch_index, where):
        """The destination ids ``batch_index`` names (None: all), each of this transfer."""
        ids = self.ids if batch_index is None else [int(b) for b in torch.as_tensor(batch_index).reshape(-1)]
        unknown = [b for b in ids if b not in self._works]
        if unknown:
            raise ValueError(f"{where}: sequences {unknown} are not part of this transfer ({self.ids})")
        return ids

    def _complete_sequence(self, b):
        """Wait for the messages of sequence ``b``, then store what this rank holds of it."""
        if self._works[b]:
            with collective(f"CacheTransfer.wait: the messages of sequence {b}"):
                self._comm.wait(self._works[b], self._on_cpu)
        fault_point("CacheTransfer.wait", b)
        self._sent[b].clear()
        if self.dst is not None:
            dev_id = torch.tensor([b], device=self.dst.device)
            for positions, kv in self._pieces[b]:
                k, v = self.dst.values.unpack(kv[None])
                self.dst.store(dev_id, positions.to(self.dst.device)[None], k, v)
            self.dst.advance(torch.tensor([b]), self.lengths[b])
        self._done.add(b)


def transfer_cache(src, dst, group=None, batch_index=None, dst_batch_index=None, timeout=DEFAULT_TIMEOUT):
    """Move sequences from a prefill group's cache to a decode group's cache, resharding on the way.

    Collective over ``group`` (default: the default group), which must contain every
    rank of both caches' groups: every rank of it calls this, passing its own cache of
    the prefill group as ``src`` and/or of the decode group as ``dst`` (None where it
    holds none). ``batch_index``: the source sequences (default all); ``dst_batch_index``:
    where they go in ``dst`` (default the same ids), which must be empty. The source cache
    is not changed. ``timeout``: seconds a rank waits for a failed or missing peer before
    raising (faults: the module docstring). Returns a ``CacheTransfer``: ``wait(b)``
    completes destination sequence b; every rank of ``group`` waits for every sequence.
    """
    where = "transfer_cache"
    group = dist.group.WORLD if group is None else group

    def check():
        record = {"global": dist.get_rank(), "src": None, "dst": None}
        for name, cache in (("src", src), ("dst", dst)):
            if cache is not None and not isinstance(cache, ShardedKVCache):
                raise TypeError(f"{where}: {name} must be a ShardedKVCache or None, got {type(cache).__name__}")
        if src is not None:
            record["src"] = _describe(src, src.sequence_ids(batch_index), "src")
        if dst is not None:
            record["dst"] = _describe(dst, dst.sequence_ids(batch_index if dst_batch_index is None
                                                            else dst_batch_index), "dst")
        seconds = check_timeout(timeout, where)
        kept = _kept_groups.get((tuple(global_ranks(group)), seconds))
        return CacheTransferCall(seconds, kept is not None and kept.is_open(), record)
    call = agree(where, check, group=group)
    record, comm = call.record, _transfer_group(group, call)
    with fault_path(comm, where):
        records = [record]
        if comm is not None:
            records = [None] * dist.get_world_size(comm.group)
            with collective(f"{where}: the all-gather of the descriptions"):
                dist.all_gather_object(records, record, group=comm.group)
    # Every rank reaches the same verdict from the same descriptions: a bad plan raises on all, none waits.
    src_info, dst_info = _one_side(records, "src"), _one_side(records, "dst")
    lengths = _check_plan(src_info, dst_info)
    src_ids, dst_ids = src_info["ids"], dst_info["ids"]
    src_global = {r["src"]["rank"]: r["global"] for r in records if r["src"] is not None}
    dst_global = {r["dst"]["rank"]: r["global"] for r in records if r["dst"] is not None}
    src_layout = StripeLayout(src_info["stripe"], src_info["world"])
    dst_layout = StripeLayout(dst_info["stripe"], dst_info["world"])

    on_cpu = all(cache.device.type == "cpu" for cache in (src, dst) if cache is not None)
    transfer = CacheTransfer(comm, dst, dst_ids, dict(zip(dst_ids, lengths)), on_cpu)
    with fault_path(comm, where):
        if dst is not None:
            for b, n in zip(dst_ids, lengths):
                dst.make_room(torch.tensor([b]), n, where)  # pages for the whole sequence, before anything arrives
        for i, (sb, db, n) in enumerate(zip(src_ids, dst_ids, lengths)):
            pos = torch.arange(n)
            src_owner, dst_owner = src_layout.owner(pos), dst_layout.owner(pos)
            for s_rank in range(src_info["world"]):
                for d_rank in range(dst_info["world"]):
                    mine = pos[(src_owner == s_rank) & (dst_owner == d_rank)]
                    if mine.numel() == 0:
                        continue
                    sender, receiver = src_global[s_rank], dst_global[d_rank]
                    me_send = src is not None and src.rank == s_rank
                    me_recv = dst is not None and dst.rank == d_rank
                    if me_send:
                        slots = src_layout.local_slot(mine).to(src.device)
                        # One message per piece: keys and values packed (a latent cache's keys alone).
                        kv = src.values.pack(*src.read(torch.tensor([sb], device=src.device), slots))[0].contiguous()
                    if me_recv and me_send:
                        transfer.receive(db, mine, kv)  # a rank in both groups keeps its own part: no message
                    elif me_recv:
                        buffer = torch.empty((mine.numel(), dst.num_kv_heads, dst.values.stored_dim),
                                             dtype=dst.dtype, device=dst.device)
                        transfer.receive(db, mine, buffer, sender, tag=i)
                    elif me_send:
                        transfer.send(db, kv, receiver, tag=i)
        fault_point(where, "posted")
    return transfer


def _transfer_group(group, call):
    """The Communicator of a transfer over ``group`` (None on one rank): the kept one, or a new one that is
    kept. Collective when new: every rank decides alike (``call.keeps_group`` was agreed on)."""
    if dist.get_world_size(group) == 1:
        return None
    key = (tuple(global_ranks(group)), call.timeout)
    if not call.keeps_group:
        if key in _kept_groups:
            _kept_groups.pop(key).close()
        _kept_groups[key] = Communicator(group, call.timeout, owner="cache transfer")
    return _kept_groups[key]
