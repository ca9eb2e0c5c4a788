"""Ahead-of-time compile of every kernel for a GPU that need not be present: the compile gate's
tool (``bench/aot_gate.py``, ``tests/kernels/test_kernels_compile_gate.py``), kept out of the installed package.

``triton.compile`` lowers a kernel to PTX and runs the ``ptxas`` shipped in the
triton wheel for any target, so a machine without a GPU can see what a GPU
would run. Each kernel is compiled as a real launch would compile it:

* the arguments are captured from small calls of the public kernel functions
  (``launch`` is replaced by a recorder; nothing runs), so the signatures can
  never drift from the code;
* Triton's own binder turns them into the specialization a launch gets on a
  GPU (argument types, 16-byte divisibility, integers equal to 1 as constants);
* every config that ``autotune.keep_configs`` keeps for the case (target,
  dtype, head dim) is compiled.

The cubin is then read with ``cuobjdump`` (also in the wheel): registers per
thread, stack (our kernels have no local arrays and no calls, so a stack frame
holds spilled registers), static shared memory, and the tensor-core
instructions in the SASS: HGMMA is Hopper's warpgroup MMA (wgmma), HMMA the
warp-level mma.sync of every target since Volta.

Each case is named by a hash of everything that decides its binary, so a cache
of results (``load_cache``/``save_cache``) stays valid until a kernel source,
a helper it calls, its specialization, the config or Triton changes.
"""
import contextlib
import dataclasses
import hashlib
import json
import os
import re
import subprocess
import tempfile
import time
from pathlib import Path
from unittest import mock

import torch
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource, make_backend
from triton.runtime.jit import create_function_from_signature, find_paths_if, get_iterable_path

from cpattn.kernels import autotune, decode, flash_bwd, flash_fwd, merge
from cpattn.kernels.mask import MaskSpec
from cpattn.kernels.tiles import tile_width


@dataclasses.dataclass(frozen=True)
class Target:
    name: str
    capability: int
    smem_limit: int  # CUDA's opt-in maximum of shared memory per block (static + dynamic), bytes


TARGETS = {"sm_80": Target("sm_80", 80, 163 * 1024), "sm_90": Target("sm_90", 90, 227 * 1024)}
DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16}
# Head dims: one for q, k, v alike, or a pair (q/k, v/out) such as MLA's (192, 128).
HEAD_DIMS = (64, 128, 256, (192, 128), (128, 64))
# Pairs only the latent decode runs at (no other kernel takes a head dim above 256): MLA's latent
# cache as DeepSeek serves it, a 576-wide vector per token whose first 512 entries are the value.
LATENT_HEAD_DIMS = ((576, 512),)
KERNELS = ("_fwd_kernel", "_bwd_preprocess", "_bwd_dkdv_kernel", "_bwd_dq_kernel", "_merge_kernel",
           "_decode_kernel", "_merge_splits_kernel")
# The main loops that must run on wgmma on sm_90: every dot of these kernels an HGMMA.
WGMMA_KERNELS = ("_fwd_kernel", "_bwd_dkdv_kernel", "_bwd_dq_kernel")
# Except: no dk/dv config with 64 key rows per warpgroup (wgmma's minimum) compiles
# without spilling at head-dim tiles of 256 (dk and dv alone fill the registers), so it runs
# mma.sync. Keyed by the wider head-dim tile (tiles.tile_width: 256 for (192, 128) too).
WGMMA_EXEMPT = {("_bwd_dkdv_kernel", 256)}
# The 5-GEMM backward's dq dot (ds @ k) has BLOCK_M query rows, fewer than wgmma's 64: it runs
# mma.sync beside the dk/dv kernel's own wgmma dots.
MMA_SYNC_ALLOWED = {("_bwd_dkdv_kernel", "atomic"), ("_bwd_dkdv_kernel", "atomic+local")}
# Variants whose forward reads through tensor descriptors on sm_90 (where tiles.tma_compatible holds:
# not at head dim 192, whose tiles are padded to 256): their loops must issue TMA loads.
TMA_VARIANTS = ("causal", "ring", "local", "full")
# Variants that exist only for a pair of head dims (q/k wider than v).
PAIR_VARIANTS = ("latent",)

_KERNEL_MODULES = (flash_fwd, flash_bwd, merge, decode)
BIN_DIR = Path(triton.__file__).parent / "backends" / "nvidia" / "bin"


