"""cpattn: context-parallel attention for PyTorch on Triton flash-attention kernels.

Single device:        flash_attn_func (+ qkv/kv-packed), flash_attn_varlen_func (+ packed), scaled_dot_product_attention,
                      flash_attn_with_kvcache
Context parallelism:  ContextParallel (ring, zigzag ring, Ulysses, USP), add_context_parallel_args
Inference:            ShardedKVCache, prefill, decode, decode_step, split_chunk, gather_chunk, transfer_cache
Kernels:              cpattn.kernels
Test harnesses and reports stay in their modules: cpattn.ring.simulate_ring_attention (one process playing every
rank of a ring), cpattn.work_report.context_parallel_work (tokens, work and bytes sent of each ring rank).
"""
from .attention import (flash_attn_func, flash_attn_kvpacked_func, flash_attn_qkvpacked_func, flash_attn_varlen_func,
                        flash_attn_varlen_kvpacked_func, flash_attn_varlen_qkvpacked_func, scaled_dot_product_attention)
from .context_parallel import ContextParallel
from .faults import PeerFailure
from .flash_kvcache import flash_attn_with_kvcache
from .inference import decode, decode_step, gather_chunk, prefill, split_chunk
from .kv_cache import ShardedKVCache
from .mesh import auto_ulysses_degree
from .mindspeed import add_context_parallel_args
from .transfer import transfer_cache

__version__ = "0.1.0"

__all__ = [
    "flash_attn_func", "flash_attn_qkvpacked_func", "flash_attn_kvpacked_func", "flash_attn_varlen_func",
    "flash_attn_varlen_qkvpacked_func", "flash_attn_varlen_kvpacked_func", "scaled_dot_product_attention",
    "flash_attn_with_kvcache",
    "ContextParallel", "add_context_parallel_args", "auto_ulysses_degree", "PeerFailure",
    "ShardedKVCache", "prefill", "decode", "decode_step", "split_chunk", "gather_chunk", "transfer_cache",
]
