"""The compile gate's full sweep: every kernel, every kept autotune config, compiled for sm_80 and sm_90.

No GPU is needed: ``aot.py`` (beside this script) runs Triton's compiler and the ptxas in the
triton wheel, then reads registers, spills, shared memory and the tensor-core
instructions from the cubin. This script compiles the whole grid (about a
thousand cases, 1 to 3 s each on one core), prints the table and writes the
results cache that ``tests/kernels/test_kernels_compile_gate.py`` checks in CI:
``bench/results/aot/triton-<version>.json``. Rerun it after changing a kernel,
a jit helper or a config list; cases whose key (kernel source, specialization,
config, target, Triton version) is already in the cache are not recompiled.

    python bench/aot_gate.py                    # the grid: compile what the cache lacks, print, save
    python bench/aot_gate.py --jobs 2 --fresh   # recompile everything on two processes
    python bench/aot_gate.py --kernels _fwd_kernel --head-dims 128 192/128 --no-save   # 192/128: q/k 192, v 128

Exits 1 when a case fails the gate (spills, too much shared memory, an
estimate below what a kernel uses, a dot off wgmma on sm_90).
"""
import argparse
import concurrent.futures
import multiprocessing
import sys
import time
from pathlib import Path

import aot  # bench/aot.py: a script's own folder is on sys.path

CACHE_DIR = Path(__file__).resolve().parent / "results" / "aot"
COLUMNS = ("kernel", "variant", "target", "dtype", "head_dim", "head_dim_v", "config", "regs", "spill_bytes", "smem",
           "smem_estimate", "hgmma", "hmma", "loop_utmaldg", "main_loop_instrs", "main_loop_wgmma", "non_mma_per_wgmma")


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    choices = {"variants": tuple(aot.VARIANTS), "targets": tuple(aot.TARGETS), "dtypes": tuple(aot.DTYPES),
               "kernels": aot.KERNELS}
    for name, values in choices.items():
        parser.add_argument(f"--{name}", nargs="+", choices=values, default=list(values))
    parser.add_argument("--head-dims", nargs="+", type=_head_dims, default=list(aot.HEAD_DIMS),
                        help="head dims: 64, or q/k and v apart: 192/128 (default: the grid's)")
    parser.add_argument("--jobs", type=int, default=1, help="compiler processes (default 1)")
    parser.add_argument("--fresh", action="store_true", help="recompile cases that are in the cache")
    parser.add_argument("--no-save", action="store_true", help="do not write the cache")
    return parser.parse_args(argv)


def _head_dims(text):
    """"64" -> 64, "192/128" -> (192, 128): a grid entry of aot.HEAD_DIMS."""
    try:
        dims = tuple(int(part) for part in text.split("/"))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a head dim or q/v head dims like 192/128, got {text!r}") from None
    if len(dims) > 2:
        raise argparse.ArgumentTypeError(f"expected a head dim or q/v head dims like 192/128, got {text!r}")
    return dims[0] if len(dims) == 1 or dims[0] == dims[1] else dims


_TODO = []  # the cases to compile; forked workers inherit it (a Case holds a JITFunction: not picklable)


def _compile(index):
    return aot.compile_case(_TODO[index])


def sweep(case_list, cache, fresh, jobs, checkpoint=None):
    """A row per case, in order: cached rows as they are, the others compiled (``jobs`` processes);
    ``checkpoint(compiled rows)`` every 50 compiles, so that an interrupted sweep keeps its work."""
    todo = _TODO[:] = [c for c in case_list if fresh or c.key not in cache]
    print(f"{len(case_list)} cases, {len(case_list) - len(todo)} cached, {len(todo)} to compile", flush=True)
    compiled, start = {}, time.perf_counter()
    fork = multiprocessing.get_context("fork")
    with concurrent.futures.ProcessPoolExecutor(max(1, jobs), mp_context=fork) as pool:
        for i, (case, row) in enumerate(zip(todo, pool.map(_compile, range(len(todo)))), 1):
            compiled[case.key] = row
            flag = "; ".join(aot.problems(row)) or "ok"
            print(f"[{i}/{len(todo)} {time.perf_counter() - start:.0f}s] {case.label}: regs {row['regs']}, "
                  f"{flag}", flush=True)
            if checkpoint and i % 50 == 0:
                checkpoint(compiled)
    return [compiled.get(c.key) or aot.cached_row(c, cache) for c in case_list]


def print_table(rows):
    widths = {c: max(len(c), *(len(str(r.get(c))) for r in rows)) for c in COLUMNS}
    print("  ".join(c.ljust(widths[c]) for c in COLUMNS) + "  problems")
    for row in rows:
        print("  ".join(str(row.get(c)).ljust(widths[c]) for c in COLUMNS) + "  "
              + ("; ".join(aot.problems(row)) or "-"))


def main(argv=None):
    args = parse_args(argv)
    path = aot.cache_path(CACHE_DIR)
    cache = aot.load_cache(path)
    case_list = list(aot.cases(args.variants, args.targets, args.dtypes, tuple(args.head_dims), args.kernels))
    current = {c.key for c in aot.cases()}

    def save(compiled):
        # Rows of this run and of earlier partial runs, but none of a case that no longer exists.
        merged = {key: row for key, row in {**cache, **compiled}.items() if key in current}
        path.parent.mkdir(parents=True, exist_ok=True)
        aot.save_cache(path, list(merged.values()))
        return len(merged)

    rows = sweep(case_list, cache, args.fresh, args.jobs, None if args.no_save else save)
    print_table(rows)
    failing = [r for r in rows if aot.problems(r)]
    print(f"\n{len(rows)} cases, {len(failing)} failing the gate")
    if not args.no_save:
        print(f"saved {save({r['key']: r for r in rows})} rows to {path}")
    return 1 if failing else 0


if __name__ == "__main__":
    sys.exit(main())
