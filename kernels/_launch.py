"""Launching one Triton kernel source on either device.

GPU tensors run the compiled kernel. CPU tensors run the *same* source through
Triton's interpreter, chosen per call from the tensor's device, so the user sets
no ``TRITON_INTERPRET`` variable and a process can use both.

Why the patch below: ``triton.jit`` decides compile-vs-interpret once, when a
function is decorated. Our kernels (and Triton's own ``tl.zeros``/``tl.sum``...)
are compiled-mode ``JITFunction`` objects, whose ``__call__`` refuses to run in
Python. While an interpreted launch is in flight we route those calls to an
interpreted copy of the same function; the compiled path never calls
``JITFunction.__call__`` (it reads the source), so it is unaffected.
"""
import contextlib
import functools
import threading

import torch
from triton.runtime.interpreter import InterpretedFunction
from triton.runtime.jit import JITFunction

_lock = threading.Lock()


@functools.lru_cache(maxsize=None)
def _interpreted(fn):
    return InterpretedFunction(fn)


@contextlib.contextmanager
def _interpreting():
    with _lock:
        original_call = JITFunction.__call__
        JITFunction.__call__ = lambda self, *args, **kwargs: _interpreted(self.fn)(*args, **kwargs)
        try:
            yield
        finally:
            JITFunction.__call__ = original_call


def uses_interpreter(t: torch.Tensor) -> bool:
    return t.device.type == "cpu"


def launch(kernel, tuned_kernel, grid, args, constants, cpu_config, reference: torch.Tensor):
    """Run ``kernel`` over ``grid`` with positional ``args`` and constexpr ``constants``.

    On CPU: interpreted, with the fixed tunables ``cpu_config`` (block sizes).
    On GPU: ``tuned_kernel``, the autotuned wrapper of ``kernel``, picks them.
    ``grid`` may be a function of the tunables, as in Triton.
    """
    if uses_interpreter(reference):
        meta = {**constants, **cpu_config}
        with _interpreting():
            _interpreted(kernel.fn)[grid(meta) if callable(grid) else grid](*args, **meta)
    else:
        with torch.cuda.device(reference.device):
            tuned_kernel[grid](*args, **constants)
