"""Process groups and collectives for context parallelism.

* ``build_mesh_comms``: the ring and Ulysses communication of a P = R x U mesh.
* ``RingComm``: one step of the ring, "send to the next ring rank, receive
  from the previous one", posted as a batch and waited for later.
* ``UlyssesComm``: the all-to-all inside one Ulysses group.
* ``agree_on_inputs``: every rank learns whether every other rank accepted
  its inputs, so a bad input raises on every rank instead of leaving the
  others blocked in a collective.
* ``check_backend``: NCCL for CUDA tensors, gloo for CPU tensors.
"""
import torch
import torch.distributed as dist

# Stable small ints for dtypes, so ranks can compare them inside a signature.
_DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float64, torch.int64, torch.int32, torch.int16,
           torch.int8, torch.uint8, torch.bool, torch.complex64, torch.complex128)


def dtype_code(dtype):
    return _DTYPES.index(dtype) if dtype in _DTYPES else len(_DTYPES)


def global_ranks(group):
    """Global rank of each rank of ``group``, in group-rank order (P2P peers and new_group speak global ranks)."""
    return [dist.get_global_rank(group, i) for i in range(dist.get_world_size(group))]


def build_mesh_comms(group, ulysses_degree):
    """(RingComm or None, UlyssesComm or None) of this rank; None where that axis has one rank.

    The mesh is rank = ring_index * ulysses_degree + ulysses_index (group ranks),
    so each Ulysses group is a run of adjacent ranks.

    The ring needs no subgroup: P2P ops on ``group`` name their peers. The
    Ulysses all-to-all gets its own subgroup when ``group`` spans the whole
    world, where every process can call new_group (it is collective over the
    default group) for every Ulysses group, in the same order. A smaller
    ``group`` cannot make subgroups safely (processes outside it never get
    here, and gloo's local-synchronisation groups hang after a group that left
    some ranks out), so its all-to-all runs on ``group`` itself, with zero-size
    parts for the ranks outside this Ulysses group.
    """
    ranks = global_ranks(group)
    size, rank = len(ranks), dist.get_rank(group)
    ring_degree = size // ulysses_degree
    ring_index, ulysses_index = divmod(rank, ulysses_degree)
    ring = None
    if ring_degree > 1:
        ring = RingComm(group, [ranks[r * ulysses_degree + ulysses_index] for r in range(ring_degree)])
    if ulysses_degree == 1:
        return ring, None
    if ulysses_degree == size:
        return ring, UlyssesComm(group, ulysses_degree)
    if size == dist.get_world_size():
        backend = dist.get_backend(group)
        mine = None
        for r in range(ring_degree):
            subgroup = dist.new_group(ranks[r * ulysses_degree:(r + 1) * ulysses_degree], backend=backend)
            if r == ring_index:
                mine = subgroup
        return ring, UlyssesComm(mine, ulysses_degree)
    return ring, UlyssesComm(group, ulysses_degree, first=ring_index * ulysses_degree)


class UlyssesComm:
    """The all-to-all among the ``degree`` Ulysses ranks [first, first + degree) of ``group``."""

    def __init__(self, group, degree, first=0):
        self.group, self.degree = group, degree
        size = dist.get_world_size(group)
        # Along dim 0 of the exchanged tensor: one slice per Ulysses rank, none for the others.
        self.splits = None if size == degree else [int(first <= r < first + degree) for r in range(size)]

    def all_to_all(self, x):
        """x (degree, ...) contiguous; returns y with y[i] = Ulysses rank i's x[this rank's index]."""
        y = torch.empty_like(x)
        dist.all_to_all_single(y, x, self.splits, self.splits, group=self.group)
        return y


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

    def __init__(self, group, members):
        """``members``: global ranks of the ring, in ring order; this process is one of them."""
        self.group = group
        self.size = len(members)
        self.index = members.index(dist.get_rank())
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
