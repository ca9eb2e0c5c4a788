"""cpattn: context-parallel attention for PyTorch on Triton flash-attention kernels."""
from .attention import FlashAttnFunction, flash_attn_func, scaled_dot_product_attention

__version__ = "0.1.0"

__all__ = ["flash_attn_func", "scaled_dot_product_attention", "FlashAttnFunction"]
