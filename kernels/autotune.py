"""Every kernel's tunables in one place: its ``triton.Config`` lists for GPUs,
their pruning, its autotune key, and the fixed block sizes the CPU interpreter uses.

``tuned(kernel, in_place)`` gives the autotuned wrapper ``launch`` runs on a GPU.
Only launches that read what they write (``in_place``: an accumulating forward or
backward, an in-place merge) need the autotuner to restore their outputs between
trials; every other launch overwrites its outputs, so cloning them would only
cost time inside the timed region.

Configs depend on the GPU family and the head dim. Each list below holds the
configs that the compile gate (bench/aot.py: bench/aot_gate.py sweeps it,
tests/kernels/test_kernels_compile_gate.py checks it, for sm_80 and sm_90, fp16 and bf16, head
dims 64, 128 and 256 and the (q/k, v) pairs (192, 128) and (128, 64)) found to
compile without spilling registers and within shared memory on every Triton release it ran on (3.4.0, the oldest supported,
and 3.9.0: ptxas allocates registers differently between them, so a config
clean on one can spill on the other); on sm_90 the forward and backward configs
also keep every dot on wgmma (BLOCK_M of at least 64 rows; dk/dv at head dim
tiles of 256 excepted, see WGMMA_EXEMPT in bench/aot.py). ``keep_configs`` picks the list for the GPU at hand and
drops configs whose shared memory estimate exceeds what that GPU allows per
block (e.g. 99 KB on sm_86/sm_89, 163 KB on sm_80, 227 KB on sm_90).
"""
import functools
import os

import torch
import triton


def _configs(rows):
    return [triton.Config({"BLOCK_M": bm, "BLOCK_N": bn}, num_warps=w, num_stages=s) for bm, bn, w, s in rows]


def _row_configs(rows):
    return [triton.Config({"BLOCK_M": bm}, num_warps=w) for bm, w in rows]


def _fwd_configs(rows):
    return [triton.Config({"BLOCK_M": bm, "BLOCK_N": bn, "WARP_SPECIALIZE": ws}, num_warps=w, num_stages=s)
            for bm, bn, w, s, ws in rows]


