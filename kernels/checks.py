"""Argument checks of the kernels' host entry points (``decode_attention``), which cpattn's
API layer shares (``cpattn/checks.py`` re-exports them): they live here because the
kernels import nothing from cpattn (DESIGN.md, "Layers").

Bad input gets a TypeError or ValueError that names the argument and the problem,
before any kernel runs; inputs are never modified.
"""
import torch

from .tiles import is_power_of_two

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


def check_int_tensor(t, name, shape, device, where, dtype=torch.int32):
    """An integer index/length tensor of exactly ``shape`` and ``dtype`` on ``device``."""
    if not isinstance(t, torch.Tensor) or t.dtype != dtype or tuple(t.shape) != tuple(shape):
        raise TypeError(f"{where}: {name} must be an {str(dtype).replace('torch.', '')} tensor of shape "
                        f"{tuple(shape)}, got {getattr(t, 'dtype', type(t).__name__)} {tuple(getattr(t, 'shape', ()))}")
    if t.device != torch.device(device):
        raise ValueError(f"{where}: {name} is on {t.device}, the queries on {device}")
    return t


def check_block_table(block_table, pool, batch, device, where, lengths=None):
    """The int32 (batch, max_pages) table of a page pool (num_pages, page_size, ...) whose page size the decode
    kernel takes (a power of two >= 16; flash-attn's CUDA kernel wants multiples of 256); with ``lengths``
    (host ints) also ``check_pages_used``. Returns the keys a sequence can hold."""
    page_size = pool.shape[1]
    if page_size < 16 or not is_power_of_two(page_size):
        raise ValueError(f"{where}: the page size (dimension 1 of the paged cache, {tuple(pool.shape)}) must be a "
                         f"power of two >= 16, got {page_size}")
    if not isinstance(block_table, torch.Tensor) or block_table.dim() != 2:
        raise TypeError(f"{where}: block_table must be a 2-D int32 tensor (batch={batch}, max_pages), got "
                        f"{getattr(block_table, 'shape', type(block_table).__name__)}")
    check_int_tensor(block_table, "block_table", (batch, block_table.shape[1]), device, where)
    if lengths is not None:
        check_pages_used(block_table, lengths, pool.shape[0], page_size, where)
    return block_table.shape[1] * page_size


def check_pages_used(block_table, lengths, num_pages, page_size, where):
    """Host check (reads the table back): the pages holding sequence b's ``lengths[b]`` keys are in the table
    and in the pool."""
    table = block_table.cpu()
    for b, n in enumerate(lengths):
        used = -(-n // page_size)
        if used > table.shape[1]:
            raise ValueError(f"{where}: sequence {b} has {n} keys = {used} pages, but block_table has "
                             f"{table.shape[1]} columns")
        if used and (int(table[b, :used].min()) < 0 or int(table[b, :used].max()) >= num_pages):
            raise ValueError(f"{where}: block_table row {b} points outside the {num_pages} pages: "
                             f"{table[b, :used].tolist()}")