# ---------------------------------------------------------------- capture

def _qkv(dtype, batch, seqlen, head_dim, value_dim):
    """q (4 heads), k (2 heads) of ``head_dim`` and v (2 heads) of ``value_dim``."""
    return (torch.empty(batch, seqlen, 4, head_dim, dtype=dtype), torch.empty(batch, seqlen, 2, head_dim, dtype=dtype),
            torch.empty(batch, seqlen, 2, value_dim, dtype=dtype))


def _causal_calls(dtype, head_dim, value_dim):
    """Single-device causal training (forward, delta, dq, dk/dv), a merge and a paged decode."""
    q, k, v = _qkv(dtype, 2, 128, head_dim, value_dim)
    out, lse = flash_fwd.attention_forward(q, k, v, causal=True)
    flash_bwd.attention_backward(out, q, k, v, out, lse, causal=True)
    merge.merge_attention(out, lse, out, lse)
    # Pages of 64 slots hold whole key tiles (one table entry per tile); "local" takes pages of 16,
    # smaller than the tiles (one entry per key).
    k_pages, v_pages = torch.empty(4, 64, 2, head_dim, dtype=dtype), torch.empty(4, 64, 2, value_dim, dtype=dtype)
    table = torch.arange(4, dtype=torch.int32).view(2, 2)
    lengths = torch.tensor([100, 120], dtype=torch.int32)
    decode.decode_attention(q[:, :1], k_pages, v_pages, lengths, block_table=table, num_splits=2,
                            max_seqlen=128, validate=False, out_dtype=torch.float32)


def _latent_calls(dtype, head_dim, value_dim):
    """The decode of "causal" over a latent cache (MLA): the values are the keys' first columns."""
    q = torch.empty(2, 1, 4, head_dim, dtype=dtype)
    pages = torch.empty(4, 64, 2, head_dim, dtype=dtype)
    table = torch.arange(4, dtype=torch.int32).view(2, 2)
    lengths = torch.tensor([100, 120], dtype=torch.int32)
    decode.decode_attention(q, pages, pages[..., :value_dim], lengths, block_table=table, num_splits=2,
                            max_seqlen=128, validate=False, out_dtype=torch.float32)


def _ring_calls(dtype, head_dim, value_dim):
    """A ring step: causal, this step's partials accumulated into fp32 running buffers."""
    q, k, v = _qkv(dtype, 2, 128, head_dim, value_dim)
    out = torch.empty((2, 128, 4, value_dim), dtype=torch.float32)
    lse = torch.empty(2, 4, 128)
    flash_fwd.attention_forward(q, k, v, causal=True, q_start=128, out=out, lse=lse, accumulate=True)
    dq, dk, dv = (torch.empty(t.shape, dtype=torch.float32) for t in (q, k, v))
    dout = torch.empty(out.shape, dtype=dtype)  # also the final out (the ring hands it over in the inputs' dtype)
    flash_bwd.attention_backward(dout, q, k, v, dout, lse, causal=True, q_start=128, delta=lse, dq=dq, dk=dk, dv=dv,
                                 accumulate=True)


def _local_mask():
    """Two packed documents (100 and 156 tokens) under a causal sliding window of 64."""
    cu = torch.tensor([0, 100, 256], dtype=torch.int32)
    starts = torch.zeros(2, dtype=torch.int32)
    return MaskSpec(causal=True, window_size=(64, 0), q_start=starts, k_start=starts,
                    cu_seqlens_q=cu, cu_seqlens_k=cu, max_seqlen_q=156, max_seqlen_k=156)


def _local_calls(dtype, head_dim, value_dim):
    """Every extra at once: packed documents, a sliding window, softcap and sinks (forward,
    backward and a paged decode)."""
    mask = _local_mask()
    q, k, v = _qkv(dtype, 1, 256, head_dim, value_dim)
    sinks = torch.empty(4)
    out, lse = flash_fwd.attention_forward(q, k, v, mask=mask, softcap=30.0, sinks=sinks)
    flash_bwd.attention_backward(out, q, k, v, out, lse, mask=mask, softcap=30.0)
    k_pages, v_pages = torch.empty(16, 16, 2, head_dim, dtype=dtype), torch.empty(16, 16, 2, value_dim, dtype=dtype)
    table = torch.arange(16, dtype=torch.int32).view(2, 8)
    lengths = torch.tensor([100, 120], dtype=torch.int32)
    decode.decode_attention(q[:, :2].expand(2, 2, 4, head_dim), k_pages, v_pages, lengths, block_table=table,
                            num_splits=2, max_seqlen=128, validate=False, out_dtype=torch.float32,
                            window_size=(64, 0), softcap=30.0, sinks=sinks)


