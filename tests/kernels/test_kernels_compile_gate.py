"""The compile gate: every kernel with every autotune config it keeps compiles for sm_80 and sm_90,
spills no register, fits in shared memory, and on sm_90 runs its forward and backward dots on wgmma.

No GPU is needed (``bench/aot.py``: Triton's compiler and the ptxas in the triton wheel). The
grid (``aot.VARIANTS`` x fp16/bf16 x head dims 64/128/256 and the (q/k, v) pairs (192, 128) and
(128, 64) x 7 kernels x 2 targets x each kept config, and the latent decode at MLA's (576, 512): 1396
compiles) takes 20 to 30 minutes on two
cores, so its rows are cached in ``bench/results/aot/triton-<version>.json`` by
``python bench/aot_gate.py``. A row counts only for
the exact binary it describes (its key hashes the kernel source with every helper it calls, the
specialization, the config, the target and the Triton version): after an edit the stale cases are
compiled here, a few dozen at most; more than that fails and asks for the sweep. A fresh compile
of a sample checks that the cached rows are what the compiler gives.
"""
import functools
import sys
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parents[2] / "bench"
sys.path.insert(0, str(BENCH))  # the compile-gate tool lives beside its script, outside the installed package
try:
    import aot
finally:
    sys.path.remove(str(BENCH))

CACHE = aot.cache_path(BENCH / "results" / "aot")
MAX_UNCACHED = 40  # compiles this test may do itself (about 2 s each)

pytestmark = pytest.mark.skipif(not (aot.BIN_DIR / "ptxas").is_file(), reason="this triton wheel has no ptxas")


@functools.lru_cache(maxsize=None)
def grid():
    return tuple(aot.cases())


def test_the_grid_covers_every_kernel_target_dtype_and_head_dim():
    seen = {(c.kernel, c.target.name, c.dtype, (c.head_dim, c.value_dim)) for c in grid()}
    expected = {(k, t, d, aot.head_dim_pair(h)) for k in aot.KERNELS for t in aot.TARGETS for d in aot.DTYPES
                for h in aot.HEAD_DIMS}
    latent_only = {("_decode_kernel", t, d, p) for t in aot.TARGETS for d in aot.DTYPES for p in aot.LATENT_HEAD_DIMS}
    assert seen == expected | latent_only and (576, 512) in aot.LATENT_HEAD_DIMS
    # The latent decode (v the keys' first columns) at every pair of head dims, MLA's (576, 512) included.
    latent = {(c.target.name, c.dtype, c.head_dim, c.value_dim) for c in grid() if c.variant == "latent"}
    pairs = [aot.head_dim_pair(h) for h in aot.HEAD_DIMS if not isinstance(h, int)] + list(aot.LATENT_HEAD_DIMS)
    assert latent == {(t, d, *p) for t in aot.TARGETS for d in aot.DTYPES for p in pairs}


def test_the_forward_reads_through_tensor_descriptors_where_it_can():
    """On sm_90 the TMA variants' forwards take tensor descriptors wherever every head dim fills its tile
    (not at 192, padded to 256: a descriptor would read the next head's columns); the gate then checks
    that their loops issue TMA loads."""
    for c in grid():
        if c.kernel == "_fwd_kernel" and c.target.name == "sm_90" and c.variant in aot.TMA_VARIANTS:
            assert c.tma == (c.head_dim in (64, 128, 256) and c.value_dim in (64, 128, 256)), c.label


def test_every_case_passes_the_gate():
    cases, cache = grid(), aot.load_cache(CACHE)
    stale = [c for c in cases if c.key not in cache]
    assert len(stale) <= MAX_UNCACHED, (
        f"{len(stale)} of {len(cases)} compile cases are not in {CACHE} (a kernel, a helper, a config or "
        f"Triton changed, e.g. {stale[0].label}): run `python bench/aot_gate.py --jobs 2` and commit the cache")
    rows = aot.results(cases, cache)
    failing = [f"{case.label}: {'; '.join(aot.problems(row))}" for case, row in zip(cases, rows)
               if aot.problems(row)]
    assert not failing, f"{len(failing)} cases fail the gate:\n" + "\n".join(failing)


def _sample():
    """One case per (kernel, target): the plain causal variant, fp16, head dim 128, the first config kept."""
    picked = {}
    for case in grid():
        if case.variant == "causal" and case.dtype == "fp16" and case.head_dim == 128:
            picked.setdefault((case.kernel, case.target.name), case)
    return list(picked.values())


FACTS = ("regs", "spill_bytes", "smem", "hgmma", "hmma")


@pytest.mark.parametrize("case", _sample(), ids=lambda c: c.label.replace(" ", "-"))
def test_cached_rows_match_a_fresh_compile(case):
    row = aot.compile_case(case)
    assert not aot.problems(row), aot.problems(row)
    cached = aot.load_cache(CACHE).get(case.key)
    if cached is not None:  # stale cases are compiled by the test above
        assert {f: cached[f] for f in FACTS} == {f: row[f] for f in FACTS}
