"""flash-attn 2's inference call ``flash_attn_with_kvcache``, and the paged keys (``block_table``) of
``flash_attn_varlen_func``: both on the split-KV decode kernel (``cpattn.kernels.decode_attention``).

Positions are cache slots: slot j of a sequence's cache holds its key at position j. A call that
appends n new keys to a sequence of ``cache_seqlens[b]`` keys writes them at slots
cache_seqlens[b] .. cache_seqlens[b] + n - 1, and its Sq queries are bottom-right aligned to the last
key, as in flash-attn: with L keys, query i sits at position L - Sq + i. Causal masks and windows are
the decode kernel's visibility rule (kernels/mask.py) at these positions.

Two of flash-attn's arguments address the cache in ways the kernel does not read: ``cache_batch_idx``
(sequence b lives in cache row cache_batch_idx[b]) and ``cache_leftpad`` (sequence b's keys start at
slot cache_leftpad[b]); the kernel reads sequence b from slot 0 of row b. With either one, the rows
are gathered into a fresh contiguous copy first (``_gather_rows``): a copy of batch x seqlen_cache keys
and values per call.

Neither function has a backward (flash-attn's neither): a call that would need one raises.
"""
import torch

from cpattn.kernels import decode_attention
from cpattn.kernels.checks import check_block_table, check_pages_used
from cpattn.kernels.mask import causal_window

from .checks import (SUPPORTED_DTYPES, check_documents, check_int_tensor, check_qkv, check_scale, check_sinks,
                      check_softcap, check_window, may_read_back, refuse_unsupported)
from .ops import kernel_dtype

MAX_SPLITS = 128  # flash-attn's bound on num_splits
_POOL_DIMS = "(num_blocks, page_block_size, heads_k, headdim)"


# ---- checks --------------------------------------------------------------------------------------------
def _check_4d(t, name, dims, where):
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{where}: {name} must be a torch.Tensor, got {type(t).__name__}")
    if t.dim() != 4:
        raise ValueError(f"{where}: {name} must be 4-D {dims}, got shape {tuple(t.shape)}")


def _check_against_cache(q, k_cache, v_cache, names, cache_dims, where):
    """check_qkv of q (B, Sq, H, D) against a cache, except the batch sizes: a page pool and a cache
    indexed by cache_batch_idx have first dimensions of their own. Returns (Sq, H, Hkv, D)."""
    _check_4d(q, names[0], "(batch, seqlen, heads, headdim)", where)
    for name, t in zip(names[1:], (k_cache, v_cache)):
        _check_4d(t, name, cache_dims, where)
    if k_cache.shape != v_cache.shape:
        raise ValueError(f"{where}: {names[1]} and {names[2]} shapes differ: {tuple(k_cache.shape)} vs "
                         f"{tuple(v_cache.shape)}")
    # Slices of no rows keep every other dimension: check_qkv sees all but the batch sizes.
    _, seqlen_q, _, heads, heads_kv, head_dim = check_qkv(q[:0], k_cache[:0], v_cache[:0], where, names=names)
    return seqlen_q, heads, heads_kv, head_dim


def _check_rotary(rotary_cos, rotary_sin, k, head_dim, device, where):
    """Returns rotary_cos's length, the positions it covers (None without rotary embedding)."""
    if rotary_cos is None and rotary_sin is None:
        return None
    if rotary_cos is None or rotary_sin is None:
        raise ValueError(f"{where}: pass both rotary_cos and rotary_sin, or neither")
    if k is None:
        raise ValueError(f"{where}: rotary embedding needs the new k and v (it rotates q and the new keys, as "
                         f"in flash-attn)")
    for name, t in (("rotary_cos", rotary_cos), ("rotary_sin", rotary_sin)):
        if not isinstance(t, torch.Tensor) or t.dim() != 2:
            raise ValueError(f"{where}: {name} must be a 2-D tensor (seqlen_ro, rotary_dim / 2), got "
                             f"{getattr(t, 'shape', type(t).__name__)}")
        if t.dtype not in SUPPORTED_DTYPES:
            raise TypeError(f"{where}: {name} has dtype {t.dtype}; supported: float16, bfloat16, float32")
        if t.device != device:
            raise ValueError(f"{where}: {name} is on {t.device}, q on {device}")
    if rotary_cos.shape != rotary_sin.shape:
        raise ValueError(f"{where}: rotary_cos and rotary_sin shapes differ: {tuple(rotary_cos.shape)} vs "
                         f"{tuple(rotary_sin.shape)}")
    if not 1 <= 2 * rotary_cos.shape[1] <= head_dim:
        raise ValueError(f"{where}: rotary_dim (2 x rotary_cos.shape[1] = {2 * rotary_cos.shape[1]}) must be "
                         f"between 2 and the head dim {head_dim}")
    return rotary_cos.shape[0]


