"""cpattn: context-parallel attention for PyTorch on Triton flash-attention kernels."""
from .attention import FlashAttnFunction, flash_attn_func, scaled_dot_product_attention
from .inference import decode, prefill, split_chunk
from .kv_cache import ShardedKVCache

__version__ = "0.1.0"

__all__ = ["flash_attn_func", "scaled_dot_product_attention", "FlashAttnFunction"]
__all__ += ["ShardedKVCache", "prefill", "decode", "split_chunk"]
from .context_parallel import ContextParallel, add_context_parallel_args, auto_ulysses_degree
from .ring import simulate_ring_attention, simulate_ring_attention_backward

__all__ += ["ContextParallel", "add_context_parallel_args", "auto_ulysses_degree",
            "simulate_ring_attention", "simulate_ring_attention_backward"]