def _full_calls(dtype, head_dim, value_dim):
    """Non-causal attention over whole key blocks: the forward's one-loop form (no EDGES), where
    its warp-specialized configs apply."""
    flash_fwd.attention_forward(*_qkv(dtype, 2, 256, head_dim, value_dim))


def _pointer_calls(dtype, head_dim, value_dim):
    """The causal forward with pointer loads (``CPATTN_FORWARD=pointers``), kept for comparison."""
    with mock.patch.dict(os.environ, {"CPATTN_FORWARD": "pointers"}):
        _causal_calls(dtype, head_dim, value_dim)


def _atomic_calls(dtype, head_dim, value_dim):
    """The causal backward's 5-GEMM form: dq added with atomics inside the dk/dv kernel."""
    q, k, v = _qkv(dtype, 2, 128, head_dim, value_dim)
    out = torch.empty((2, 128, 4, value_dim), dtype=dtype)
    lse = torch.empty(2, 4, 128)
    flash_bwd.attention_backward(out, q, k, v, out, lse, causal=True, delta=lse, atomic_dq=True)


def _atomic_local_calls(dtype, head_dim, value_dim):
    """The 5-GEMM dk/dv kernel with the extras of "local" (documents, window, softcap): the most
    registers its loop holds."""
    q, k, v = _qkv(dtype, 1, 256, head_dim, value_dim)
    out = torch.empty((1, 256, 4, value_dim), dtype=dtype)
    lse = torch.empty(1, 4, 256)
    flash_bwd.attention_backward(out, q, k, v, out, lse, mask=_local_mask(), softcap=30.0, delta=lse,
                                 atomic_dq=True)


# variant -> (the calls, the kernels whose code it specializes differently from "causal")
VARIANTS = {
    "causal": (_causal_calls, KERNELS),
    "ring": (_ring_calls, ("_fwd_kernel", "_bwd_dkdv_kernel", "_bwd_dq_kernel")),
    "local": (_local_calls, ("_fwd_kernel", "_bwd_dkdv_kernel", "_bwd_dq_kernel", "_decode_kernel")),
    "full": (_full_calls, ("_fwd_kernel",)),
    "pointers": (_pointer_calls, ("_fwd_kernel",)),
    "atomic": (_atomic_calls, ("_bwd_dkdv_kernel",)),
    "atomic+local": (_atomic_local_calls, ("_bwd_dkdv_kernel",)),
    "latent": (_latent_calls, ("_decode_kernel",)),
}


def head_dim_pair(head_dims):
    """(q/k head dim, v head dim) of a grid entry: an int (both alike) or a pair."""
    return (head_dims, head_dims) if isinstance(head_dims, int) else tuple(head_dims)


@dataclasses.dataclass
class Launch:
    kernel: object  # the JITFunction
    args: tuple
    constants: dict


def capture(variant, dtype, head_dims, target=None):
    """{kernel name: Launch} of the calls of ``variant`` (nothing runs) at ``head_dims`` (an int, or
    a (q/k, v) pair), with the choices the host makes for a GPU of ``target`` (tensor-descriptor
    loads from sm_90 on).

    Shapes keep every integer that varies in real use above 1 (batch, heads, GQA
    group), so Triton does not fold it into a constant a real launch would not have."""
    launches = {}

    def record(kernel, grid, args, constants, reference, in_place=False):
        launches[kernel.fn.__name__] = Launch(kernel, tuple(args), dict(constants))

    calls, kernels = VARIANTS[variant]
    capability = (target or TARGETS["sm_90"]).capability
    with contextlib.ExitStack() as stack:
        for module in _KERNEL_MODULES:
            stack.enter_context(mock.patch.object(module, "launch", record))
        stack.enter_context(mock.patch.object(flash_fwd, "use_tma",
                                              lambda device: flash_fwd.tma_target(capability)))
        calls(dtype, *head_dim_pair(head_dims))
    missing = set(kernels) - set(launches)
    if missing:
        raise RuntimeError(f"aot.capture: the {variant!r} calls launched no {sorted(missing)}")
    return {name: launches[name] for name in kernels}


