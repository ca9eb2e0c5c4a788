"""Which rank does what: the nodes of the ranks, the Ulysses degree "auto" picks, the mesh order, and
the communicators of one rank's place in the mesh (DESIGN.md, "Mesh order").

A mesh of P = ring_degree x ulysses_degree ranks puts the group's ranks in a
"mesh order"; mesh rank m = ring_index * ulysses_degree + ulysses_index. The
Ulysses all-to-all is the heavy, latency-bound exchange, so it should stay
inside a node; the ring's P2P traffic is lighter and overlapped with compute.

* ``node_of_this_process``: (hash of the host name, first global rank of the
  node), learned from the process itself: LOCAL_RANK (torchrun gives a node
  consecutive global ranks), else LOCAL_WORLD_SIZE, else the host name alone.
  Every rank sends its own to the others at construction, so the mesh is right
  whatever the group looks like, e.g. a context-parallel group strided across
  nodes because tensor parallelism takes the neighbouring ranks.
* ``plan_mesh``: for ``ulysses_degree="auto"`` the largest degree that divides
  the group, every node's share of it and the head counts, with the Ulysses
  groups formed inside nodes; for an explicit degree, Ulysses groups of
  adjacent group ranks (the documented contract), and a note when one spans nodes.
* ``Mesh``: one rank's place in the mesh (``Layout``, ring and Ulysses index)
  and its communicators, built collectively from the plan.
"""
import math
import os
import socket
import zlib
from dataclasses import dataclass

import torch
import torch.distributed as dist

from .comm import DEFAULT_TIMEOUT, Communicator, RingComm, UlyssesComm, gather_rows, global_ranks
from .faults import collective, fault_path
from .layout import Layout


def node_of_this_process(global_rank):
    """Two ints naming this process's node: (crc32 of the host name, first global rank on the node)."""
    host = zlib.crc32(socket.gethostname().encode())
    try:
        if "LOCAL_RANK" in os.environ:
            return host, global_rank - int(os.environ["LOCAL_RANK"])
        if "LOCAL_WORLD_SIZE" in os.environ:
            return host, global_rank - global_rank % int(os.environ["LOCAL_WORLD_SIZE"])
    except (ValueError, ZeroDivisionError):
        raise ValueError("ContextParallel: LOCAL_RANK and LOCAL_WORLD_SIZE must be integers (the latter positive), "
                         f"got {os.environ.get('LOCAL_RANK')!r} and {os.environ.get('LOCAL_WORLD_SIZE')!r}") from None
    return host, 0


def auto_ulysses_degree(world_size, num_heads, num_kv_heads=None, local_world_size=None):
    """The largest Ulysses degree d for ``world_size`` ranks, ``local_world_size`` of them per node.

    d divides the group size, the ranks per node (so each Ulysses group fits in
    a node; None: LOCAL_WORLD_SIZE, or the group size when unset) and the query
    head count, and the kv heads split or replicate evenly (d divides Hkv or
    Hkv divides d). ``ContextParallel`` passes the ranks per node it learned
    from the ranks themselves.
    """
    num_kv_heads = num_heads if num_kv_heads is None else num_kv_heads
    if local_world_size is None:
        local_world_size = int(os.environ.get("LOCAL_WORLD_SIZE", world_size))
    for degree in range(min(world_size, local_world_size), 0, -1):
        if (world_size % degree == 0 and local_world_size % degree == 0 and num_heads % degree == 0
                and (num_kv_heads % degree == 0 or degree % num_kv_heads == 0)):
            return degree
    return 1


@dataclass(frozen=True)
class MeshPlan:
    ulysses_degree: int
    order: tuple   # group ranks in mesh order
    nodes: tuple   # node index of each group rank (0, 1, ... in order of first appearance)
    reason: str

    @property
    def ring_degree(self):
        return len(self.order) // self.ulysses_degree

    def ulysses_groups(self):
        """Group ranks of each Ulysses group, in Ulysses order."""
        u = self.ulysses_degree
        return [list(self.order[i:i + u]) for i in range(0, len(self.order), u)]


