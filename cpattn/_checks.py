"""Argument checks shared by every public entry point.

Bad input gets a TypeError or ValueError that names the argument and the
problem, before any kernel runs; inputs are never modified.
"""
import math

import torch

SUPPORTED_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
MAX_HEAD_DIM = 256


def check_qkv(q, k, v, where, layout="flash", same_value_dim=True, allow_no_heads=False, min_head_dim=1, names=None):
    """Validate q, k, v in flash layout (B, S, H, D) or SDPA layout (B, H, S, D).

    ``same_value_dim=False`` lets v's head dim differ from q's and k's (torch SDPA allows it).
    ``allow_no_heads=True`` accepts q and k/v with zero heads each, and ``min_head_dim=0``
    head dims of 0: empty problems that torch SDPA accepts (the drop-ins give its result).
    Batch and sequence lengths may always be 0. ``names``: what the messages call the three
    (default: the layout's argument names).
    Returns (batch, seqlen_q, seqlen_k, heads, heads_kv, head_dim).
    """
    names = names or (("q", "k", "v") if layout == "flash" else ("query", "key", "value"))
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
    if head_dim != dk or (same_value_dim and dk != dv):
        raise ValueError(f"{where}: head dims differ: {names[0]} {head_dim}, {names[1]} {dk}, {names[2]} {dv}")
    if seqlen_k != sv:
        raise ValueError(f"{where}: {names[1]} and {names[2]} lengths differ: {seqlen_k} vs {sv}")
    if heads_kv != hv:
        raise ValueError(f"{where}: {names[1]} and {names[2]} head counts differ: {heads_kv} vs {hv}")
    if max(head_dim, dv) > MAX_HEAD_DIM:
        raise ValueError(f"{where}: head dim {max(head_dim, dv)} is above the supported maximum {MAX_HEAD_DIM}")
    if min(head_dim, dv) < min_head_dim:
        raise ValueError(f"{where}: head dim must be at least {min_head_dim}, got {min(head_dim, dv)}")
    no_heads = allow_no_heads and heads == heads_kv == 0
    if not no_heads and (heads_kv < 1 or heads % heads_kv != 0):
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


def check_timeout(timeout, where):
    """``timeout`` as a float if it is a positive finite number of seconds; else a ValueError."""
    if isinstance(timeout, bool) or not isinstance(timeout, (int, float)) or not 0 < timeout < math.inf:
        raise ValueError(f"{where}: timeout must be a positive number of seconds, got {timeout!r}")
    return float(timeout)


def refuse_unsupported(where, dropout_p=0.0, alibi_slopes=None, **others):
    """NotImplementedError for flash-attn arguments cpattn does not support (never ignored)."""
    if isinstance(dropout_p, bool) or not isinstance(dropout_p, (int, float)):
        raise TypeError(f"{where}: dropout_p must be a float, got {type(dropout_p).__name__}")
    if dropout_p != 0.0:
        raise NotImplementedError(f"{where}: dropout_p={dropout_p} is not supported by cpattn (use 0.0)")
    if alibi_slopes is not None:
        raise NotImplementedError(f"{where}: alibi_slopes are not supported by cpattn")
    for name, value in others.items():
        if value is not None:
            raise NotImplementedError(f"{where}: {name} is not supported by cpattn")


def check_window(window_size, where):
    """(left, right) as ints >= -1 (-1: unbounded on that side)."""
    if not isinstance(window_size, (tuple, list)) or len(window_size) != 2:
        raise TypeError(f"{where}: window_size must be a pair (left, right), got {window_size!r}")
    for side, w in zip(("left", "right"), window_size):
        if isinstance(w, bool) or not isinstance(w, int):
            raise TypeError(f"{where}: window_size {side} must be an int, got {type(w).__name__}")
        if w < -1:
            raise ValueError(f"{where}: window_size {side} must be >= 0, or -1 for unbounded; got {w}")
    return int(window_size[0]), int(window_size[1])


def check_softcap(softcap, where):
    if isinstance(softcap, bool) or not isinstance(softcap, (int, float)):
        raise TypeError(f"{where}: softcap must be a float, got {type(softcap).__name__}")
    if not softcap >= 0.0 or softcap == float("inf"):
        raise ValueError(f"{where}: softcap must be a finite value >= 0 (0 disables it), got {softcap}")
    return float(softcap)


def check_sinks(sinks, heads, device, where):
    """Attention sinks: one float logit per query head, on the inputs' device."""
    if sinks is None:
        return None
    if not isinstance(sinks, torch.Tensor):
        raise TypeError(f"{where}: sinks must be a tensor of shape ({heads},), got {type(sinks).__name__}")
    if not sinks.is_floating_point() or sinks.dtype not in SUPPORTED_DTYPES:
        raise TypeError(f"{where}: sinks must be float32, float16 or bfloat16, got {sinks.dtype}")
    if tuple(sinks.shape) != (heads,):
        raise ValueError(f"{where}: sinks must have shape ({heads},), one per query head, got {tuple(sinks.shape)}")
    if sinks.device != device:
        raise ValueError(f"{where}: sinks are on {sinks.device} but the inputs on {device}")
    return sinks


def may_read_back(device):
    """Whether a check may read device values back to the host: not while torch.compile traces (the
    values are unknown then) nor while a CUDA graph is being captured (a read would break the capture)."""
    if torch.compiler.is_compiling():
        return False
    return not (torch.device(device).type == "cuda" and torch.cuda.is_current_stream_capturing())