# ---------------------------------------------------------------- cases

def config_name(config):
    """'BLOCK_M=128 BLOCK_N=64 w8 s3': a config as the tables print it."""
    blocks = " ".join(f"{k}={v}" for k, v in sorted(config.kwargs.items()))
    return f"{blocks} w{config.num_warps} s{config.num_stages}"


@dataclasses.dataclass
class Case:
    """One compile: a kernel's launch with one config, for one target."""
    kernel: str
    variant: str
    target: Target
    dtype: str
    head_dim: int
    value_dim: int
    config: triton.Config
    source: ASTSource
    options: dict
    smem_estimate: int
    tma: bool = False  # the launch reads through tensor descriptors (a forward where tma_compatible holds)

    @property
    def key(self):
        """What decides the binary: Triton's version, the kernel source with everything it calls
        (``ASTSource.hash``: source, specialization, constants), the target and the options, the
        libraries among them by file name (their folder is wherever Triton is installed)."""
        options = {**self.options, "extern_libs": tuple((name, os.path.basename(path))
                                                        for name, path in self.options.get("extern_libs") or ())}
        text = f"{triton.__version__}|{self.source.hash()}|{self.target.name}|{sorted(options.items())}"
        return hashlib.sha256(text.encode()).hexdigest()[:24]

    @property
    def label(self):
        dims = self.head_dim if self.head_dim == self.value_dim else f"{self.head_dim}/{self.value_dim}"
        return f"{self.kernel} [{self.variant}] {self.target.name} {self.dtype} D={dims} {config_name(self.config)}"


def _bind(launch, config, target):
    """ASTSource and options exactly as a launch with ``config`` on ``target`` would build them."""
    backend = make_backend(GPUTarget("cuda", target.capability, 32))
    kernel = launch.kernel
    binder = create_function_from_signature(kernel.signature, kernel.params, backend)
    kwargs = {**launch.constants, **config.all_kwargs()}
    bound, specialization, options = binder(*launch.args, **kwargs)
    options, signature, constexprs, attrs = _pack(kernel, backend, kwargs, bound, specialization, options)
    return ASTSource(kernel, signature, constexprs, attrs), options.__dict__


def _pack(kernel, backend, kwargs, bound, specialization, options):
    """(options, signature, constexprs, attrs) as ``JITFunction.run`` derives them: its ``_pack_args``
    where Triton has one, else the same steps, which older releases (3.4) write inline in ``run``."""
    if hasattr(kernel, "_pack_args"):
        return kernel._pack_args(backend, kwargs, bound, specialization, options)
    options = backend.parse_options(kwargs)
    sigvals = [kind for kind, _ in specialization]
    signature = {param.name: kind for param, kind in zip(kernel.params, sigvals)}
    constexprs = {path: get_iterable_path(list(bound.values()), path)
                  for path in find_paths_if(sigvals, lambda _, kind: kind == "constexpr")}
    attrvals = [attr for _, attr in specialization]
    attrs = {path: backend.parse_attr(get_iterable_path(attrvals, path))
             for path in find_paths_if(attrvals, lambda _, attr: isinstance(attr, str))}
    return options, signature, constexprs, attrs


def cases(variants=tuple(VARIANTS), targets=tuple(TARGETS), dtypes=tuple(DTYPES), head_dims=HEAD_DIMS,
          kernels=KERNELS, latent_head_dims=LATENT_HEAD_DIMS):
    """Every Case of the grid: variant, dtype, head dim, kernel, target, each config kept for it
    (``latent_head_dims``: the pairs only the latent variant runs at)."""
    for variant in variants:
        for dtype in dtypes:
            for dims in tuple(head_dims) + (tuple(latent_head_dims) if variant in PAIR_VARIANTS else ()):
                head_dim, value_dim = head_dim_pair(dims)
                if variant in PAIR_VARIANTS and head_dim == value_dim:
                    continue
                for target in (TARGETS[t] for t in targets):
                    for name, launch in capture(variant, DTYPES[dtype], dims, target).items():
                        if name not in kernels:
                            continue
                        block_d, elem_bytes = launch.constants["BLOCK_D"], DTYPES[dtype].itemsize
                        for config in autotune.keep_configs(name, block_d, elem_bytes, target.capability,
                                                             target.smem_limit, launch.constants):
                            source, options = _bind(launch, config, target)
                            yield Case(name, variant, target, dtype, head_dim, value_dim, config, source, options,
                                       autotune.smem_estimate(name, config, block_d, elem_bytes,
                                                               launch.constants),
                                       bool(launch.constants.get("TMA")))


