"""Process groups and collectives for context parallelism.

* ``build_subgroups``: the ring and Ulysses groups of a P = R x U mesh.
* ``RingComm``: one step of the ring, "send to the next ring rank, receive
  from the previous one", posted as a batch and waited for later.
* ``agree_on_inputs``: every rank learns whether every other rank accepted
  its inputs, so a bad input raises on every rank instead of leaving the
  others blocked in a collective.
* ``check_backend``: NCCL for CUDA tensors, gloo for CPU tensors.
"""
import torch
import torch.distributed as dist

# A rank of this process's group -> global rank; new_group and P2P peers speak global ranks.
def global_ranks(group):
    return [dist.get_global_rank(group, i) for i in range(dist.get_world_size(group))]


# Groups made with use_local_synchronization are named by a hash of their ranks:
# making one twice in a process would reuse a name, so each is made once.
_local_subgroups = {}


def _new_subgroup(ranks, backend, whole_world):
    if whole_world:
        return dist.new_group(ranks, backend=backend)
    key = (id(dist.group.WORLD), tuple(ranks), str(backend))
    if key not in _local_subgroups:
        _local_subgroups[key] = dist.new_group(ranks, backend=backend, use_local_synchronization=True)
    return _local_subgroups[key]


def build_subgroups(group, ulysses_degree):
    """(ring_group, ulysses_group) of this rank; None where that axis has one rank.

    The mesh is rank = ring_index * ulysses_degree + ulysses_index (group ranks),
    so each Ulysses group is a run of adjacent ranks. An axis that spans the
    whole group reuses ``group`` itself.
    """
    ranks = global_ranks(group)
    size = len(ranks)
    ring_degree = size // ulysses_degree
    if ulysses_degree == 1:
        return (group if size > 1 else None), None
    if ring_degree == 1:
        return None, group
    ring_index, ulysses_index = divmod(dist.get_rank(group), ulysses_degree)
    ring_lists = [[ranks[r * ulysses_degree + u] for r in range(ring_degree)] for u in range(ulysses_degree)]
    ulysses_lists = [[ranks[r * ulysses_degree + u] for u in range(ulysses_degree)] for r in range(ring_degree)]
    backend = dist.get_backend(group)
    # new_group is collective over the *default* group: when our group is the
    # whole world every process calls it for every subgroup, in the same order.
    # Otherwise processes outside our group never get here, so each rank makes
    # only its own subgroups, synchronising with their members only.
    whole_world = size == dist.get_world_size()
    made = {}
    for kind, lists in (("ring", ring_lists), ("ulysses", ulysses_lists)):
        for index, members in enumerate(lists):
            mine = index == (ulysses_index if kind == "ring" else ring_index)
            if whole_world or mine:
                subgroup = _new_subgroup(members, backend, whole_world)
                if mine:
                    made[kind] = subgroup
    return made["ring"], made["ulysses"]


class _Pending:
    """Outstanding P2P works of one ring step."""

    def __init__(self, works):
        self.works = works

    def wait(self):
        for work in self.works:
            work.wait()


class RingComm:
    """P2P along one ring: rank i sends to i+1 and receives from i-1 (mod ring size).

    ``exchange`` only posts the transfers; the caller launches its kernels and
    waits afterwards, so communication overlaps computation.
    """

    def __init__(self, group):
        self.group = group
        members = global_ranks(group)
        self.size = len(members)
        self.index = dist.get_rank(group)
        self.next_rank = members[(self.index + 1) % self.size]
        self.prev_rank = members[(self.index - 1) % self.size]

    def exchange(self, send, recv, tag=0):
        """Post: send ``send`` to the next rank, receive the previous rank's into ``recv``."""
        ops = [dist.P2POp(dist.isend, send, self.next_rank, self.group, tag),
               dist.P2POp(dist.irecv, recv, self.prev_rank, self.group, tag)]
        return _Pending(dist.batch_isend_irecv(ops))


def check_backend(group, device, where):
    """Raise ValueError if ``group``'s backend cannot move tensors on ``device``."""
    backend = str(dist.get_backend(group)).lower()
    if device.type == "cuda" and "nccl" not in backend:
        raise ValueError(f"{where}: CUDA tensors need an NCCL process group, this group's backend is {backend!r}")
    if device.type == "cpu" and "gloo" not in backend:
        raise ValueError(f"{where}: CPU tensors need a gloo process group, this group's backend is {backend!r}")


def _exchange_device(group, hint):
    backend = str(dist.get_backend(group)).lower()
    on_cuda = isinstance(hint, torch.Tensor) and hint.device.type == "cuda"
    if "nccl" in backend and (on_cuda or "gloo" not in backend):
        return hint.device if on_cuda else torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def agree_on_inputs(group, signature, error, where, field_names, hint=None):
    """Collective: raise on every rank if any rank's check failed or signatures differ.

    ``signature``: a list of ints describing this rank's inputs (sizes, flags);
    ``error``: the exception this rank's own checks raised, or None. Every rank
    must call this with signatures of the same length. A rank whose own check
    failed re-raises its error; the others raise a ValueError naming it.
    """
    size = dist.get_world_size(group)
    device = _exchange_device(group, hint)
    mine = torch.tensor([0 if error is None else 1, *signature], dtype=torch.int64, device=device)
    everyone = [torch.empty_like(mine) for _ in range(size)]
    dist.all_gather(everyone, mine, group=group)
    rows = [t.tolist() for t in everyone]
    if error is not None:
        raise error
    failed = [rank for rank, row in enumerate(rows) if row[0]]
    if failed:
        raise ValueError(f"{where}: rank(s) {failed} of the context-parallel group rejected their inputs "
                         "(see the error raised there)")
    differing = [rank for rank, row in enumerate(rows) if row != rows[0]]
    if differing:
        def describe(row):
            return ", ".join(f"{name}={value}" for name, value in zip(field_names, row[1:]))
        raise ValueError(f"{where}: ranks disagree on their inputs: rank 0 has {describe(rows[0])}; "
                         f"rank {differing[0]} has {describe(rows[differing[0]])}")
