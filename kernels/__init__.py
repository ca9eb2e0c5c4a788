"""cpattn's Triton kernels (installed as ``cpattn.kernels``).

They know nothing of ranks: each works on the tensors it is given, with the
global positions of the first query row and key column for causality.
"""
from .decode import decode_attention, merge_splits
from .flash_bwd import attention_backward, attention_backward_delta
from .flash_fwd import MaskSpec, attention_forward
from .merge import merge_attention

__all__ = ["MaskSpec", "attention_forward", "attention_backward", "attention_backward_delta", "merge_attention"]
__all__ += ["decode_attention", "merge_splits"]
