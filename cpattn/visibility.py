"""The host half of the one rule of visibility (DESIGN.md), as cpattn's Python layer asks it.

The rule itself lives with the kernels (``cpattn.kernels.MaskSpec``: a window
(left, right), -1 unbounded, causal being the right bound 0). Every host-side
question the planners and the inference code ask of it goes through this
module, so that the rule has one home on the host too.
"""
import torch

from cpattn.kernels import MaskSpec


def causal_window(causal, window_size):
    """The (left, right) window a call attends with: ``window_size`` with causal as the right bound 0."""
    return MaskSpec(bool(causal), window_size).window


def window_sees(window, q_first, q_last, k_first, k_last):
    """(whether some query in [q_first, q_last] sees some key in [k_first, k_last], whether every query
    sees every key), by position under ``window``."""
    return MaskSpec.window_sees(window, q_first, q_last, k_first, k_last)


def visible_keys(window, q_first, q_last, num_keys):
    """[lo, hi): the keys among positions [0, num_keys) that some query in [q_first, q_last] sees under
    ``window`` (int64 tensors, one range per sequence); empty where lo >= hi."""
    left, right = window
    hi = num_keys if right < 0 else torch.minimum(q_last + right + 1, num_keys)
    lo = torch.zeros_like(q_first) if left < 0 else (q_first - left).clamp(min=0)
    return lo, hi


def prefix_work(n, left=-1):
    """Visible (query, key) pairs among the first ``n`` tokens of a document under a causal mask with a
    window of ``left`` tokens back (-1: unbounded): each query sees at most left + 1 keys. The work
    model of the packed-document dispatch (dispatch.py) and its report."""
    if left < 0 or n <= left + 1:
        return n * (n + 1) // 2
    return (left + 1) * (left + 2) // 2 + (n - left - 1) * (left + 1)


def span_work(a, b, left=-1):
    """Visible pairs of the queries at document positions [a, b) (``prefix_work``)."""
    return prefix_work(b, left) - prefix_work(a, left)
