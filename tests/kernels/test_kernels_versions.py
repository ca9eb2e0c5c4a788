"""The CPU dispatch (kernels/launcher.py) on every supported Triton release.

Triton's interpreter differs between releases; these tests pin down the two
differences ``launcher`` handles. CI runs this file with the newest supported
torch/triton pair and with the oldest (docs/supported-versions.md).
"""
import inspect

import torch
import triton
import triton.language as tl
from triton.runtime import interpreter
from triton.runtime.jit import JITFunction

from cpattn.kernels import launcher


@triton.jit
def _position(start):
    # A helper called from the kernel: it reaches the interpreter through JITFunction.__call__.
    return start


@triton.jit
def _write_range(out_ptr, n, STEP: tl.constexpr):
    lo = tl.program_id(0) * n  # computed loop bounds are interpreter tensors, not Python ints
    for start in range(lo, lo + n, STEP):
        tl.store(out_ptr + start, _position(start))


def _run_on_cpu(programs, n, step):
    out = torch.full((programs * n,), -1, dtype=torch.int32)
    with launcher.interpreting():
        launcher.interpreted(_write_range.fn)[(programs,)](out, n, STEP=step)
    return out


def test_loop_with_computed_bounds_runs_in_the_interpreter():
    # Triton < 3.7 with numpy >= 2.4 failed here ("only 0-dimensional arrays can be
    # converted to Python scalars"): it turned the bounds into ints with int(array).
    out = _run_on_cpu(programs=3, n=5, step=2)
    assert out.tolist() == [j if j % 5 % 2 == 0 else -1 for j in range(15)]


def test_interpreted_launch_leaves_triton_language_as_it_was():
    # Triton < 3.6 never undoes its patches of triton.language, and even later releases
    # leave those made for helper calls in place; either breaks later GPU compiles.
    before = [(obj, dict(vars(obj))) for obj in launcher.language_objects()]
    call, patch_tensor = JITFunction.__call__, interpreter._patch_lang_tensor
    _run_on_cpu(programs=2, n=4, step=1)
    for obj, attributes in before:
        now = vars(obj)
        changed = sorted(name for name, value in attributes.items() if now.get(name) is not value)
        assert not changed, f"{obj!r} still patched after the launch: {changed}"
        if inspect.isclass(obj):
            assert set(now) <= set(attributes), f"{obj!r} gained {sorted(set(now) - set(attributes))}"
    assert JITFunction.__call__ is call
    assert interpreter._patch_lang_tensor is patch_tensor
