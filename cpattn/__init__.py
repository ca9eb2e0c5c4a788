"""cpattn: context-parallel attention for PyTorch on Triton flash-attention kernels.

Single device:        flash_attn_func (+ qkv/kv-packed), flash_attn_varlen_func (+ packed), scaled_dot_product_attention,
                      flash_attn_with_kvcache
Context parallelism:  ContextParallel (ring, zigzag ring, Ulysses, USP), add_context_parallel_args
Inference:            ShardedKVCache, prefill, decode, decode_step, split_chunk, transfer_cache
Kernels:              cpattn.kernels
"""
from .attention import (flash_attn_func, flash_attn_kvpacked_func, flash_attn_qkvpacked_func, flash_attn_varlen_func,
                        flash_attn_varlen_kvpacked_func, flash_attn_varlen_qkvpacked_func, scaled_dot_product_attention)
from .context_parallel import ContextParallel, add_context_parallel_args, auto_ulysses_degree
from .faults import PeerFailure
from .flash_kvcache import flash_attn_with_kvcache
from .inference import decode, decode_step, prefill, split_chunk
from .kv_cache import ShardedKVCache
from .layout import context_parallel_work
from .ring import simulate_ring_attention, simulate_ring_attention_backward
from .transfer import transfer_cache

__version__ = "0.1.0"

__all__ = [
    "flash_attn_func", "flash_attn_qkvpacked_func", "flash_attn_kvpacked_func", "flash_attn_varlen_func",
    "flash_attn_varlen_qkvpacked_func", "flash_attn_varlen_kvpacked_func", "scaled_dot_product_attention",
    "flash_attn_with_kvcache",
    "ContextParallel", "add_context_parallel_args", "auto_ulysses_degree", "PeerFailure", "context_parallel_work",
    "simulate_ring_attention", "simulate_ring_attention_backward",
    "ShardedKVCache", "prefill", "decode", "decode_step", "split_chunk", "transfer_cache",
]