def plan_mesh(requested_degree, node_ids, num_heads=None, num_kv_heads=None):
    """The mesh of a group whose rank g lives on node ``node_ids[g]`` (any hashable)."""
    labels = {}
    nodes = tuple(labels.setdefault(n, len(labels)) for n in node_ids)
    size, counts = len(nodes), [nodes.count(n) for n in range(len(labels))]
    where = f"{size} ranks on {len(counts)} node(s) ({'/'.join(map(str, counts))} of them per node)"
    if requested_degree == "auto":
        per_node = math.gcd(*counts)
        degree = auto_ulysses_degree(size, num_heads, num_kv_heads, local_world_size=per_node)
        # Ulysses groups inside nodes: ranks by node, in group order within a node.
        order = tuple(sorted(range(size), key=lambda g: (nodes[g], g)))
        kv = num_heads if num_kv_heads is None else num_kv_heads
        reason = (f"'auto': {where}; {num_heads} query and {kv} kv heads. Degree {degree} is the largest that "
                  f"divides the group size, every node's share and the heads, so every Ulysses all-to-all stays "
                  f"inside one node and the ring (degree {size // degree}) spans the rest")
    else:
        degree, order = requested_degree, tuple(range(size))
        spanning = sum(len({nodes[g] for g in order[i:i + degree]}) > 1 for i in range(0, size, degree))
        reason = (f"ulysses_degree={degree} given: Ulysses groups are adjacent group ranks; {where}" +
                  (f"; {spanning} Ulysses group(s) span nodes (ulysses_degree='auto' keeps them inside nodes)"
                   if spanning else ""))
    return MeshPlan(degree, order, nodes, reason)


class Mesh:
    """This rank's place in the mesh of a ContextParallel over ``group``, and the communicators along its axes.

    Collective over ``group``: the ranks learn each other's nodes (``node``: this
    process's, from ``node_of_this_process``), plan the mesh (``plan_mesh``) and
    create the process groups (``comm.Communicator``). ``comm``, ``ring`` and
    ``ulysses`` are None on an axis of one rank; usp.py runs attention on them.
    """

    def __init__(self, group, ulysses_degree, ring_impl, node, num_heads=None, num_kv_heads=None,
                 timeout=DEFAULT_TIMEOUT):
        self.group, world_size = group, dist.get_world_size(group)
        nodes = [tuple(row) for row in gather_rows(group, node)] if world_size > 1 else [tuple(node)]
        self.plan = plan_mesh(ulysses_degree, nodes, num_heads, num_kv_heads)
        degree = self.plan.ulysses_degree
        self.layout = Layout(world_size // degree, degree, ring_impl)
        self.rank = self.plan.order.index(dist.get_rank(group))  # this rank's mesh rank
        self.ring_index, self.ulysses_index = divmod(self.rank, degree)
        self.mesh_ranks = [self.plan.order.index(g) for g in range(world_size)]  # of each group rank
        self.comm = self.ring = self.ulysses = None
        if world_size > 1:
            self.comm = Communicator(group, timeout, self.plan.ulysses_groups() if degree > 1 else None)
            if self.layout.ring_degree > 1:
                self.ring = RingComm(self.comm, self._rings()[self.ulysses_index])
            if degree > 1:
                self.ulysses = UlyssesComm(self.comm, self._ulysses_groups()[self.ring_index])

    def _rings(self):
        """Global ranks of each ring, in ring order, one ring per Ulysses index."""
        ranks, order, degree = global_ranks(self.group), self.plan.order, self.layout.ulysses_degree
        return [[ranks[order[r * degree + u]] for r in range(self.layout.ring_degree)] for u in range(degree)]

    def _ulysses_groups(self):
        """Global ranks of each Ulysses group, in Ulysses order."""
        ranks = global_ranks(self.group)
        return [[ranks[g] for g in group] for group in self.plan.ulysses_groups()]

    def describe(self):
        """The mesh and why: degrees, every Ulysses group and ring (global ranks), nodes, communicators."""
        ranks = global_ranks(self.group)
        return {
            "ring_degree": self.layout.ring_degree, "ulysses_degree": self.layout.ulysses_degree,
            "ring_impl": self.layout.ring_impl, "rank": dist.get_rank(self.group), "mesh_rank": self.rank,
            "ring_index": self.ring_index, "ulysses_index": self.ulysses_index,
            "ulysses_groups": self._ulysses_groups(), "rings": self._rings(),
            "node_of_rank": {ranks[g]: node for g, node in enumerate(self.plan.nodes)},
            "communicators": "none (one rank)" if self.comm is None else self.comm.describe(),
            "why": self.plan.reason,
        }

    def all_gather_shards(self, x, seq_dim, lengths, where):
        """Every group rank's shard of one tensor, this rank's ``x`` among them (``lengths``: each one's
        length along ``seq_dim``), on the fault path of faults.py."""
        if self.comm is None:
            return [x]
        # all_gather moves equal shapes: every shard travels padded to the longest one
        padded = x.new_zeros([max(lengths) if d == seq_dim else size for d, size in enumerate(x.shape)])
        padded.narrow(seq_dim, 0, x.shape[seq_dim]).copy_(x)
        pieces = [torch.empty_like(padded) for _ in lengths]
        with fault_path(self.comm, where), collective("all-gather"):
            work = dist.all_gather(pieces, padded, group=self.comm.group, async_op=True)
            self.comm.wait([work], x.device.type == "cpu")
        return pieces

    def close(self):
        if self.comm is not None:
            self.comm.close()