# Family "sm_90": Hopper (wgmma) and newer; "sm_80": every GPU with mma.sync (Ampere, Ada).
# (family, largest BLOCK_D the list serves) -> configs (BLOCK_M, BLOCK_N, warps, stages).
# With two head dims (q/k and v/out tiles of BLOCK_D and BLOCK_DV columns) a list keyed by the
# exact pair of tiles, (family, (BLOCK_D, BLOCK_DV)), serves them where there is one; otherwise
# the list of the wider tile does (``candidate_configs``). Pairs have lists of their own where
# that one does not fit them: narrower value tiles do not always mean fewer registers (ptxas
# spilled some configs of the wider tile's list at (128, 64) on triton 3.4.0, and one at 3.9.0),
# and at MLA's (256, 128) tiles the value tiles at half the width leave room on sm_90 for the
# 128-row forward tile and 64 key rows in dk/dv that the lists of 256 cannot take.
# The forward has two lists on sm_90: "sm_90+tma" for its tensor-descriptor loads (kernels/tiles.py
# tma_compatible), "sm_90" for its pointer loads; a config adds whether the unmasked loop is
# warp-specialized (WARP_SPECIALIZE).
_FWD_TMA = {
    # Warp-specialized configs first (one-loop launches only: keep_configs drops them for the rest):
    # 4 warps of 128 query rows, which Triton turns into a producer and two consumer warpgroups.
    # Then configs without warp specialization, for every launch.
    # Warp-specialized configs have 2 stages: with 3, every one of them (128x128 and 128x64, head dims
    # 64 and 128, bf16 and fp16) returned NaN on an H200 with triton 3.6.0 (bench/check_fwd_configs.py,
    # 2026-12-04, bench/results/NVIDIA_H200/fwd_configs.json); the 2-stage ones matched SDPA there.
    ("sm_90+tma", 64): _fwd_configs([(128, 128, 4, 2, True), (128, 64, 4, 2, True), (128, 128, 8, 3, False),
                                     (128, 64, 4, 3, False), (128, 64, 8, 3, False)]),
    ("sm_90+tma", 128): _fwd_configs([(128, 128, 4, 2, True), (128, 64, 4, 2, True), (128, 128, 8, 2, False),
                                      (128, 64, 8, 3, False), (128, 64, 8, 4, False)]),
    ("sm_90+tma", 256): _fwd_configs([(64, 32, 8, 3, False), (64, 32, 8, 2, False)]),
}
_FWD = {
    **_FWD_TMA,
    ("sm_90", 64): _fwd_configs([(128, 64, 8, 3, False), (128, 128, 8, 3, False), (64, 64, 4, 3, False),
                                 (128, 32, 4, 4, False), (64, 32, 4, 4, False), (64, 64, 4, 2, False),
                                 (128, 128, 8, 2, False)]),
    ("sm_90", 128): _fwd_configs([(128, 64, 8, 3, False), (128, 64, 8, 2, False), (128, 64, 8, 4, False),
                                  (128, 32, 8, 3, False), (64, 64, 4, 2, False), (64, 64, 8, 2, False),
                                  (64, 32, 4, 4, False)]),
    ("sm_90", 256): _fwd_configs([(64, 32, 8, 3, False), (64, 32, 8, 2, False)]),
    ("sm_90", (256, 128)): _fwd_configs([(128, 64, 8, 2, False), (128, 64, 8, 3, False), (64, 64, 4, 2, False),
                                         (128, 32, 8, 3, False)]),
    ("sm_80", 64): _fwd_configs([(128, 64, 8, 3, False), (64, 64, 4, 3, False), (64, 32, 4, 4, False)]),
    ("sm_80", 128): _fwd_configs([(128, 32, 8, 3, False), (64, 64, 8, 3, False),
                                  (64, 128, 8, 2, False), (64, 32, 4, 3, False), (64, 32, 4, 4, False)]),
    # 64 x 128 spilled 112-232 B on triton 3.4.0 at (128, 64).
    ("sm_80", (128, 64)): _fwd_configs([(128, 32, 8, 3, False), (64, 64, 8, 3, False), (64, 32, 4, 3, False),
                                        (64, 32, 4, 4, False)]),
    ("sm_80", 256): _fwd_configs([(64, 32, 8, 3, False), (64, 128, 8, 2, False), (32, 64, 4, 3, False)]),
    # 128 x 64 compiled clean on triton 3.9.0 but spilled 152-208 B on 3.4.0.
    ("sm_80", (256, 128)): _fwd_configs([(64, 64, 8, 2, False), (128, 32, 8, 3, False), (64, 32, 4, 3, False)]),
}
_DKDV = {
    ("sm_90", 64): _configs([(64, 128, 8, 2), (64, 64, 4, 3), (32, 64, 4, 2), (16, 64, 4, 2), (64, 64, 8, 2),
                             (64, 64, 8, 3), (32, 128, 8, 2), (16, 128, 8, 2), (32, 64, 8, 2), (64, 128, 8, 1)]),
    ("sm_90", 128): _configs([(32, 128, 8, 1), (32, 64, 8, 2), (16, 64, 4, 2), (16, 128, 8, 1), (16, 128, 8, 3),
                              (16, 64, 8, 2), (16, 128, 8, 2)]),
    ("sm_90", 256): _configs([(16, 32, 8, 2), (32, 32, 8, 2)]),
    # 16 x 64: the 64 key rows wgmma needs, which the lists of 256 cannot hold (WGMMA_EXEMPT in bench/aot.py).
    ("sm_90", (256, 128)): _configs([(16, 64, 8, 2), (16, 32, 8, 2), (32, 32, 8, 2)]),
    ("sm_80", 64): _configs([(16, 64, 4, 2), (16, 128, 8, 2)]),
    ("sm_80", 128): _configs([(64, 64, 8, 2), (32, 64, 8, 2), (16, 64, 8, 2)]),
    ("sm_80", 256): _configs([(16, 32, 8, 2), (32, 32, 8, 2)]),  # also (256, 128): 16 x 64 spilled 208-248 B on 3.4.0
}
# The 5-GEMM backward (ATOMIC_DQ): its dk/dv kernel also holds ds @ k for dq, so it has lists of its own.
_DKDV_ATOMIC = {
    ("sm_90+atomic", 64): _configs([(32, 128, 8, 2), (32, 64, 4, 2)]),
    ("sm_90+atomic", 128): _configs([(32, 64, 8, 2)]),
    ("sm_90+atomic", 256): _configs([(16, 32, 8, 1), (16, 16, 8, 2)]),
    ("sm_80+atomic", 64): _configs([(32, 64, 4, 2), (16, 64, 4, 2)]),
    ("sm_80+atomic", 128): _configs([(32, 64, 8, 2), (16, 64, 8, 2)]),
    ("sm_80+atomic", 256): _configs([(16, 32, 8, 2)]),
}
_DQ = {
    ("sm_90", 64): _configs([(64, 64, 4, 2), (128, 64, 8, 2), (64, 64, 8, 3), (64, 64, 8, 2), (64, 32, 4, 2)]),
    ("sm_90", 128): _configs([(128, 64, 8, 2), (64, 64, 8, 2), (64, 64, 8, 3), (64, 32, 4, 2)]),
    ("sm_90", 256): _configs([(64, 32, 8, 2), (64, 16, 8, 2), (64, 16, 4, 2)]),
    ("sm_80", 64): _configs([(128, 64, 8, 2), (32, 64, 4, 3), (32, 128, 4, 2), (32, 64, 4, 2), (16, 64, 4, 2),
                             (32, 128, 8, 2), (64, 32, 4, 2)]),
    ("sm_80", 128): _configs([(64, 128, 8, 2), (64, 64, 8, 3), (64, 64, 8, 2), (32, 128, 8, 2), (16, 128, 8, 2),
                              (64, 32, 4, 2)]),
    ("sm_80", 256): _configs([(16, 64, 4, 2)]),
    # 64 x 32 of 8 warps compiled clean on triton 3.9.0 but spilled 32-88 B on 3.4.0.
    ("sm_80", (256, 128)): _configs([(32, 128, 8, 2), (16, 64, 4, 2)]),
}
# Split-KV decode and the merges: one list per family and head-dim bound too (wide rows spill with few warps).
_DECODE = {
    ("sm_90", 64): _configs([(16, 64, 4, 2), (16, 128, 4, 2), (16, 64, 4, 3), (16, 128, 8, 3), (32, 64, 4, 2),
                             (64, 64, 4, 2)]),
    ("sm_90", 128): _configs([(16, 64, 4, 2), (16, 128, 4, 2), (16, 64, 4, 3), (16, 128, 8, 3), (32, 64, 4, 2)]),
    # At (128, 64) 16 x 64 of 4 warps, 2 stages spilled 8 B on triton 3.4.0, 32 x 64 8 B on 3.9.0 and 24 B
    # on sm_80 with 3.4.0; at (256, 128) 16 x 64 of 8 warps 16 B on 3.4.0.
    ("sm_90", (128, 64)): _configs([(16, 128, 4, 2), (16, 64, 4, 3), (16, 128, 8, 3)]),
    ("sm_90", 256): _configs([(16, 64, 4, 2), (16, 64, 8, 2), (16, 128, 8, 2), (16, 32, 4, 2)]),
    ("sm_90", (256, 128)): _configs([(16, 64, 4, 2), (16, 128, 8, 2), (16, 32, 4, 2)]),
    ("sm_80", 64): _configs([(16, 64, 4, 2), (16, 128, 4, 2), (16, 64, 4, 3), (16, 128, 8, 3), (64, 64, 4, 2)]),
    ("sm_80", 128): _configs([(16, 64, 4, 2), (16, 128, 4, 2), (16, 64, 4, 3), (32, 64, 4, 2)]),
    ("sm_80", (128, 64)): _configs([(16, 64, 4, 2), (16, 128, 4, 2), (16, 64, 4, 3)]),
    ("sm_80", 256): _configs([(16, 64, 8, 2), (16, 128, 8, 2), (16, 32, 4, 2), (16, 64, 8, 3)]),
    # MLA's latent decode, (576, 512): tiles of 1024 and 512. The list of 256 it took before gave it only
    # 16 x 32 of 4 warps, which spilled 8 B (sm_90) and 24 B (sm_80) on triton 3.4.0. 32 query rows (heads)
    # read each key tile half as often as 16; of the 32- and 64-row tiles tried only 32 x 32 of 8 warps
    # spilled on neither release (3.4.0: 32 x 64 of 8 warps 40 B, 64 x 32 32 B, 4 warps 176-2272 B).
    ("sm_90", (1024, 512)): _configs([(16, 64, 8, 2), (32, 32, 8, 2), (16, 64, 4, 2), (16, 32, 8, 2)]),
    ("sm_80", (1024, 512)): _configs([(16, 64, 8, 2), (32, 32, 8, 2), (16, 32, 8, 2)]),
}
_PREPROCESS = _row_configs([(32, 4), (64, 4), (128, 4)])
_MERGE = {(family, bound): _row_configs([(bm, w) for bm in (16, 32, 64) for w in (2, 4, 8)
                                         if not (bound == 256 and bm == 64 and w == 2)])
          for family in ("sm_80", "sm_90") for bound in (64, 128, 256)}
