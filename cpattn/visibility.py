"""Where cpattn's Python layer used to find the host half of the visibility rule.

The rule has one home, both halves side by side: ``kernels/mask.py`` (``MaskSpec``,
``causal_window``, ``window_sees``, ``visible_keys``; DESIGN.md). This module only
re-exports them, because ``ring.py``, ``context_parallel.py`` and ``inference.py`` still
import them from here and are being changed on other branches; new code imports
``cpattn.kernels.mask``, and this module goes once those imports move.
"""
from cpattn.kernels.mask import MaskSpec, causal_window, visible_keys, window_sees

__all__ = ["MaskSpec", "causal_window", "visible_keys", "window_sees"]
