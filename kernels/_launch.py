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
import types

import torch
import triton.language as tl
from triton.runtime.interpreter import InterpretedFunction, _patch_lang
from triton.runtime.jit import JITFunction

from ._autotune import cpu_config, tuned

_lock = threading.Lock()


@functools.lru_cache(maxsize=None)
def _interpreted(fn):
    return InterpretedFunction(fn)


def _language_modules():
    """A function whose globals hold triton.language and triton.language.core: patching
    "for" it patches what our kernels and Triton's own helpers (tl.cdiv, tl.sum...) use."""
    return types.FunctionType(_language_modules.__code__, {"tl": tl, "core": tl.core})


@contextlib.contextmanager
def _interpreting():
    with _lock:
        # Patch the language once for the whole launch and restore it afterwards.
        # InterpretedFunction.__call__ (a helper called from a kernel) would patch it
        # again on every call and never restore it, which breaks later GPU compiles
        # in the same process; helpers therefore run their rewritten source directly.
        scope = _patch_lang(_language_modules())
        original_call = JITFunction.__call__
        JITFunction.__call__ = lambda self, *args, **kwargs: _interpreted(self.fn).rewrite()(*args, **kwargs)
        try:
            yield
        finally:
            JITFunction.__call__ = original_call
            scope.restore()


def uses_interpreter(t: torch.Tensor) -> bool:
    return t.device.type == "cpu"


# CUDA's grid limits: x up to 2**31 - 1 programs, y and z up to 65535.
GRID_LIMITS = (2**31 - 1, 65535, 65535)


def check_grid(grid):
    """``grid`` as a 3-tuple, or a ValueError if CUDA could not launch it (checked on CPU too)."""
    grid = tuple(int(g) for g in grid) + (1,) * (3 - len(grid))
    for axis, (size, limit) in enumerate(zip(grid, GRID_LIMITS)):
        if size > limit:
            raise ValueError(f"kernel grid {grid} exceeds CUDA's limit of {limit} programs on axis {axis}")
    return grid


def launch(kernel, grid, args, constants, reference: torch.Tensor, in_place=False):
    """Run ``kernel`` over ``grid`` with positional ``args`` and constexpr ``constants``.

    On CPU: interpreted, with the fixed block sizes of ``_autotune.cpu_config``.
    On GPU: its autotuned wrapper picks them; ``in_place`` launches (outputs that
    are also inputs) have their outputs restored between autotuning trials.
    ``grid`` may be a function of the tunables, as in Triton; it is checked
    against CUDA's limits on either device.
    """
    shape = (lambda meta: check_grid(grid(meta))) if callable(grid) else (lambda meta: check_grid(grid))
    if uses_interpreter(reference):
        meta = {**constants, **cpu_config(kernel)}
        with _interpreting():
            _interpreted(kernel.fn)[shape(meta)](*args, **meta)
    else:
        with torch.cuda.device(reference.device):
            tuned(kernel, bool(in_place))[shape](*args, **constants)