_MERGE_SPLITS = {
    **{(family, 64): _row_configs([(bm, w) for bm in (16, 32, 64) for w in (2, 4)]) for family in ("sm_80", "sm_90")},
    **{(family, 128): _row_configs([(16, 2), (16, 4), (32, 4)]) for family in ("sm_80", "sm_90")},
    **{(family, 256): _row_configs([(16, 4)]) for family in ("sm_80", "sm_90")},
}

# Accumulating launches (a ring step adding into the running fp32 out/lse or gradients) fuse the add into
# the kernel's epilogue up to these head-dim tiles. Above them the epilogue (forward: the running out tile
# next to the new one; backward: the dk/dv accumulators next to the loaded gradient) makes ptxas spill
# (the compile gate): the forward at 256 in every config, the backward from 128 on (sm_90 dk/dv tiles of
# 16 and 32 query rows: 112-128 B). There the step computes its partial alone and the merge kernel
# (forward) or a tensor add (backward) folds it in: one more pass over the fp32 partial. At 128 the
# forward's configs of both families compile clean with the fused epilogue (on sm_90 the TMA forward
# holds no addresses in registers; 128 x 32 tiles of 4 warps, which spilled 80 B there, left its list).
FORWARD_FUSED_ACCUMULATE_MAX_BLOCK_D = 128
BACKWARD_FUSED_ACCUMULATE_MAX_BLOCK_D = 64

