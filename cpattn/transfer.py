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
"""
import torch
import torch.distributed as dist

from .agreement import agree
from .kv_cache import ShardedKVCache
from .layout import StripeLayout
from .pages import check_pages


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
    """The messages of one ``transfer_cache`` call in flight; ``wait`` completes them."""

    def __init__(self, dst, ids, lengths):
        self.dst, self.ids, self.lengths = dst, ids, lengths
        self._works = {b: [] for b in ids}     # destination sequence -> outstanding works (sends or receives)
        self._pieces = {b: [] for b in ids}    # destination sequence -> (positions, k/v) this rank stores
        self._sent = {b: [] for b in ids}      # the buffers being sent, alive until their sends complete
        self._done = set()

    def sending(self, b, kv, work):
        """``kv`` (n, Hkv, stored width: ``ValueLayout.pack``) for destination sequence ``b`` is being sent
        (``work``)."""
        self._works[b].append(work)
        self._sent[b].append(kv)

    def receiving(self, b, positions, kv, work=None):
        """``kv`` (n, Hkv, stored width) holds, or once ``work`` completes will hold, the keys and values at
        ``positions`` of destination sequence ``b``, to store on this rank."""
        if work is not None:
            self._works[b].append(work)
        self._pieces[b].append((positions, kv))

    @property
    def tokens_received(self):
        """How many positions this rank stores (received, or kept from its own source cache)."""
        return sum(positions.numel() for pieces in self._pieces.values() for positions, _ in pieces)

    def wait(self, batch_index=None):
        """Complete sequences ``batch_index`` (destination ids; default all). On a decode rank their keys
        and values are then stored and their lengths set: they can be decoded."""
        todo = self.ids if batch_index is None else [int(b) for b in torch.as_tensor(batch_index).reshape(-1)]
        for b in todo:
            if b in self._done:
                continue
            if b not in self._works:
                raise ValueError(f"CacheTransfer.wait: sequence {b} is not part of this transfer ({self.ids})")
            for work in self._works[b]:
                work.wait()
            self._sent[b].clear()
            if self.dst is not None:
                dev_id = torch.tensor([b], device=self.dst.device)
                for positions, kv in self._pieces[b]:
                    k, v = self.dst.values.unpack(kv[None])
                    self.dst.store(dev_id, positions.to(self.dst.device)[None], k, v)
                self.dst.advance(torch.tensor([b]), self.lengths[b])
            self._done.add(b)


def transfer_cache(src, dst, group=None, batch_index=None, dst_batch_index=None):
    """Move sequences from a prefill group's cache to a decode group's cache, resharding on the way.

    Collective over ``group`` (default: the default group), which must contain every
    rank of both caches' groups: every rank of it calls this, passing its own cache of
    the prefill group as ``src`` and/or of the decode group as ``dst`` (None where it
    holds none). ``batch_index``: the source sequences (default all); ``dst_batch_index``:
    where they go in ``dst`` (default the same ids), which must be empty. The source cache
    is not changed. Returns a ``CacheTransfer``: ``wait(b)`` completes destination
    sequence b (every rank of both groups must wait for what it sends or receives).
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
        return record
    record = agree(where, check, group=group)
    records = [None] * dist.get_world_size(group)
    dist.all_gather_object(records, record, group=group)
    src_info, dst_info = _one_side(records, "src"), _one_side(records, "dst")
    lengths = _check_plan(src_info, dst_info)
    src_ids, dst_ids = src_info["ids"], dst_info["ids"]
    src_global = {r["src"]["rank"]: r["global"] for r in records if r["src"] is not None}
    dst_global = {r["dst"]["rank"]: r["global"] for r in records if r["dst"] is not None}
    src_layout = StripeLayout(src_info["stripe"], src_info["world"])
    dst_layout = StripeLayout(dst_info["stripe"], dst_info["world"])

    transfer = CacheTransfer(dst, dst_ids, dict(zip(dst_ids, lengths)))
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
                    transfer.receiving(db, mine, kv)  # a rank in both groups keeps its own part: no message
                elif me_recv:
                    buffer = torch.empty((mine.numel(), dst.num_kv_heads, dst.values.stored_dim), dtype=dst.dtype,
                                         device=dst.device)
                    transfer.receiving(db, mine, buffer, dist.irecv(buffer, src=sender, group=group, tag=i))
                elif me_send:
                    transfer.sending(db, kv, dist.isend(kv, dst=receiver, group=group, tag=i))
    return transfer