def _check_num_splits(num_splits, where):
    if isinstance(num_splits, bool) or not isinstance(num_splits, int):
        raise TypeError(f"{where}: num_splits must be an int, got {type(num_splits).__name__}")
    if not 0 <= num_splits <= MAX_SPLITS:
        raise ValueError(f"{where}: num_splits must be 0 (heuristic) or 1 to {MAX_SPLITS}, got {num_splits}")


def _refuse_gradients(where, *tensors):
    """Neither function has a backward: raise where autograd would record the call, rather than return an
    output that silently carries no gradient."""
    if torch.is_grad_enabled() and any(isinstance(t, torch.Tensor) and t.requires_grad for t in tensors):
        raise NotImplementedError(f"{where}: there is no backward through a KV cache (flash-attn has none "
                                  f"either): call it under torch.no_grad() or torch.inference_mode(), or pass "
                                  f"tensors that do not require grad")


def _check_cache_values(lengths, seqlen_new, capacity, leftpad, rows, num_rows, rotary_len, rotary_end, where):
    """Host checks of the values (lists) flash_attn_with_kvcache reads before writing anything: the
    lengths, the left pads and cache rows, and the rotary table's reach (start + [0, rotary_end))."""
    for b, n in enumerate(lengths):
        if n < 0:
            raise ValueError(f"{where}: cache_seqlens must be >= 0, got {lengths}")
        if n + seqlen_new > capacity:
            raise ValueError(f"{where}: sequence {b} holds {n} keys; with the {seqlen_new} new ones that exceeds "
                             f"the cache's {capacity} slots")
        if leftpad is not None and not 0 <= leftpad[b] <= n:
            raise ValueError(f"{where}: cache_leftpad[{b}] = {leftpad[b]} must be between 0 and cache_seqlens[{b}] "
                             f"= {n}")
        if rows is not None and not 0 <= rows[b] < num_rows:
            raise ValueError(f"{where}: cache_batch_idx[{b}] = {rows[b]} is not a row of the cache's {num_rows}")
        if rotary_len is not None and rotary_end and n + rotary_end > rotary_len:
            raise ValueError(f"{where}: sequence {b} needs rotary angles up to position {n + rotary_end - 1}, "
                             f"but rotary_cos/rotary_sin have {rotary_len} rows")


# ---- the pieces of a call --------------------------------------------------------------------------------
def _rotate(x, cos, sin, positions, interleaved):
    """Rotary embedding of x (B, S, H, D) at positions (B, S), in float32: the first rotary_dim =
    2 * cos.shape[1] dims turn pair by pair by the angle whose cosine and sine are cos[p], sin[p];
    the other dims pass unchanged. Pairs are dims (2i, 2i + 1) when interleaved (GPT-J), else
    (i, i + rotary_dim / 2) (GPT-NeoX)."""
    half = cos.shape[1]
    c = cos[positions].float().unsqueeze(2)  # (B, S, 1, half): every head turns by the same angles
    s = sin[positions].float().unsqueeze(2)
    turned = x[..., :2 * half].float()
    if interleaved:
        a, b = turned[..., 0::2], turned[..., 1::2]
        turned = torch.stack((a * c - b * s, a * s + b * c), dim=-1).flatten(-2)
    else:
        a, b = turned[..., :half], turned[..., half:]
        turned = torch.cat((a * c - b * s, a * s + b * c), dim=-1)
    return torch.cat((turned.to(x.dtype), x[..., 2 * half:]), dim=-1)


