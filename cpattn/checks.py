"""Argument checks shared by every public entry point (those of the kernels: ``kernels/checks.py``).

Bad input gets a TypeError or ValueError that names the argument and the
problem, before any kernel runs; inputs are never modified.
"""
import math

import torch

# The checks the kernels' own entry points need live with them (kernels import nothing from cpattn);
# re-exported here so that every API module finds all checks in one place.
from cpattn.kernels.checks import (MAX_HEAD_DIM, SUPPORTED_DTYPES, check_int_tensor, check_qkv,  # noqa: F401
                                   check_scale, check_sinks, check_softcap, check_window)


def check_seq_dim(x, seq_dim, where):
    """``seq_dim`` of tensor ``x`` checked and made non-negative."""
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{where}: expected a torch.Tensor, got {type(x).__name__}")
    if isinstance(seq_dim, bool) or not isinstance(seq_dim, int):
        raise TypeError(f"{where}: seq_dim must be an int, got {type(seq_dim).__name__}")
    if not -x.dim() <= seq_dim < x.dim():
        raise ValueError(f"{where}: seq_dim {seq_dim} is out of range for a {x.dim()}-D tensor")
    return seq_dim % x.dim()


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
