"""Ahead-of-time compile of every kernel for a GPU that need not be present.

``triton.compile`` lowers a kernel to PTX and runs the ``ptxas`` shipped in the
triton wheel for any target, so a machine without a GPU can see what a GPU
would run. Each kernel is compiled as a real launch would compile it:

* the arguments are captured from small calls of the public kernel functions
  (``launch`` is replaced by a recorder; nothing runs), so the signatures can
  never drift from the code;
* Triton's own binder turns them into the specialization a launch gets on a
  GPU (argument types, 16-byte divisibility, integers equal to 1 as constants);
* every autotune config that ``_autotune.keep_configs`` keeps for the case
  (target, dtype, head dim) is compiled.

The cubin is then read with ``cuobjdump`` (also in the wheel): registers per
thread, stack (our kernels have no local arrays and no calls, so any stack
frame holds spilled registers), static shared memory, and the tensor-core
instructions in the SASS: HGMMA is Hopper's warpgroup MMA (wgmma), HMMA the
warp-level mma.sync every target since Volta has.
"""
import contextlib
import dataclasses
import hashlib
import os
import re
import subprocess
import tempfile
import time
from unittest import mock

import torch
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource, make_backend
from triton.runtime.jit import create_function_from_signature

from . import _autotune, decode, flash_bwd, flash_fwd, merge


@dataclasses.dataclass(frozen=True)
class Target:
    name: str
    capability: int
    smem_limit: int  # CUDA's opt-in maximum of shared memory per block (static + dynamic), bytes


TARGETS = {"sm_80": Target("sm_80", 80, 163 * 1024), "sm_90": Target("sm_90", 90, 227 * 1024)}
DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16}
KERNELS = ("_fwd_kernel", "_bwd_preprocess", "_bwd_dkdv_kernel", "_bwd_dq_kernel", "_merge_kernel",
           "_decode_kernel", "_merge_splits_kernel")
# Kernels whose main loop multiplies tiles: on sm_90 every one of their dots must be a wgmma.
MMA_KERNELS = ("_fwd_kernel", "_bwd_dkdv_kernel", "_bwd_dq_kernel", "_decode_kernel")
# The gate's grid: head dims 64 and 128 for every kernel, 256 for the forward too.
HEAD_DIMS = {name: (64, 128, 256) if name == "_fwd_kernel" else (64, 128) for name in KERNELS}

_KERNEL_MODULES = (flash_fwd, flash_bwd, merge, decode)
_BIN = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin")


@dataclasses.dataclass
class Launch:
    kernel: object  # the JITFunction
    args: tuple
    constants: dict


def capture(dtype, head_dim):
    """{kernel name: Launch} from small causal calls that launch every kernel once (nothing runs).

    Shapes keep every integer that varies in real use above 1 (batch, heads, GQA
    group), so Triton does not fold it into a constant a real launch would not have."""
    launches = {}

    def record(kernel, grid, args, constants, reference, in_place=False):
        launches[kernel.fn.__name__] = Launch(kernel, tuple(args), dict(constants))

    with contextlib.ExitStack() as stack:
        for module in _KERNEL_MODULES:
            stack.enter_context(mock.patch.object(module, "launch", record))
        q = torch.empty(2, 128, 4, head_dim, dtype=dtype)
        k, v = (torch.empty(2, 128, 2, head_dim, dtype=dtype) for _ in range(2))
        out, lse = flash_fwd.attention_forward(q, k, v, causal=True)
        flash_bwd.attention_backward(out, q, k, v, out, lse, causal=True)
        merge.merge_attention(out, lse, out, lse)
        pages = torch.empty(16, 16, 2, head_dim, dtype=dtype)  # 16 pages of 16 slots
        table = torch.arange(16, dtype=torch.int32).view(2, 8)
        lengths = torch.tensor([100, 120], dtype=torch.int32)
        decode.decode_attention(q[:, :1], pages, pages, lengths, block_table=table, num_splits=2,
                                max_seqlen=128, validate=False, out_dtype=torch.float32)
    missing = set(KERNELS) - set(launches)
    if missing:
        raise RuntimeError(f"aot.capture: the calls launched no {sorted(missing)}")
    return launches


def config_name(config):
    """'BLOCK_M=128 BLOCK_N=64 w4 s3': a config as the tables print it."""
    blocks = " ".join(f"{k}={v}" for k, v in sorted(config.kwargs.items()))
    return f"{blocks} w{config.num_warps} s{config.num_stages}"


