"""A dispatch mode that checks cpattn's fake (meta) implementations against the real operators.

torch.compile plans its buffers from an operator's fake implementation; inductor then asserts
that the real outputs have exactly those sizes and strides. ``FakeMatchesReal`` runs every
``cpattn::`` operator called inside it twice, for real and on fake copies of its arguments,
and records each output whose shape, strides or dtype differ, so a test can check every
layout an entry point passes, forward and backward, without compiling anything.
"""
import torch
from torch.utils import _pytree as pytree
from torch.utils._python_dispatch import TorchDispatchMode
from torch._subclasses.fake_tensor import FakeTensorMode


def _layout(t):
    # The stride of a dimension of size 1 never moves an address, and inductor's own check
    # (assert_size_stride) ignores it: (1, H, S) with batch stride S or H * S is one layout.
    strides = tuple(None if size == 1 else stride for size, stride in zip(t.shape, t.stride()))
    return tuple(t.shape), strides, t.dtype


class FakeMatchesReal(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.seen = set()      # names of the cpattn operators called
        self.mismatches = []   # (operator, output index, real layout, fake layout)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        real = func(*args, **kwargs)
        if func.namespace == "cpattn":
            self.seen.add(func.name())
            with FakeTensorMode() as mode:
                fake = func(*pytree.tree_map_only(torch.Tensor, mode.from_tensor, args),
                            **pytree.tree_map_only(torch.Tensor, mode.from_tensor, kwargs))
            for i, (r, f) in enumerate(zip(pytree.tree_leaves(real), pytree.tree_leaves(fake))):
                if isinstance(r, torch.Tensor) and _layout(r) != _layout(f):
                    self.mismatches.append((func.name(), i, _layout(r), _layout(f)))
        return real