def _store(k_cache, v_cache, k, v, slots, rows, block_table):
    """Write the new keys and values in place: sequence b's new token j at slot slots[b, j] of cache
    row rows[b] (contiguous) or of its page in block_table (paged)."""
    if block_table is None:
        index = (rows[:, None].expand_as(slots), slots)
    else:
        page_size = k_cache.shape[1]
        index = (block_table.long().gather(1, slots // page_size), slots % page_size)
    k_cache[index] = k
    v_cache[index] = v


def _gather_rows(cache, rows, first):
    """A fresh contiguous copy (B, seqlen_cache, Hkv, D) whose row b is cache row rows[b] from slot
    first[b] on; the tail repeats the row's last slot, which no length reaches."""
    capacity = cache.shape[1]
    slots = (first.long()[:, None] + torch.arange(capacity, device=cache.device)).clamp(max=capacity - 1)
    return cache[rows[:, None], slots]


# ---- the public functions ----------------------------------------------------------------------------------
def flash_attn_with_kvcache(q, k_cache, v_cache, k=None, v=None, rotary_cos=None, rotary_sin=None,
                            cache_seqlens=None, cache_batch_idx=None, cache_leftpad=None, block_table=None,
                            softmax_scale=None, causal=False, window_size=(-1, -1), softcap=0.0,
                            rotary_interleaved=True, alibi_slopes=None, num_splits=0, return_softmax_lse=False):
    """flash-attn 2's ``flash_attn_with_kvcache``: attention of new queries over a KV cache, after
    appending new keys and values to it in place. Inference only (no backward).

    q (B, Sq, H, D); k_cache, v_cache (B_cache, seqlen_cache, Hkv, D), or with ``block_table``
    (B, max_num_blocks) int32 a page pool (num_blocks, page_block_size, Hkv, D), page_block_size a
    power of two >= 16. H a multiple of Hkv (GQA/MQA). ``cache_seqlens``: int or int32 (B,), the keys
    each sequence holds (default: all slots). ``k``, ``v`` (B, seqlen_new, Hkv, D): written into the
    cache in place at slots cache_seqlens[b] onward (the caller's cache_seqlens is not changed); the
    attention then sees cache_seqlens[b] + seqlen_new keys. ``rotary_cos``/``rotary_sin``
    (seqlen_ro, rotary_dim / 2), given with k: q and the new keys are rotated (interleaved pairs, GPT-J,
    or halves, GPT-NeoX) before anything else, new key j at position cache_seqlens[b] + j, query i at
    cache_seqlens[b] + i when causal or windowed (window_size != (-1, -1)), else every query at
    cache_seqlens[b]. ``cache_batch_idx`` (B,) int32: sequence b uses cache row cache_batch_idx[b];
    ``cache_leftpad`` (B,) int32: sequence b's keys start at slot cache_leftpad[b] (both contiguous
    caches only, as in flash-attn; either one costs a copy of the B rows). Causal masks and windows are
    bottom-right aligned: query i of Sq sits at position cache_seqlens[b] + seqlen_new - Sq + i.
    ``num_splits``: 0 picks a split count from the shapes; n >= 1 runs n programs per tile of queries,
    each over an equal share of the keys it can see (at most 128).

    Returns out (B, Sq, H, D), or (out, softmax_lse) with ``return_softmax_lse``, lse (B, H, Sq)
    float32, natural log, -inf where a query sees no key (flash-attn writes +inf there).
    ``alibi_slopes`` raises NotImplementedError, as does a call that needs gradients.
    """
    where = "flash_attn_with_kvcache"
    refuse_unsupported(where, alibi_slopes=alibi_slopes)
    paged = block_table is not None
    cache_dims = _POOL_DIMS if paged else "(batch_size_cache, seqlen_cache, heads_k, headdim)"
    seqlen_q, heads, heads_kv, head_dim = _check_against_cache(q, k_cache, v_cache, ("q", "k_cache", "v_cache"),
                                                               cache_dims, where)
    batch = q.shape[0]
    if (k is None) != (v is None):
        raise ValueError(f"{where}: pass both k and v (the new keys and values), or neither")
    seqlen_new = 0
    if k is not None:
        check_qkv(q, k, v, where)
        if k.shape[2] != heads_kv:
            raise ValueError(f"{where}: k and v have {k.shape[2]} heads but the cache has {heads_kv}")
        seqlen_new = k.shape[1]
    if isinstance(cache_seqlens, int) and not isinstance(cache_seqlens, bool):
        cache_seqlens = torch.full((batch,), cache_seqlens, dtype=torch.int32, device=q.device)
    elif cache_seqlens is not None:
        check_int_tensor(cache_seqlens, "cache_seqlens", (batch,), q.device, where)
    elif k is not None:
        raise ValueError(f"{where}: k and v need cache_seqlens (it says where they are written)")
    if paged:
        for name, value in (("cache_batch_idx", cache_batch_idx), ("cache_leftpad", cache_leftpad)):
            if value is not None:
                raise ValueError(f"{where}: {name} cannot be combined with block_table (as in flash-attn)")
        capacity = check_block_table(block_table, k_cache, batch, k_cache.device, where)
    else:
        capacity = k_cache.shape[1]
        if cache_batch_idx is None and k_cache.shape[0] != batch:
            raise ValueError(f"{where}: k_cache has {k_cache.shape[0]} rows but q a batch of {batch} (pass "
                             f"cache_batch_idx to pick rows)")
        for name, value in (("cache_batch_idx", cache_batch_idx), ("cache_leftpad", cache_leftpad)):
            if value is not None:
                check_int_tensor(value, name, (batch,), q.device, where)
    if cache_seqlens is None:
        cache_seqlens = torch.full((batch,), capacity, dtype=torch.int32, device=q.device)
    rotary_len = _check_rotary(rotary_cos, rotary_sin, k, head_dim, q.device, where)
    softmax_scale = check_scale(softmax_scale, where)
    window_size = check_window(window_size, where)
    softcap = check_softcap(softcap, where)
    _check_num_splits(num_splits, where)
    _refuse_gradients(where, q, k, v, k_cache, v_cache, rotary_cos, rotary_sin)
    # flash-attn's rotary rule: queries at successive positions when causal or windowed, else all at one.
    q_steps = bool(causal) or window_size != (-1, -1)
    if may_read_back(q.device):  # the values, read back once
        lengths = cache_seqlens.tolist()
        leftpad = None if cache_leftpad is None else cache_leftpad.tolist()
        cache_rows = None if cache_batch_idx is None else cache_batch_idx.tolist()
        rotary_end = max(seqlen_new, seqlen_q if q_steps else min(seqlen_q, 1))  # positions used: start + [0, end)
        _check_cache_values(lengths, seqlen_new, capacity, leftpad, cache_rows, k_cache.shape[0], rotary_len,
                            rotary_end, where)
        if paged:
            check_pages_used(block_table, [n + seqlen_new for n in lengths], *k_cache.shape[:2], where)
    # Everything is checked: from here on the cache is written.

    start = cache_seqlens.long()[:, None]
    new_slots = start + torch.arange(seqlen_new, device=q.device)  # (B, seqlen_new)
    if rotary_len is not None:
        q_offsets = torch.arange(seqlen_q, device=q.device) if q_steps else q.new_zeros(seqlen_q, dtype=torch.long)
        q = _rotate(q, rotary_cos, rotary_sin, start + q_offsets, bool(rotary_interleaved))
        k = _rotate(k, rotary_cos, rotary_sin, new_slots, bool(rotary_interleaved))
    rows = torch.arange(batch, device=q.device) if cache_batch_idx is None else cache_batch_idx.long()
    if k is not None:
        _store(k_cache, v_cache, k, v, new_slots, rows, block_table)

    lengths = cache_seqlens + seqlen_new
    keys, values = k_cache, v_cache
    if cache_batch_idx is not None or cache_leftpad is not None:
        first = torch.zeros_like(cache_seqlens) if cache_leftpad is None else cache_leftpad
        keys, values = _gather_rows(k_cache, rows, first), _gather_rows(v_cache, rows, first)
        lengths = lengths - first  # positions now count from each sequence's first key: windows are unchanged
    q_positions = lengths[:, None] - seqlen_q + torch.arange(seqlen_q, device=q.device, dtype=torch.int32)
    dtype = kernel_dtype(q)  # bf16 on CPU runs in fp32 (the interpreter has no bf16 matmul)
    out, lse = decode_attention(q.to(dtype), keys.to(dtype), values.to(dtype), lengths, block_table=block_table,
                                softmax_scale=softmax_scale, causal=bool(causal), num_splits=num_splits or None,
                                validate=False, window_size=window_size, softcap=softcap, q_positions=q_positions)
    out = out.to(q.dtype)
    return (out, lse) if return_softmax_lse else out


def paged_varlen_attention(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, block_table,
                           softmax_scale, causal, window_size, softcap, sinks, where):
    """``flash_attn_varlen_func`` with ``block_table``: k, v are a page pool (num_blocks, page_block_size,
    Hkv, D), document b's keys its first cu_seqlens_k[b + 1] - cu_seqlens_k[b] slots through row b of the
    table. Returns (out (total_q, H, D), lse (H, total_q)). Forward only.

    The decode kernel takes queries per sequence, (N, max_seqlen_q, H, D), so the packed queries are
    copied into that padded layout and back out (the pages are read where they are). With a right bound
    (causal, or a window's right side) a padding row sits where it sees no key, so a tile of padding
    rows loads nothing (the one tile a document's last queries share with its padding loads its keys
    from the first one, whatever the left bound). Without one a padding row is computed like a real
    row and dropped.
    """
    if not isinstance(q, torch.Tensor) or q.dim() != 3:
        raise ValueError(f"{where}: q must be a 3-D tensor (total_q, heads, headdim), got "
                         f"{tuple(q.shape) if isinstance(q, torch.Tensor) else type(q).__name__}")
    _, heads, heads_kv, head_dim = _check_against_cache(q.unsqueeze(0), k, v, ("q", "k", "v"), _POOL_DIMS, where)
    total_q = q.shape[0]
    check_documents(cu_seqlens_q, cu_seqlens_k, total_q, None, max_seqlen_q, max_seqlen_k, q.device, where)
    batch = cu_seqlens_q.numel() - 1
    check_block_table(block_table, k, batch, k.device, where)
    softmax_scale = check_scale(softmax_scale, where)
    window_left, window_right = check_window(window_size, where)
    softcap = check_softcap(softcap, where)
    sinks = check_sinks(sinks, heads, q.device, where)
    _refuse_gradients(where, q, k, v, sinks)
    lens_q, lens_k = cu_seqlens_q.diff(), cu_seqlens_k.diff()
    if may_read_back(q.device):
        check_pages_used(block_table, lens_k.tolist(), *k.shape[:2], where)

    token = torch.arange(total_q, device=q.device)
    doc = torch.searchsorted(cu_seqlens_q[1:], token, right=True)  # the document of each packed query
    row = token - cu_seqlens_q[doc]                               # its row within the document
    padded = q.new_zeros((batch, max_seqlen_q, heads, head_dim))
    padded[doc, row] = q
    rows = torch.arange(max_seqlen_q, device=q.device, dtype=torch.int32)
    positions = (lens_k - lens_q)[:, None] + rows  # bottom-right aligned per document, as flash-attn
    _, right = causal_window(causal, (window_left, window_right))
    if right >= 0:  # padding rows go where the right bound hides every key
        positions = torch.where(rows < lens_q[:, None], positions, -1 - right)
    dtype = kernel_dtype(q)
    out, lse = decode_attention(padded.to(dtype), k.to(dtype), v.to(dtype), lens_k, block_table=block_table,
                                softmax_scale=softmax_scale, causal=bool(causal), validate=False,
                                window_size=(window_left, window_right), softcap=softcap, sinks=sinks,
                                q_positions=positions.to(torch.int32), max_seqlen=max(1, max_seqlen_k))
    return out[doc, row].to(q.dtype), lse[doc, :, row].t().contiguous()
