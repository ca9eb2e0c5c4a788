"""Which rank does what: the nodes of the ranks, the Ulysses degree "auto" picks, the mesh order.

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
"""
import math
import os
import socket
import zlib
from dataclasses import dataclass


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
