"""Every kernel's tunables in one place: its ``triton.Config`` list for GPUs,
its pruning, its autotune key, and the fixed block sizes the CPU interpreter uses.

``tuned(kernel, in_place)`` gives the autotuned wrapper ``launch`` runs on a GPU.
Only launches that read what they write (``in_place``: an accumulating forward or
backward, an in-place merge) need the autotuner to restore their outputs between
trials; every other launch overwrites its outputs, so cloning them would only
cost time inside the timed region.
"""
import functools

import triton


def _configs(rows):
    return [triton.Config({"BLOCK_M": bm, "BLOCK_N": bn}, num_warps=w, num_stages=s) for bm, bn, w, s in rows]


def _prune_fwd(configs, named_args, **kwargs):
    # Large head dims with large tiles exceed shared memory; keep tiles in proportion.
    block_d = kwargs.get("BLOCK_D", named_args.get("BLOCK_D", 128))
    kept = [c for c in configs if block_d <= 128 or c.kwargs["BLOCK_N"] <= 64]
    return kept or configs


def _prune_bwd(configs, named_args, **kwargs):
    block_d = kwargs.get("BLOCK_D", named_args.get("BLOCK_D", 128))
    kept = [c for c in configs if block_d <= 64 or c.kwargs["BLOCK_M"] * c.kwargs["BLOCK_N"] <= 64 * 128]
    return kept or configs


_FWD = _configs([(128, 64, 8, 3), (128, 128, 8, 3), (128, 64, 4, 3), (64, 64, 4, 3),
                 (128, 32, 4, 4), (64, 32, 4, 4), (64, 64, 4, 2), (128, 128, 8, 2)])
_BWD = _configs([(64, 64, 4, 2), (64, 128, 8, 2), (128, 64, 8, 2), (32, 64, 4, 3),
                 (64, 64, 8, 3), (32, 128, 4, 2), (128, 128, 8, 1)])
_ROWS = [triton.Config({"BLOCK_M": bm}, num_warps=w) for bm in (16, 32, 64) for w in (2, 4, 8)]
_SPLIT_ROWS = [triton.Config({"BLOCK_M": bm}, num_warps=w) for bm in (16, 32, 64) for w in (2, 4)]
_DECODE = _configs([(16, 64, 4, 2), (16, 128, 4, 2), (16, 64, 4, 3), (16, 128, 8, 3),
                    (32, 64, 4, 2), (64, 64, 4, 2), (64, 128, 8, 2)])

# Lengths enter the keys as power-of-two buckets, so varying lengths do not re-tune.
_ATTN_KEY = ["seqlen_q_bucket", "seqlen_k_bucket", "BLOCK_D", "IS_CAUSAL", "ACCUMULATE"]

# kernel name -> (GPU configs, autotune key, early prune, CPU interpreter block sizes)
SPECS = {
    "_fwd_kernel": (_FWD, _ATTN_KEY, _prune_fwd, {"BLOCK_M": 32, "BLOCK_N": 32}),
    "_bwd_dkdv_kernel": (_BWD, _ATTN_KEY, _prune_bwd, {"BLOCK_M": 32, "BLOCK_N": 32}),
    "_bwd_dq_kernel": (_BWD, _ATTN_KEY, _prune_bwd, {"BLOCK_M": 32, "BLOCK_N": 32}),
    "_bwd_preprocess": ([triton.Config({"BLOCK_M": bm}, num_warps=4) for bm in (32, 64, 128)], ["HEAD_DIM"],
                        None, {"BLOCK_M": 32}),
    "_merge_kernel": (_ROWS, ["HEAD_DIM"], None, {"BLOCK_M": 32}),
    # Not split_len: it changes with the cache length, and every decode step would re-tune.
    # CPU key tiles of 32 straddle 16-token pages, so the tests cross page boundaries.
    "_decode_kernel": (_DECODE, ["seqlen_q", "group_size", "BLOCK_D", "PAGED", "LEFT", "RIGHT", "SOFTCAP"], None,
                       {"BLOCK_M": 16, "BLOCK_N": 32}),
    "_merge_splits_kernel": (_SPLIT_ROWS, ["num_splits", "num_heads", "HEAD_DIM"], None, {"BLOCK_M": 16}),
}


def _spec(kernel):
    name = kernel.fn.__name__ if hasattr(kernel, "fn") else kernel.__name__
    return SPECS[name]


def cpu_config(kernel):
    """The block sizes the interpreter runs ``kernel`` with."""
    return _spec(kernel)[3]


@functools.lru_cache(maxsize=None)
def tuned(kernel, in_place):
    """The autotuned wrapper of ``kernel``; ``in_place`` launches get their outputs restored between trials."""
    configs, key, prune, _ = _spec(kernel)
    restore = [name for name in kernel.arg_names if name in _OUTPUTS] if in_place else None
    return triton.autotune(configs=configs, key=key, restore_value=restore,
                           prune_configs_by={"early_config_prune": prune} if prune else None)(kernel)


# Arguments that kernels write; restored between autotuning trials of in-place launches.
_OUTPUTS = {"Out", "Lse", "DQ", "DK", "DV", "OutDst", "LseDst"}


def keep_configs(kernel, args, constants, capability, smem_limit):  # TEMP stub for measuring
    return _spec(kernel)[0]


def smem_estimate(name, config, block_d, elem_bytes, capability):  # TEMP stub
    return 0
