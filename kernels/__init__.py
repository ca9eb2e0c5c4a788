"""cpattn's Triton kernels (installed as ``cpattn.kernels``).

They know nothing of ranks: each works on the tensors it is given, with the
global positions of the first query row and key column for causality; and they
import nothing from the rest of cpattn (DESIGN.md, "Layers").

Why the branch below: this folder is the package ``cpattn.kernels`` (setup.py maps
it), but whenever the repository root is on ``sys.path`` (``python -m ...`` or a
script run from the root) Python also finds it as a top-level ``kernels``, a name
that belongs to an installed PyPI package (Hugging Face's ``kernels``, which
transformers imports). Imported under that name, the folder hands the name to the
installed package and claims nothing.
"""
if __name__ == "kernels":
    import importlib.machinery
    import importlib.util
    import os
    import sys

    _root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    _elsewhere = [p for p in sys.path if os.path.abspath(p or os.curdir) != _root]
    _spec = importlib.machinery.PathFinder.find_spec("kernels", _elsewhere)
    if _spec is None:
        raise ModuleNotFoundError("No module named 'kernels' (the repository's kernels/ folder is cpattn.kernels)",
                                  name="kernels")
    # A module may replace itself in sys.modules while it runs: the import statement returns the replacement.
    _installed = importlib.util.module_from_spec(_spec)
    sys.modules["kernels"] = _installed
    _spec.loader.exec_module(_installed)
else:
    from .decode import decode_attention, merge_splits
    from .flash_bwd import attention_backward, attention_backward_delta
    from .flash_fwd import attention_forward
    from .mask import MaskSpec
    from .merge import merge_attention

    __all__ = ["MaskSpec", "attention_forward", "attention_backward", "attention_backward_delta", "merge_attention",
               "decode_attention", "merge_splits"]
