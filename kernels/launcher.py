"""Launching one Triton kernel source on either device.

GPU tensors run the compiled kernel. CPU tensors run the *same* source through
Triton's interpreter, chosen per call from the tensor's device, so the user sets
no ``TRITON_INTERPRET`` variable and a process can use both.

Why the patches below: ``triton.jit`` decides compile-vs-interpret once, when a
function is decorated, and Triton has no public way to interpret one call. Our
kernels (and Triton's own ``tl.zeros``/``tl.sum``...) are compiled-mode
``JITFunction`` objects, whose ``__call__`` refuses to run in Python. While an
interpreted launch is in flight we route those calls to an interpreted copy of
the same function; the compiled path never calls ``JITFunction.__call__`` (it
reads the source), so it is unaffected.

The interpreter's internals differ between the Triton releases we support
(docs/supported-versions.md), so this module leans only on what they share:
``InterpretedFunction`` (with ``rewrite()``), ``_patch_lang(fn)`` and
``_patch_lang_tensor``. Two differences need handling:

- The interpreter patches ``triton.language`` for the launch. Triton >= 3.6
  undoes that afterwards (mostly: see ``interpreting``), older releases never
  do, and later compiled use in the process (a GPU launch, an ahead-of-time
  compile) must not meet the interpreter's versions. ``_language_restored``
  puts it back after every launch, on every release.
- Triton < 3.7 turns a scalar into a Python int with ``int(array)``, which
  numpy >= 2.4 refuses for the one-element arrays the interpreter holds scalars
  in, so every ``range(lo, hi, ...)`` with computed bounds fails. During our
  launches ``tl.tensor.__index__`` uses Triton 3.7's conversion instead.

One interpreter defect is common to every release: its cast to bfloat16 drops
the low bits (rounds toward zero, up to 1 ulp off), where a GPU's cvt.rn rounds
to nearest even. During our launches that cast goes through torch's conversion,
which rounds like the GPU, so CPU and GPU results agree bit for bit.
"""
import contextlib
import functools
import inspect
import sys
import threading
import types

import numpy as np
import torch
import triton
import triton.language as tl
from triton.runtime import interpreter
from triton.runtime.interpreter import InterpretedFunction, _patch_lang
from triton.runtime.jit import JITFunction

from .autotune import cpu_config, tuned

TRITON_VERSION = tuple(int(part) for part in triton.__version__.split(".")[:2])

_lock = threading.Lock()
_MISSING = object()


@functools.lru_cache(maxsize=None)
def interpreted(fn):
    return InterpretedFunction(fn)


def _language_modules():
    """A function whose globals hold triton.language and triton.language.core: patching
    "for" it patches what our kernels and Triton's own helpers (tl.cdiv, tl.sum...) use."""
    return types.FunctionType(_language_modules.__code__, {"tl": tl, "core": tl.core})


def language_objects():
    """The ``triton.language`` modules and their classes: everything the interpreter patches."""
    modules = [m for name, m in list(sys.modules.items())
               if m is not None and (name == "triton.language" or name.startswith("triton.language."))]
    classes = [c for m in modules for c in vars(m).values()
               if inspect.isclass(c) and c.__module__.startswith("triton.language")]
    return list({id(obj): obj for obj in modules + classes}.values())


@contextlib.contextmanager
def _language_restored():
    """Put back every attribute of ``triton.language`` that changed meanwhile.

    Names added to a class are removed. Names added to a module stay: they are
    the interpreter's own globals, which it adds to the modules of the helpers
    it rewrites (and caches), and which compiled code never reads.
    """
    saved = [(obj, dict(vars(obj))) for obj in language_objects()]
    try:
        yield
    finally:
        for obj, before in saved:
            now = dict(vars(obj))
            for name, value in before.items():
                if now.get(name, _MISSING) is not value:
                    setattr(obj, name, value)
            if inspect.isclass(obj):
                for name in now.keys() - before.keys():
                    delattr(obj, name)


def _scalar_index(tensor):
    # Triton 3.7's conversion of an interpreter scalar (a one-element array) to an int.
    return int(tensor.handle.data.squeeze())


_original_patch_lang_tensor = interpreter._patch_lang_tensor


def _patch_lang_tensor_with_scalar_index(tensor, *scope):
    _original_patch_lang_tensor(tensor, *scope)
    tensor.__index__ = _scalar_index   # undone by _language_restored


_original_cast_impl = interpreter.InterpreterBuilder.cast_impl
_FLOATS = (tl.float16, tl.float32, tl.float64)


def _cast_rounding_to_nearest(builder, src, dst_type):
    # The interpreter holds bfloat16 as its uint16 bit patterns.
    if dst_type.scalar == tl.bfloat16 and src.dtype.scalar in _FLOATS:
        rounded = torch.from_numpy(np.ascontiguousarray(src.data)).to(torch.bfloat16)
        return interpreter.TensorHandle(rounded.view(torch.int16).numpy().view(np.uint16), dst_type.scalar)
    return _original_cast_impl(builder, src, dst_type)


@contextlib.contextmanager
def interpreting():
    with _lock, _language_restored():
        if TRITON_VERSION < (3, 7):
            interpreter._patch_lang_tensor = _patch_lang_tensor_with_scalar_index
        interpreter.InterpreterBuilder.cast_impl = _cast_rounding_to_nearest
        # Patch the language once for the whole launch. InterpretedFunction.__call__ (a
        # helper called from a kernel) would patch it again on every call and, even on
        # Triton >= 3.6, not undo it; helpers therefore run their rewritten source directly.
        _patch_lang(_language_modules())
        original_call = JITFunction.__call__
        JITFunction.__call__ = lambda self, *args, **kwargs: interpreted(self.fn).rewrite()(*args, **kwargs)
        try:
            yield
        finally:
            JITFunction.__call__ = original_call
            interpreter._patch_lang_tensor = _original_patch_lang_tensor
            interpreter.InterpreterBuilder.cast_impl = _original_cast_impl


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


def _scratch(size, alignment, stream):
    return torch.empty(size, dtype=torch.int8, device="cuda")


def _ensure_allocator():
    """Kernels that build tensor descriptors on the device (the forward with TMA) need global
    scratch for them, which Triton takes from ``triton.set_allocator``: ours (torch's caching
    allocator) unless the user set one. Triton >= 3.5 keeps it in a ContextVar, 3.4 in a global."""
    from triton.runtime import _allocation
    current = _allocation._allocator.get() if hasattr(_allocation._allocator, "get") else _allocation._allocator
    if isinstance(current, _allocation.NullAllocator):
        triton.set_allocator(_scratch)


def launch(kernel, grid, args, constants, reference: torch.Tensor, in_place=False):
    """Run ``kernel`` over ``grid`` with positional ``args`` and constexpr ``constants``.

    On CPU: interpreted, with the fixed block sizes of ``autotune.cpu_config``.
    On GPU: its autotuned wrapper picks them; ``in_place`` launches (outputs that
    are also inputs) have their outputs restored between autotuning trials.
    ``grid`` may be a function of the tunables, as in Triton; it is checked
    against CUDA's limits on either device.
    """
    shape = (lambda meta: check_grid(grid(meta))) if callable(grid) else (lambda meta: check_grid(grid))
    if uses_interpreter(reference):
        meta = {**constants, **cpu_config(kernel)}
        with interpreting():
            interpreted(kernel.fn)[shape(meta)](*args, **meta)
    else:
        if constants.get("TMA"):
            _ensure_allocator()
        with torch.cuda.device(reference.device):
            tuned(kernel, bool(in_place))[shape](*args, **constants)