# The widest key block of any forward config: a key length that is a multiple of it fills every block.
MAX_BLOCK_N = 128

# Lengths enter the keys as power-of-two buckets, so varying lengths do not re-tune.
_ATTN_KEY = ["seqlen_q_bucket", "seqlen_k_bucket", "BLOCK_D", "BLOCK_DV", "VARLEN", "LEFT", "RIGHT", "SOFTCAP",
             "ACCUMULATE"]

# kernel name -> (GPU configs: one list, or {(family, block_d bound): list}; autotune key;
#                 CPU interpreter block sizes)
SPECS = {
    "_fwd_kernel": (_FWD, _ATTN_KEY + ["TMA", "EDGES"], {"BLOCK_M": 32, "BLOCK_N": 32, "WARP_SPECIALIZE": True}),
    "_bwd_dkdv_kernel": ({**_DKDV, **_DKDV_ATOMIC}, _ATTN_KEY + ["ATOMIC_DQ"], {"BLOCK_M": 32, "BLOCK_N": 32}),
    "_bwd_dq_kernel": (_DQ, _ATTN_KEY, {"BLOCK_M": 32, "BLOCK_N": 32}),
    "_bwd_preprocess": (_PREPROCESS, ["HEAD_DIM"], {"BLOCK_M": 32}),
    "_merge_kernel": (_MERGE, ["HEAD_DIM"], {"BLOCK_M": 32}),
    # Not split_len: it changes with the cache length, and every decode step would re-tune.
    # CPU key tiles of 32 straddle 16-token pages, so the tests cross page boundaries.
    "_decode_kernel": (_DECODE, ["seqlen_q", "group_size", "BLOCK_D", "BLOCK_DV", "LATENT", "PAGED", "LEFT", "RIGHT",
                                 "SOFTCAP"],
                       {"BLOCK_M": 16, "BLOCK_N": 32}),
    "_merge_splits_kernel": (_MERGE_SPLITS, ["num_splits", "num_heads", "HEAD_DIM"], {"BLOCK_M": 16}),
}

