"""Argument checks shared by every public entry point.

Bad input gets a TypeError or ValueError that names the argument and the
problem, before any kernel runs; inputs are never modified.
"""
import torch

SUPPORTED_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
MAX_HEAD_DIM = 256


def check_qkv(q, k, v, where, layout="flash"):
    """Validate q, k, v in flash layout (B, S, H, D) or SDPA layout (B, H, S, D).

    Returns (batch, seqlen_q, seqlen_k, heads, heads_kv, head_dim).
    """
    names = ("q", "k", "v") if layout == "flash" else ("query", "key", "value")
    dims = "(batch, seqlen, heads, headdim)" if layout == "flash" else "(batch, heads, seqlen, headdim)"
    for name, t in zip(names, (q, k, v)):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{where}: {name} must be a torch.Tensor, got {type(t).__name__}")
        if t.dim() != 4:
            raise ValueError(f"{where}: {name} must be 4-D {dims}, got {t.dim()}-D shape {tuple(t.shape)}")
        if not t.is_floating_point() or t.dtype not in SUPPORTED_DTYPES:
            raise TypeError(f"{where}: {name} has dtype {t.dtype}; supported: float16, bfloat16, float32")
    if not (q.dtype == k.dtype == v.dtype):
        raise TypeError(f"{where}: {names[0]}, {names[1]}, {names[2]} must share one dtype, "
                        f"got {q.dtype}, {k.dtype}, {v.dtype}")
    if not (q.device == k.device == v.device):
        raise ValueError(f"{where}: {names[0]}, {names[1]}, {names[2]} must be on one device, "
                         f"got {q.device}, {k.device}, {v.device}")
    if q.device.type not in ("cpu", "cuda"):
        raise ValueError(f"{where}: tensors on {q.device.type} are not supported (cpu or cuda)")
    if layout == "flash":
        (batch, seqlen_q, heads, head_dim), (bk, seqlen_k, heads_kv, dk), (bv, sv, hv, dv) = q.shape, k.shape, v.shape
    else:
        (batch, heads, seqlen_q, head_dim), (bk, heads_kv, seqlen_k, dk), (bv, hv, sv, dv) = q.shape, k.shape, v.shape
    if not (batch == bk == bv):
        raise ValueError(f"{where}: batch sizes differ: {names[0]} {batch}, {names[1]} {bk}, {names[2]} {bv}")
    if not (head_dim == dk == dv):
        raise ValueError(f"{where}: head dims differ: {names[0]} {head_dim}, {names[1]} {dk}, {names[2]} {dv}")
    if seqlen_k != sv:
        raise ValueError(f"{where}: {names[1]} and {names[2]} lengths differ: {seqlen_k} vs {sv}")
    if heads_kv != hv:
        raise ValueError(f"{where}: {names[1]} and {names[2]} head counts differ: {heads_kv} vs {hv}")
    if head_dim > MAX_HEAD_DIM:
        raise ValueError(f"{where}: head dim {head_dim} is above the supported maximum {MAX_HEAD_DIM}")
    if head_dim < 1:
        raise ValueError(f"{where}: head dim must be at least 1, got {head_dim}")
    if heads_kv < 1 or heads % heads_kv != 0:
        raise ValueError(f"{where}: query heads ({heads}) must be a multiple of kv heads ({heads_kv})")
    return batch, seqlen_q, seqlen_k, heads, heads_kv, head_dim


def check_scale(softmax_scale, where):
    if softmax_scale is None:
        return None
    if isinstance(softmax_scale, bool) or not isinstance(softmax_scale, (int, float)):
        raise TypeError(f"{where}: softmax scale must be a float or None, got {type(softmax_scale).__name__}")
    return float(softmax_scale)


def positive_int(value, name, where, allow_none=False):
    """``value`` if it is an int >= 1 (or None when ``allow_none``); else a TypeError/ValueError naming it."""
    if value is None and allow_none:
        return None
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{where}: {name} must be a positive int, got {type(value).__name__}")
    if value < 1:
        raise ValueError(f"{where}: {name} must be a positive int, got {value}")
    return value