# ---------------------------------------------------------------- compile and read the cubin

_SASS_INSTRUCTION = re.compile(r"/\*([0-9a-f]{4,})\*/\s+([^;]*);")
_HGMMA_SHAPE = re.compile(r"\bHGMMA\.64x(\d+)x(\d+)")


def loop_facts(sass):
    """What the SASS of one kernel does in its loops (a loop: the instructions from a backward
    branch's target to the branch).

    ``loop_utmaldg``: TMA loads (UTMALDG) inside any loop; the main loop is the loop with
    wgmma (HGMMA) that spends the fewest other instructions per unit of MMA work, i.e. the
    unmasked loop of the forward, dq and dk/dv kernels (their masked loops add the mask);
    ``main_loop_instrs``: its instructions; ``main_loop_wgmma``: its MMA work in units of one
    64x128x16 wgmma (an m64nNkK HGMMA counts N/128 * K/16); ``non_mma_per_wgmma``: its
    instructions other than HGMMA per unit. None where the kernel has no such loop."""
    code = [(int(addr, 16), text.strip()) for addr, text in _SASS_INSTRUCTION.findall(sass)]
    loops = []
    for addr, text in code:
        branch = re.search(r"\bBRA(?:\.\w+)*\s+0x([0-9a-f]+)", text)
        if branch and int(branch.group(1), 16) < addr:
            loops.append((int(branch.group(1), 16), addr))
    facts = {"loop_utmaldg": 0, "main_loop_instrs": None, "main_loop_wgmma": None, "non_mma_per_wgmma": None}
    in_loop = {addr for addr, _ in code if any(lo <= addr <= hi for lo, hi in loops)}
    facts["loop_utmaldg"] = sum(1 for addr, text in code if addr in in_loop and "UTMALDG" in text)
    best = None
    for lo, hi in loops:
        body = [text for addr, text in code if lo <= addr <= hi]
        work = sum(int(n) / 128 * int(k) / 16 for n, k in (_HGMMA_SHAPE.search(t).groups() for t in body
                                                              if _HGMMA_SHAPE.search(t)))
        if work:
            other = sum(1 for t in body if "HGMMA" not in t)
            if best is None or other / work < best[2] / best[1]:
                best = (len(body), work, other)
    if best:
        facts.update(main_loop_instrs=best[0], main_loop_wgmma=round(best[1], 2),
                     non_mma_per_wgmma=round(best[2] / best[1], 1))
    return facts


def _cubin_facts(cubin):
    """(registers, stack bytes, static shared bytes, HGMMA count, HMMA count, loop facts) of a cubin."""
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "kernel.cubin")
        Path(path).write_bytes(cubin)
        cuobjdump = str(BIN_DIR / "cuobjdump")
        usage = subprocess.run([cuobjdump, "-res-usage", path], check=True, capture_output=True, text=True).stdout
        sass = subprocess.run([cuobjdump, "-sass", path], check=True, capture_output=True, text=True).stdout
    fields = {k: int(v) for k, v in re.findall(r"\b(REG|STACK|SHARED|LOCAL):(\d+)", usage)}
    return (fields["REG"], fields["STACK"] + fields["LOCAL"], fields["SHARED"],
            len(re.findall(r"\bHGMMA\.", sass)), len(re.findall(r"\bHMMA\.", sass)), loop_facts(sass))