# Shared memory (bench/aot.py checks the estimate against every compile): tiles a kernel keeps
# for the whole program ("resident": the block giving their rows, and the head-dim tile of each:
# "D" for q and k's BLOCK_D, "DV" for v and out's BLOCK_DV, "W" the wider of the two) and tiles
# its loop streams through num_stages buffers, plus fp32 row statistics streamed with them (dk/dv:
# lse and delta of each query row). The dk/dv kernel counts its value tiles at the wider width:
# what it stages does not shrink with them (at (128, 64) the sm_90 compiles use up to 10 KB more
# than a count of its v and do tiles at 64 columns).
_SMEM_TILES = {
    "_fwd_kernel": (("BLOCK_M", ("D",)), ("BLOCK_N", ("D", "DV")), 0),              # q; k, v
    "_decode_kernel": (("BLOCK_M", ("D",)), ("BLOCK_N", ("D", "DV")), 0),           # q; k, v
    "_bwd_dq_kernel": (("BLOCK_M", ("D", "DV")), ("BLOCK_N", ("D", "DV")), 0),      # q, do; k, v
    "_bwd_dkdv_kernel": (("BLOCK_N", ("W", "W")), ("BLOCK_M", ("W", "W")), 8),      # k, v; q, do + lse, delta
}
# Hopper reserves 1 KB of every block's shared memory (cuobjdump shows it as static).
_RESERVED_SMEM = 1024
# The forward's TMA loads add their mbarriers and alignment: 1 KB more in every sm_90 compile.
_TMA_BARRIERS_SMEM = 1024