def check_cu_seqlens(cu_seqlens, total, max_seqlen, device, name, where):
    """cu_seqlens: int32 (N + 1,) from 0, non-decreasing, ending at ``total`` (None: any total, e.g. keys
    in a page pool); no document longer than ``max_seqlen``. Reads the values back to the host (skipped
    while compiling or capturing a CUDA graph)."""
    if not isinstance(cu_seqlens, torch.Tensor):
        raise TypeError(f"{where}: {name} must be an int32 tensor, got {type(cu_seqlens).__name__}")
    if cu_seqlens.dtype != torch.int32:
        raise TypeError(f"{where}: {name} must be int32, got {cu_seqlens.dtype}")
    if cu_seqlens.dim() != 1 or cu_seqlens.numel() < 1:
        raise ValueError(f"{where}: {name} must be 1-D with at least one entry, got shape {tuple(cu_seqlens.shape)}")
    if cu_seqlens.device != device:
        raise ValueError(f"{where}: {name} is on {cu_seqlens.device} but the inputs on {device}")
    if isinstance(max_seqlen, bool) or not isinstance(max_seqlen, int) or max_seqlen < 0:
        raise TypeError(f"{where}: the max_seqlen that goes with {name} must be an int >= 0, got {max_seqlen!r}")
    if not may_read_back(device):
        return
    values = cu_seqlens.tolist()
    if values[0] != 0:
        raise ValueError(f"{where}: {name} must start at 0, got {values[0]}")
    lengths = [b - a for a, b in zip(values, values[1:])]
    if any(n < 0 for n in lengths):
        raise ValueError(f"{where}: {name} must be non-decreasing, got {values}")
    if total is not None and values[-1] != total:
        raise ValueError(f"{where}: {name} ends at {values[-1]} but there are {total} tokens")
    if lengths and max(lengths) > max_seqlen:
        raise ValueError(f"{where}: a document of {max(lengths)} tokens is longer than max_seqlen {max_seqlen}")


def check_documents(cu_seqlens_q, cu_seqlens_k, total_q, total_k, max_seqlen_q, max_seqlen_k, device, where):
    """Both cu_seqlens of packed documents (``check_cu_seqlens``), describing the same number of documents."""
    check_cu_seqlens(cu_seqlens_q, total_q, max_seqlen_q, device, "cu_seqlens_q", where)
    check_cu_seqlens(cu_seqlens_k, total_k, max_seqlen_k, device, "cu_seqlens_k", where)
    if cu_seqlens_q.numel() != cu_seqlens_k.numel():
        raise ValueError(f"{where}: cu_seqlens_q has {cu_seqlens_q.numel() - 1} documents but cu_seqlens_k "
                         f"{cu_seqlens_k.numel() - 1}")


def check_int_tensor(t, name, shape, device, where, dtype=torch.int32):
    """An integer index/length tensor of exactly ``shape`` and ``dtype`` on ``device``."""
    if not isinstance(t, torch.Tensor) or t.dtype != dtype or tuple(t.shape) != tuple(shape):
        raise TypeError(f"{where}: {name} must be an {str(dtype).replace('torch.', '')} tensor of shape "
                        f"{tuple(shape)}, got {getattr(t, 'dtype', type(t).__name__)} {tuple(getattr(t, 'shape', ()))}")
    if t.device != torch.device(device):
        raise ValueError(f"{where}: {name} is on {t.device}, the queries on {device}")
    return t


def check_kv(k, v, batch, num_kv_heads, head_dim, dtype, device, where, value_dim=None, latent=False):
    """New keys and values for a KV cache: (batch, tokens, num_kv_heads, head_dim) of ``dtype`` on ``device``;
    v of ``value_dim`` (default head_dim). A ``latent`` cache (cpattn/latent.py) takes v=None: its values are
    the first columns of k."""
    if latent and v is not None:
        raise ValueError(f"{where}: a latent cache takes v=None (the values are the first {value_dim} entries "
                         f"of each latent vector k), got a tensor")
    value_dim = head_dim if value_dim is None else value_dim
    for name, t, dim in (("k", k, head_dim), ("v", v, value_dim))[:1 if latent else 2]:
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{where}: {name} must be a torch.Tensor, got {type(t).__name__}")
        if t.dim() != 4:
            raise ValueError(f"{where}: {name} must be 4-D (batch, tokens, kv heads, head dim), "
                             f"got shape {tuple(t.shape)}")
        if t.dtype != dtype:
            raise TypeError(f"{where}: {name} has dtype {t.dtype}, the cache holds {dtype}")
        if t.device != device:
            raise ValueError(f"{where}: {name} is on {t.device}, the cache on {device}")
        want = (batch, k.shape[1], num_kv_heads, dim)
        if tuple(t.shape) != want:
            raise ValueError(f"{where}: {name} must have shape (batch={batch}, tokens, "
                             f"kv_heads={num_kv_heads}, {'v_' if name == 'v' else ''}head_dim={dim}), "
                             f"got {tuple(t.shape)}")


def sequence_ids(batch_index, batch, where):
    """Host int64 tensor of the sequences ``batch_index`` names (None: all ``batch``), checked: distinct
    ids in [0, batch)."""
    if batch_index is None:
        return torch.arange(batch)
    ids = torch.as_tensor(batch_index, dtype=torch.int64).reshape(-1).cpu()
    if ids.numel() == 0 or int(ids.min()) < 0 or int(ids.max()) >= batch or ids.unique().numel() != ids.numel():
        raise ValueError(f"{where}: batch_index must be distinct sequence ids in [0, {batch}), got {ids.tolist()}")
    return ids