def compile_case(case):
    """Compile ``case`` and return its row. Triton's on-disk cache is neither read (the
    compiler really runs) nor filled (hundreds of binaries no GPU here will load)."""
    start = time.perf_counter()
    with tempfile.TemporaryDirectory() as scratch, triton.knobs.cache.scope():
        triton.knobs.cache.dir = scratch
        compiled = triton.compile(case.source, target=GPUTarget("cuda", case.target.capability, 32),
                                  options=case.options)
    seconds = time.perf_counter() - start
    regs, spill, static_smem, hgmma, hmma, loops = _cubin_facts(compiled.asm["cubin"])
    return {"key": case.key, "kernel": case.kernel, "variant": case.variant, "target": case.target.name,
            "dtype": case.dtype, "head_dim": case.head_dim, "head_dim_v": case.value_dim, "tma": case.tma,
            "config": config_name(case.config),
            "regs": regs, "spill_bytes": spill, "smem": compiled.metadata.shared + static_smem,
            "smem_limit": case.target.smem_limit, "smem_estimate": case.smem_estimate,
            "hgmma": hgmma, "hmma": hmma, **loops, "warps": compiled.metadata.num_warps,
            "compile_s": round(seconds, 2), "triton": triton.__version__}


def problems(row):
    """What is wrong with a compiled case (empty: it passes the gate)."""
    found = []
    if row["spill_bytes"]:
        found.append(f"spills {row['spill_bytes']} B per thread to local memory")
    if row["smem"] > row["smem_limit"]:
        found.append(f"needs {row['smem']} B of shared memory, the target allows {row['smem_limit']}")
    if row["smem_estimate"] < row["smem"]:
        found.append(f"the prune's estimate {row['smem_estimate']} B is below the {row['smem']} B it uses")
    width = tile_width(row["head_dim"], row.get("head_dim_v", row["head_dim"]))
    wgmma = row["kernel"] in WGMMA_KERNELS and (row["kernel"], width) not in WGMMA_EXEMPT
    mma_sync = row["hmma"] > 0 and (row["kernel"], row["variant"]) not in MMA_SYNC_ALLOWED
    if row["target"] == "sm_90" and wgmma and (row["hgmma"] == 0 or mma_sync):
        found.append(f"sm_90 SASS has {row['hgmma']} HGMMA and {row['hmma']} HMMA: not every dot is a wgmma")
    if row["target"] == "sm_90" and wgmma and not row.get("main_loop_wgmma"):
        found.append("sm_90 SASS has no loop with wgmma (HGMMA): the main loop's dots are elsewhere")
    if (row["target"] == "sm_90" and row["kernel"] == "_fwd_kernel" and row.get("tma", row["variant"] in TMA_VARIANTS)
            and not row.get("loop_utmaldg")):
        found.append("sm_90 forward issues no TMA load (UTMALDG) in its loops")
    return found


# ---------------------------------------------------------------- results cache

def cache_path(directory):
    """The results cache of this Triton version in ``directory`` (keys name the version anyway:
    one file per version keeps each CI leg's cache whole)."""
    return Path(directory) / f"triton-{triton.__version__}.json"


def load_cache(path):
    """{case key: row} from a JSON file written by ``save_cache`` (empty if there is none)."""
    path = Path(path)
    return {row["key"]: row for row in json.loads(path.read_text())["rows"]} if path.exists() else {}


def save_cache(path, rows):
    """Write ``rows`` (compiled cases) as the cache, sorted so that diffs stay readable."""
    order = lambda r: (r["kernel"], r["variant"], r["target"], r["dtype"], r["head_dim"],  # noqa: E731
                       r.get("head_dim_v", r["head_dim"]), r["config"])
    payload = {"triton": triton.__version__, "rows": sorted(rows, key=order)}
    Path(path).write_text(json.dumps(payload, indent=0) + "\n")


def cached_row(case, cache):
    """``case``'s row in ``cache`` (None if absent), with the prune's shared-memory estimate of today's
    ``autotune``: the estimate is host arithmetic, not part of the binary, so a row keeps its key
    when only the estimate changes and is checked against the current one."""
    row = cache.get(case.key)
    return None if row is None else {**row, "smem_estimate": case.smem_estimate}


def results(case_list, cache, fresh=False, on_row=None):
    """A row for every case: from ``cache`` where its key is there (unless ``fresh``), else compiled.
    ``on_row(i, case, row, compiled)`` is called after each."""
    rows = []
    for i, case in enumerate(case_list, 1):
        row = None if fresh else cached_row(case, cache)
        compiled = row is None
        if compiled:
            row = compile_case(case)
        rows.append(row)
        if on_row:
            on_row(i, case, row, compiled)
    return rows