def smem_estimate(name, config, block_d, elem_bytes, constants=None):
    """An upper bound of the shared memory (bytes) ``config`` of kernel ``name`` needs for a launch
    with ``constants`` (``BLOCK_DV`` among them: v's head-dim tile, else ``block_d``). Kernels
    without tiles of dots (merges, delta) need at most a reduction scratch."""
    rows, constants = config.kwargs, constants or {}
    if name not in _SMEM_TILES:
        return _RESERVED_SMEM + 8 * rows["BLOCK_M"]
    width = {"D": block_d, "DV": constants.get("BLOCK_DV", block_d)}
    if constants.get("LATENT"):
        # The latent decode reads each key tile once, as its value columns (BLOCK_DV) and the rest
        # (BLOCK_DR), and uses the first part as the value tile: q and k are held at BLOCK_DV + BLOCK_DR
        # columns (576 -> 512 + 64, not the 1024 above it) and v has no tile of its own.
        width = {"D": width["DV"] + constants["BLOCK_DR"], "DV": 0}
    width["W"] = max(width.values())
    (resident, resident_tiles), (streamed, streamed_tiles), stats = _SMEM_TILES[name]
    per_stage = sum(width[t] for t in streamed_tiles) * rows[streamed] * elem_bytes + stats * rows[streamed]
    extra = _TMA_BARRIERS_SMEM if name == "_fwd_kernel" else 0
    if rows.get("WARP_SPECIALIZE"):
        # Warp-specialized forwards keep one more (BLOCK_M, head-dim) tile (the sm_90 compiles show it;
        # counted at the wider of the two head dims).
        extra += rows["BLOCK_M"] * width["W"] * elem_bytes
    if constants.get("ATOMIC_DQ"):
        # The 5-GEMM dk/dv kernel's dq dot (ds^T @ k) stages its operands once more: the k tile and,
        # as the sm_90 compiles show, up to two (BLOCK_M, BLOCK_N) tiles of ds.
        extra += (rows["BLOCK_N"] * block_d + 2 * rows["BLOCK_M"] * rows["BLOCK_N"]) * elem_bytes
    resident_bytes = sum(width[t] for t in resident_tiles) * rows[resident] * elem_bytes
    return _RESERVED_SMEM + extra + resident_bytes + config.num_stages * per_stage


def family(capability):
    """The config family of a compute capability given as 10 * major + minor (80, 86, 90, ...)."""
    return "sm_90" if capability >= 90 else "sm_80"


def list_variant(constants):
    """Which of a family's lists a launch with these constexprs takes: "+tma" for the forward
    reading through tensor descriptors, "+atomic" for the 5-GEMM backward's dk/dv, else ""."""
    if constants.get("TMA"):
        return "+tma"
    if constants.get("ATOMIC_DQ"):
        return "+atomic"
    return ""


def candidate_configs(name, block_d, capability, variant="", block_dv=None):
    """The configs listed for kernel ``name`` at head-dim tiles ``block_d`` (q, k) and ``block_dv``
    (v, out; default ``block_d``) on this family (``variant``: the family's list of that name, see
    ``list_variant``). A list for that exact pair of tiles if there is one; else the list of the
    smallest bound that holds the wider tile: chosen for tiles of that width in every operand, it
    fits a kernel whose other tiles are narrower (the compile gate checks (128, 64) so)."""
    table = SPECS[name][0]
    if isinstance(table, list):
        return table
    fam = family(capability) + variant
    block_dv = block_d if block_dv is None else block_dv
    if block_dv != block_d and (fam, (block_d, block_dv)) in table:
        return table[(fam, (block_d, block_dv))]
    width = max(block_d, block_dv)
    bounds = sorted(bound for f, bound in table if f == fam and isinstance(bound, int))
    bound = next((b for b in bounds if b >= width), bounds[-1])
    return table[(fam, bound)]


def keep_configs(name, block_d, elem_bytes, capability, smem_limit, constants=None):
    """The configs of kernel ``name`` worth trying on a GPU of ``capability`` that allows
    ``smem_limit`` bytes of shared memory per block, for a launch with ``constants`` (its
    constexprs pick the list, see ``list_variant``; warp-specialized forward configs serve
    only the one-loop form, without EDGES). Never empty: if none fits the estimate, the smallest is
    kept and Triton reports what it needs."""
    constants = constants or {}
    configs = candidate_configs(name, block_d, capability, list_variant(constants), constants.get("BLOCK_DV"))
    if constants.get("EDGES", True):
        configs = [c for c in configs if not c.kwargs.get("WARP_SPECIALIZE")] or configs
    kept = [c for c in configs if smem_estimate(name, c, block_d, elem_bytes, constants) <= smem_limit]
    return kept or [min(configs, key=lambda c: smem_estimate(name, c, block_d, elem_bytes, constants))]