@dataclasses.dataclass
class Case:
    """One compile: a kernel's launch with one config, for one target."""
    kernel_name: str
    target: Target
    dtype: str
    head_dim: int
    block_d: int
    config: triton.Config
    source: ASTSource
    options: dict

    @property
    def key(self):
        """What decides the binary: Triton's version, the kernel source with everything it calls
        (``ASTSource.hash``), the specialization, the target and the compile options."""
        text = f"{triton.__version__}|{self.source.hash()}|{self.target.name}|{sorted(self.options.items())}"
        return hashlib.sha256(text.encode()).hexdigest()[:24]

    def label(self):
        return f"{self.kernel_name} {self.target.name} {self.dtype} D={self.head_dim} {config_name(self.config)}"


def _bind(launch, config, target):
    """ASTSource and options exactly as a launch with ``config`` on ``target`` would build them."""
    backend = make_backend(GPUTarget("cuda", target.capability, 32))
    kernel = launch.kernel
    binder = create_function_from_signature(kernel.signature, kernel.params, backend)
    kwargs = {**launch.constants, **config.all_kwargs()}
    bound, specialization, options = binder(*launch.args, **kwargs)
    options, signature, constexprs, attrs = kernel._pack_args(backend, kwargs, bound, specialization, options)
    return ASTSource(kernel, signature, constexprs, attrs), options.__dict__


def cases(targets=tuple(TARGETS), dtypes=tuple(DTYPES), head_dims=HEAD_DIMS, kernels=KERNELS):
    """Every Case of the grid: each kernel, target, dtype, head dim in ``head_dims[kernel]``, kept config."""
    for dtype in dtypes:
        for head_dim in sorted({d for name in kernels for d in head_dims[name]}):
            launches = capture(DTYPES[dtype], head_dim)
            for name in kernels:
                if head_dim not in head_dims[name]:
                    continue
                launch = launches[name]
                for target_name in targets:
                    target = TARGETS[target_name]
                    for config in _autotune.keep_configs(launch.kernel, launch.args, launch.constants,
                                                         capability=target.capability,
                                                         smem_limit=target.smem_limit):
                        source, options = _bind(launch, config, target)
                        yield Case(name, target, dtype, head_dim, launch.constants["BLOCK_D"], config, source, options)


def _tool(name, *args):
    return subprocess.run([os.path.join(_BIN, name), *args], check=True, capture_output=True, text=True).stdout


def _cubin_facts(cubin):
    """(registers, stack bytes, static shared bytes, HGMMA count, HMMA count) of a cubin."""
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(cubin)
        f.flush()
        usage = _tool("cuobjdump", "-res-usage", f.name)
        sass = _tool("cuobjdump", "-sass", f.name)
    fields = dict(re.findall(r"\b(REG|STACK|SHARED|LOCAL):(\d+)", usage))
    stack = int(fields["STACK"]) + int(fields["LOCAL"])
    return (int(fields["REG"]), stack, int(fields["SHARED"]),
            len(re.findall(r"\bHGMMA\.", sass)), len(re.findall(r"\bHMMA\.", sass)))


def compile_case(case):
    """Compile ``case`` and return its row: what the tables print and the gate checks."""
    start = time.perf_counter()
    compiled = triton.compile(case.source, target=GPUTarget("cuda", case.target.capability, 32),
                              options=case.options)
    seconds = time.perf_counter() - start
    regs, spill, static_smem, hgmma, hmma = _cubin_facts(compiled.asm["cubin"])
    smem = compiled.metadata.shared + static_smem
    return {"key": case.key, "kernel": case.kernel_name, "target": case.target.name, "dtype": case.dtype,
            "head_dim": case.head_dim, "config": config_name(case.config), "regs": regs, "spill_bytes": spill,
            "smem": smem, "smem_limit": case.target.smem_limit, "hgmma": hgmma, "hmma": hmma,
            "smem_estimate": _autotune.smem_estimate(case.kernel_name, case.config, case.block_d,
                                                     DTYPES[case.dtype].itemsize, case.target.capability),
            "compile_s": round(seconds, 2), "triton": triton.__version__}


def problems(row):
    """What is wrong with a compiled case (empty: it passes the gate)."""
    found = []
    if row["spill_bytes"]:
        found.append(f"spills {row['spill_bytes']} B per thread to local memory")
    if row["smem"] > row["smem_limit"]:
        found.append(f"needs {row['smem']} B shared memory, the target allows {row['smem_limit']}")
    if row["smem_estimate"] < row["smem"]:
        found.append(f"prune estimate {row['smem_estimate']} B is below the {row['smem']} B it uses")
    if row["target"] == "sm_90" and row["kernel"] in MMA_KERNELS and (row["hgmma"] == 0 or row["hmma"] > 0):
        found.append(f"sm_90 SASS has {row['hgmma']} HGMMA and {row['hmma']} HMMA: not every dot is a wgmma")
    return found