def autotune_limit():
    """At most how many configs a kernel tries, from ``CPATTN_AUTOTUNE`` (unset or "all": every
    kept config). A number N bounds the tuning time, which is mostly compile time on a fresh
    machine (bench/gpu_session.sh sets it): the first N configs of the list with distinct tiles."""
    value = os.environ.get("CPATTN_AUTOTUNE", "all").strip().lower()
    if value == "all":
        return None
    if not value.isdigit() or int(value) < 1:
        raise ValueError(f"CPATTN_AUTOTUNE must be 'all' or a positive integer, got {value!r}")
    return int(value)


def limit_configs(configs, limit):
    """The first ``limit`` configs with distinct tiles (BLOCK_M, BLOCK_N, warps, warp specialization), in list order
    (the lists lead with the configs expected fastest); all of them when ``limit`` is None."""
    if limit is None:
        return configs
    first_per_tile = {}
    for c in configs:
        tile = (c.kwargs.get("BLOCK_M"), c.kwargs.get("BLOCK_N"), c.num_warps, c.kwargs.get("WARP_SPECIALIZE"))
        first_per_tile.setdefault(tile, c)
    return list(first_per_tile.values())[:limit]


def _prune(name, configs, named_args, **kwargs):
    """Triton's early_config_prune: the configs ``keep_configs`` keeps for the current GPU,
    at most ``CPATTN_AUTOTUNE`` of them."""
    device = torch.cuda.current_device()
    major, minor = torch.cuda.get_device_capability(device)
    # The limit Triton itself checks a compiled kernel against before launching it.
    smem_limit = triton.runtime.driver.active.utils.get_device_properties(device)["max_shared_mem"]
    first_tensor = next(a for a in named_args.values() if isinstance(a, torch.Tensor))
    kept = keep_configs(name, kwargs["BLOCK_D"], first_tensor.element_size(), 10 * major + minor, smem_limit, kwargs)
    return limit_configs(kept, autotune_limit())


def _spec(kernel):
    name = kernel.fn.__name__ if hasattr(kernel, "fn") else kernel.__name__
    return name, SPECS[name]


def cpu_config(kernel):
    """The block sizes the interpreter runs ``kernel`` with."""
    return _spec(kernel)[1][2]


@functools.lru_cache(maxsize=None)
def tuned(kernel, in_place):
    """The autotuned wrapper of ``kernel``; ``in_place`` launches get their outputs restored between trials."""
    name, (table, key, _) = _spec(kernel)
    configs = table if isinstance(table, list) else [c for rows in table.values() for c in rows]
    restore = [arg for arg in kernel.arg_names if arg in _OUTPUTS] if in_place else None
    wrapper = triton.autotune(configs=configs, key=key, restore_value=restore,
                              prune_configs_by={"early_config_prune": functools.partial(_prune, name)})(kernel)
    _TUNED.append((name + (" (in place)" if in_place else ""), wrapper))
    return wrapper


_TUNED = []  # (name, autotuned wrapper) of every wrapper ``tuned`` made, for chosen_configs


def forget_tuning():
    """Drop every autotuned choice of this process, so the next launch of each kernel tunes (prunes) again."""
    for _, wrapper in _TUNED:
        wrapper.cache.clear()


def chosen_configs():
    """What autotuning chose so far in this process: {kernel name: {autotune key: config}},
    as text, for benchmarks to report next to their times."""
    chosen = {name: {str(key): str(config) for key, config in wrapper.cache.items()} for name, wrapper in _TUNED}
    return {name: picks for name, picks in chosen.items() if picks}


# Arguments that kernels write; restored between autotuning trials of in-place launches.
_OUTPUTS = {"Out", "Lse", "DQ", "DK", "DV", "OutDst", "LseDst"}
