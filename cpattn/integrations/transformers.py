"""Hugging Face transformers models on cpattn attention, on one device or context parallel.

One device::

    import cpattn.integrations.transformers as cpattn_hf
    cpattn_hf.register()          # adds the attention implementations "cpattn" and "cpattn_cp"
    model = AutoModelForCausalLM.from_config(config, attn_implementation="cpattn")

Context parallel ("cpattn_cp"): every rank holds the whole model and its share of
every sequence (``shard_batch``); the model runs inside ``with context_parallel(cp):``,
the loss is ``causal_lm_loss`` and the gradients are summed by
``all_reduce_gradients``. The recipe in full: docs/transformers.md ("Hugging Face
transformers") and ``cpattn.examples.train_transformers.context_parallel_step``.

Generation over a KV cache sharded along the sequence ("cpattn_cp" with a
``ShardedCache``, no context manager: the cache carries its group)::

    cache = cpattn_hf.ShardedCache(model.config, batch_size=2, max_cache_len=256)
    out_ids = model.generate(input_ids, attention_mask=mask, cache=cache, max_new_tokens=32)

(transformers_cache.py; docs/transformers.md, "Generation over a sharded KV cache").

Each layer's attention features come from the keyword arguments transformers
passes (sliding_window, softcap, s_aux, dropout, attention masks, packed-sequence
arguments). A feature cpattn does not compute raises NotImplementedError naming
it; the layer never silently falls back to plain causal attention.
transformers itself is imported only by ``register`` and by the first use of ``ShardedCache``
or ``transfer_cache``.
"""
import torch
import torch.distributed as dist
import torch.nn.functional as F

import cpattn
from cpattn.checks import check_cu_seqlens
from cpattn.agreement import agree
from cpattn.layout import doc_positions

# cpattn keyword argument -> the model feature that needs it, for features cpattn does not compute: a model
# that needs one is refused with NotImplementedError. Sliding windows (window_size), softcapping (softcap)
# and sinks (sinks) were listed here until cpattn gained them (issue 10); a feature cpattn gains is enabled
# by deleting its line, which passes it through to cpattn.flash_attn_func / ContextParallel.attention.
NOT_SUPPORTED = {
    "dropout_p": "attention dropout (config.attention_dropout > 0 in training mode)",
}

# The flash-attention-style arguments of packed sequences (transformers' DataCollatorWithFlattening).
PACKED_KWARGS = ("cu_seq_lens_q", "cu_seq_lens_k", "max_length_q", "max_length_k")

_active = []  # ContextParallel objects of the enclosing context_parallel() blocks, innermost last


NEEDS_TRANSFORMERS_5 = "cpattn.integrations.transformers needs transformers 5 (pip install 'cpattn[transformers]')"


def _transformers_interfaces():
    """transformers' AttentionInterface, AttentionMaskInterface and flash_attention_mask.

    An ImportError says which of three things went wrong, chained to the original
    error: transformers is missing or older than 5 (install it), or it is there but
    fails to import (a broken dependency: installing transformers again would not help).
    """
    try:
        import transformers
    except Exception as exc:  # a missing transformers, or whatever a broken dependency raises as it imports
        if isinstance(exc, ModuleNotFoundError) and exc.name == "transformers":
            raise ImportError(NEEDS_TRANSFORMERS_5) from exc
        raise ImportError(f"cpattn.integrations.transformers: transformers is installed but failed to import: "
                          f"{type(exc).__name__}: {exc}") from exc
    version = str(getattr(transformers, "__version__", "unknown"))
    major = version.split(".")[0]
    if major.isdigit() and int(major) < 5:
        raise ImportError(f"{NEEDS_TRANSFORMERS_5}; found transformers {version}")
    try:
        from transformers import AttentionInterface
        from transformers.masking_utils import AttentionMaskInterface, flash_attention_mask
    except Exception as exc:  # transformers loads these lazily: a broken dependency may surface only here
        raise ImportError(f"cpattn.integrations.transformers: transformers {version} failed to import its attention "
                          f"interfaces: {type(exc).__name__}: {exc}") from exc
    return AttentionInterface, AttentionMaskInterface, flash_attention_mask


def register():
    """Add "cpattn" and "cpattn_cp" to transformers' attention and attention-mask interfaces (idempotent)."""
    AttentionInterface, AttentionMaskInterface, flash_attention_mask = _transformers_interfaces()
    for name, function in (("cpattn", cpattn_attention), ("cpattn_cp", cpattn_cp_attention)):
        AttentionInterface.register(name, function)
        # flash-attention's mask: None unless the batch is padded. Without a registered mask function
        # transformers would drop a padding mask instead of handing it to the attention, which refuses it.
        AttentionMaskInterface.register(name, flash_attention_mask)


class context_parallel:
    """``with context_parallel(cp):`` runs the "cpattn_cp" layers of models called inside it on ``cp``.

    Run the backward inside the block too when the model recomputes activations
    (gradient checkpointing); blocks nest, the innermost wins.
    """

    def __init__(self, cp):
        if not isinstance(cp, cpattn.ContextParallel):
            raise TypeError(f"context_parallel: expected a cpattn.ContextParallel, got {type(cp).__name__}")
        self.cp = cp

    def __enter__(self):
        _active.append(self.cp)
        return self.cp

    def __exit__(self, *exc_info):
        _active.pop()


def layer_name(module):
    index = getattr(module, "layer_idx", None)
    return type(module).__name__ + ("" if index is None else f" (layer {index})")


SDPA_HINT = "; use attn_implementation='sdpa' for this input"


def cpattn_arguments(module, dropout, seq_len, kwargs, where):
    """(causal, extra cpattn keyword arguments) of one attention call; refuses what cpattn does not compute.

    ``seq_len``: the length of the whole key sequence (all ranks' shards together).
    """
    sdpa_hint = SDPA_HINT
    if kwargs.get("position_bias") is not None:
        raise NotImplementedError(f"{where}: an additive position bias is not supported by cpattn{sdpa_hint}")
    if kwargs.get("output_attentions"):
        raise NotImplementedError(f"{where}: output_attentions=True: cpattn never forms the attention "
                                  "probabilities; use attn_implementation='eager'")
    causal = kwargs.get("is_causal")
    causal = getattr(module, "is_causal", True) if causal is None else bool(causal)
    extras = {}
    window = kwargs.get("sliding_window")
    if window is not None and seq_len > window:  # a window as long as the sequence masks nothing
        if not causal:
            raise NotImplementedError(f"{where}: {layer_name(module)} asks for a bidirectional sliding window, "
                                      f"which cpattn does not support{sdpa_hint}")
        extras["window_size"] = (window - 1, 0)  # transformers: key visible iff query_pos - key_pos < window
    if kwargs.get("softcap"):  # None or 0.0: no softcapping
        extras["softcap"] = float(kwargs["softcap"])
    if kwargs.get("s_aux") is not None:
        extras["sinks"] = kwargs["s_aux"].float()
    if dropout:
        extras["dropout_p"] = float(dropout)
    refused = [NOT_SUPPORTED[name] for name in extras if name in NOT_SUPPORTED]
    if refused:
        raise NotImplementedError(f"{where}: {layer_name(module)} needs {' and '.join(refused)}, which cpattn "
                                  f"does not compute yet{sdpa_hint}")
    return causal, extras


def _restarts(position_ids):
    """Whether position_ids (..., L) restart inside a row: packed sequences (one device sync)."""
    return not bool((position_ids[..., 1:] - position_ids[..., :-1] == 1).all())


def _check_positions(position_ids, kv_len):
    """Refuse position_ids (..., L) that the dense layer cannot honour: restarts (reached only under
    torch.compile, which does not build the data-dependent packed layout) and keys past the newest query."""
    where, hint = "cpattn attention", "use attn_implementation='sdpa' for this input"
    if _restarts(position_ids):
        raise NotImplementedError(f"{where}: position_ids restart inside a row (packed sequences): under "
                                  "torch.compile pass the flash-attention packed kwargs instead (cu_seq_lens_q, "
                                  "max_length_q, ...: DataCollatorWithFlattening(return_flash_attn_kwargs=True)), "
                                  f"or run eagerly, or {hint}")
    _check_newest_keys(position_ids, kv_len)


def _check_newest_keys(position_ids, kv_len):
    """Refuse keys that extend past the newest query (one device sync when there is a KV cache)."""
    where, hint = "cpattn attention", "use attn_implementation='sdpa' for this input"
    # With a KV cache (fewer queries than keys) flash_attn_func aligns the queries with the last keys: right
    # when the keys are the newest kv_len tokens (a full or sliding-window DynamicCache), wrong when there
    # are more keys than tokens so far (a StaticCache's empty slots).
    if position_ids.shape[-1] < kv_len and not bool((position_ids[..., -1] >= kv_len - 1).all()):
        raise NotImplementedError(f"{where}: the keys extend past the newest query (e.g. a StaticCache's empty "
                                  f"slots), which needs an attention mask; use a DynamicCache or {hint}")


@torch.library.custom_op("cpattn_hf::check_positions", mutates_args=("position_ids",))
def _check_positions_in_graph(position_ids: torch.Tensor, kv_len: int) -> None:
    """``_check_positions`` as an op, so that torch.compile keeps the data-dependent check and it still raises.

    position_ids is declared mutated (it is not) because the compiler removes ops
    without outputs or side effects. Eager code calls ``_check_positions`` instead:
    the op bumps the tensor's version counter, which autograd would notice.
    """
    _check_positions(position_ids, kv_len)


@_check_positions_in_graph.register_fake
def _(position_ids, kv_len):
    return None


def _packed_from_kwargs(kwargs, where):
    """The documents of transformers' flash-attention packed kwargs: (cu_q, cu_k, max_q, max_k)."""
    missing = [name for name in PACKED_KWARGS if kwargs.get(name) is None]
    if missing:
        raise ValueError(f"{where}: packed sequences need all of {PACKED_KWARGS}, missing {missing}")
    cu_q, cu_k = (kwargs[name].to(torch.int32) for name in PACKED_KWARGS[:2])
    return cu_q, cu_k, int(kwargs["max_length_q"]), int(kwargs["max_length_k"])


def _documents_of_positions(position_ids):
    """cu_seqlens (int32) and the longest document of rows whose position_ids restart: a document starts
    at every row's start and wherever a position is not its predecessor + 1 (transformers' own rule)."""
    batch, length = position_ids.shape
    starts = torch.ones_like(position_ids, dtype=torch.bool)
    starts[:, 1:] = position_ids[:, 1:] - position_ids[:, :-1] != 1
    first = starts.flatten().nonzero().flatten()
    cu = torch.cat([first, first.new_tensor([batch * length])]).to(torch.int32)
    return cu, int(cu.diff().max())


def _unpadded(attention_mask, q_len, kv_len):
    """(query rows, key rows, cu_q, cu_k, max_q, max_k) of a (B, m) 0/1 mask of the tokens seen so far
    (padding; a StaticCache's kv_len slots past m are empty): rows index the flattened (B * len) tokens.
    The queries are the newest q_len of those tokens, so each row's queries sit bottom-right against
    its real keys, which is where flash_attn_varlen_func aligns them."""
    seen = attention_mask.bool()[:, -kv_len:]
    keys, queries = F.pad(seen, (0, kv_len - seen.shape[1])), seen[:, -q_len:]

    def layout(mask):
        lengths = mask.sum(dim=1)
        cu = F.pad(lengths.cumsum(0), (1, 0)).to(torch.int32)
        return mask.flatten().nonzero().flatten(), cu, int(lengths.max())

    (q_rows, cu_q, max_q), (k_rows, cu_k, max_k) = layout(queries), layout(keys)
    return q_rows, k_rows, cu_q, cu_k, max_q, max_k


def cpattn_attention(module, query, key, value, attention_mask, dropout=0.0, scaling=None, **kwargs):
    """transformers attention function "cpattn": query (B, H, L, D), key/value (B, Hkv, S, D) -> (B, L, H, D).

    Dense batches run ``flash_attn_func``. Packed sequences (the flash-attention kwargs, or
    position_ids that restart) and padding masks run ``flash_attn_varlen_func`` on the real tokens
    only, as transformers' flash-attention layers do; outputs at padded query positions are 0.
    """
    where = "cpattn attention"
    causal, extras = cpattn_arguments(module, dropout, key.shape[2], kwargs, where)
    # (B, H, L, D) -> (B, L, H, D) is a view; cpattn reads any strides and k/v keep their fewer heads (GQA).
    q, k, v = query.transpose(1, 2), key.transpose(1, 2), value.transpose(1, 2)
    q_len, kv_len = q.shape[1], k.shape[1]
    position_ids = kwargs.get("position_ids")
    packed_kwargs = any(kwargs.get(name) is not None for name in PACKED_KWARGS)
    if torch.compiler.is_compiling():  # the varlen layouts are data-dependent: only the packed kwargs compile
        if attention_mask is not None:
            raise NotImplementedError(f"{where}: a padding mask under torch.compile (its layout is "
                                      f"data-dependent): run eagerly{SDPA_HINT}")
        if position_ids is not None and not packed_kwargs:
            _check_positions_in_graph(position_ids, kv_len)
    elif position_ids is not None and attention_mask is None and not packed_kwargs:
        if not _restarts(position_ids):
            _check_newest_keys(position_ids, kv_len)
        elif q_len != kv_len:
            raise NotImplementedError(f"{where}: packed sequences (position_ids that restart) with a KV cache"
                                      f"{SDPA_HINT}")
        else:
            packed_kwargs = True
            cu, longest = _documents_of_positions(position_ids)
            kwargs = {**kwargs, "cu_seq_lens_q": cu, "cu_seq_lens_k": cu, "max_length_q": longest,
                      "max_length_k": longest}
    if attention_mask is None and not packed_kwargs:
        return cpattn.flash_attn_func(q, k, v, softmax_scale=scaling, causal=causal, **extras), None
    if attention_mask is not None and packed_kwargs:
        raise NotImplementedError(f"{where}: a padding mask together with packed sequences{SDPA_HINT}")
    if attention_mask is not None and attention_mask.dim() != 2:
        raise NotImplementedError(f"{where}: a {attention_mask.dim()}-D attention mask (a custom mask, not "
                                  f"padding){SDPA_HINT}")
    flat = (lambda t: t.reshape(-1, *t.shape[2:]))  # noqa: E731  (B, L, H, D) -> (B * L, H, D)
    if packed_kwargs:
        cu_q, cu_k, max_q, max_k = _packed_from_kwargs(kwargs, where)
        out = cpattn.flash_attn_varlen_func(flat(q), flat(k), flat(v), cu_q, cu_k, max_q, max_k,
                                            softmax_scale=scaling, causal=causal, **extras)
        return out.view(q.shape), None
    q_rows, k_rows, cu_q, cu_k, max_q, max_k = _unpadded(attention_mask.to(q.device), q_len, kv_len)
    out = cpattn.flash_attn_varlen_func(flat(q)[q_rows], flat(k)[k_rows], flat(v)[k_rows], cu_q, cu_k,
                                        max(max_q, 1), max(max_k, 1), softmax_scale=scaling, causal=causal,
                                        **extras)
    return flat(torch.zeros_like(q)).index_copy(0, q_rows, out).view(q.shape), None


def cpattn_cp_attention(module, query, key, value, attention_mask, dropout=0.0, scaling=None, **kwargs):
    """transformers attention function "cpattn_cp": this rank's shard of the sequence, on the active ContextParallel.

    Packed documents arrive as the flash-attention kwargs ``shard_batch`` adds (``cu_seq_lens_q/k``: the
    GLOBAL packing, not this rank's tokens), passed on as ``ContextParallel.attention``'s ``cu_seqlens``.
    """
    where = "cpattn_cp attention"
    from .transformers_cache import layer_of_update  # transformers is loaded: it is calling this function
    layer = layer_of_update(key)
    if layer is not None:  # a step of generate() over a ShardedCache: no context_parallel block needed
        return layer.attend(module, query, key, value, attention_mask, dropout, scaling, kwargs), None
    if not _active:
        raise RuntimeError(f"{where}: call the model inside `with cpattn.integrations.transformers."
                           "context_parallel(cp):` (and its backward too under gradient checkpointing)")
    cp = _active[-1]

    def check():
        if query.shape[2] != key.shape[2]:
            raise NotImplementedError(f"{where}: queries and keys differ in length ({query.shape[2]} vs "
                                      f"{key.shape[2]}), as with a KV cache; context-parallel layers run whole "
                                      "sharded sequences: pass use_cache=False, or serve with a "
                                      "cpattn.integrations.transformers.ShardedCache (generate(cache=...))")
        if attention_mask is not None:
            raise NotImplementedError(f"{where}: an attention mask (padding or a custom mask) under context "
                                      f"parallelism; pack the sequences instead (shard_batch with attention_mask= "
                                      f"packs a padded batch, or position_ids / cu_seq_lens){SDPA_HINT}")
        cu = _global_packing(kwargs, where)
        seq_len = query.shape[2] * cp.world_size if cu is None else int(cu[-1])
        causal, extras = cpattn_arguments(module, dropout, seq_len, kwargs, where)
        position_ids = kwargs.get("position_ids")
        if position_ids is not None and cu is None:
            expected = cp.positions(seq_len).to(position_ids.device)
            if position_ids.shape[-1] != expected.numel() or not torch.equal(position_ids,
                                                                              expected.expand_as(position_ids)):
                raise ValueError(f"{where}: position_ids are not this rank's global token positions "
                                 f"cp.positions({seq_len}); pass them (shard_batch does), so that RoPE sees the "
                                 "true positions; for packed documents pass all of shard_batch's inputs (its "
                                 "cu_seq_lens_q/k carry the global packing)")
        if cu is not None and position_ids is None:
            raise ValueError(f"{where}: packed documents need position_ids (each token's position inside its "
                             "document): pass all of shard_batch's inputs")
        return causal, extras, cu
    # A padding mask or wrong positions may reach some ranks only: every rank must raise, none may wait.
    group = cp.group if cp.check_across_ranks else None
    causal, extras, cu = agree(where, check, group=group, hint=query)
    out = cp.attention(query.transpose(1, 2), key.transpose(1, 2), value.transpose(1, 2),
                       causal=causal, softmax_scale=scaling, cu_seqlens=cu, **extras)
    if cu is not None:  # after the attention, which agreed on the packing and its shards' cut on every rank
        agree(where, lambda: _check_packed_positions(cp, kwargs["position_ids"], cu, where), group=group,
              hint=query)
    return out, None


def _global_packing(kwargs, where):
    """The global cu_seqlens (int32) of shard_batch's packed inputs (the flash-attention kwargs), or None."""
    if not any(kwargs.get(name) is not None for name in PACKED_KWARGS):
        return None
    cu_q, cu_k, max_q, max_k = _packed_from_kwargs(kwargs, where)
    if not torch.equal(cu_q.cpu(), cu_k.cpu()):
        raise ValueError(f"{where}: cu_seq_lens_q and cu_seq_lens_k differ; context-parallel layers attend each "
                         "document to itself (pass shard_batch's inputs)")
    check_cu_seqlens(cu_q, None, max_q, cu_q.device, "cu_seq_lens_q", where)
    longest = int(cu_q.diff().max()) if cu_q.numel() > 1 else 0
    if max_q != longest or max_k != longest:
        raise ValueError(f"{where}: max_length_q/k ({max_q}, {max_k}) are not the longest document of "
                         f"cu_seq_lens_q ({longest})")
    return cu_q


def _check_packed_positions(cp, position_ids, cu, where):
    """Refuse position_ids other than this rank's in-document positions of the global packing ``cu`` (in the
    shards ``shard_batch`` made)."""
    expected = cp.positions(int(cu[-1]), cu_seqlens=cu).to(position_ids.device)
    if position_ids.shape[-1] != expected.numel() or not torch.equal(position_ids, expected.expand_as(position_ids)):
        raise ValueError(f"{where}: position_ids are not this rank's positions inside its documents "
                         "(cp.positions(seq_len, cu_seqlens=cu_seq_lens_q)); pass all of shard_batch's inputs")


def __getattr__(name):
    """``ShardedCache`` and ``transfer_cache`` (transformers_cache.py) subclass and call transformers: they are
    imported on first use, so that importing this module does not import transformers."""
    if name in ("ShardedCache", "transfer_cache"):
        from . import transformers_cache
        return getattr(transformers_cache, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def shard_batch(cp, input_ids, labels, position_ids=None, cu_seq_lens=None, window_size=(-1, -1), ignore_index=-100,
                attention_mask=None):
    """This rank's share of a causal-LM batch: ``(model inputs, shift_labels)``.

    ``input_ids``, ``labels``: (B, S), the whole batch, the same on every rank.
    The model inputs are this rank's ``input_ids`` and ``position_ids`` (its
    tokens' global positions, for RoPE). The labels are shifted by one token over
    the whole sequence before sharding (a token's target is the next token, which
    may live on another rank); the last token gets ``ignore_index``.

    Packed documents (batch 1, as ``DataCollatorWithFlattening`` makes them): ``position_ids``
    (1, S) that restart at 0 where a document starts, or ``cu_seq_lens`` (the global int
    cu_seqlens), or both (they must agree), define the packing. The tokens are then sharded by
    ``ContextParallel``'s packed dispatch for ``window_size`` (the window the layers use:
    ``(sliding_window - 1, 0)`` for a sliding-window model); ``position_ids`` become each local
    token's position inside its document, and the inputs also carry the global packing as the
    flash-attention kwargs (``cu_seq_lens_q/k``, ``max_length_q/k``), which transformers hands to
    every "cpattn_cp" layer. No token predicts across a document boundary: each document's first
    label is ignored before the shift (``labels`` are not modified).

    Padded batches: ``attention_mask`` (B, S) of 0/1 (left or right padding: each row's real tokens
    contiguous) packs the batch first, as ``DataCollatorWithFlattening`` would have: each row's real
    tokens become one document of a batch-1 row (rows without any are dropped), padding removed, and
    then it is sharded as a packed batch (the returned inputs and labels are that row's shares). With
    right padding (labels of padding ignored) the loss and gradients are the padded batch's; with left
    padding a padded batch would also train its last padding token to predict each row's first real
    token, which the packed rows do not.
    """
    where = "shard_batch"
    for name, t in (("input_ids", input_ids), ("labels", labels)):
        if not isinstance(t, torch.Tensor) or t.dim() != 2:
            raise ValueError(f"{where}: {name} must be a 2-D (batch, seq_len) tensor, "
                             f"got {getattr(t, 'shape', type(t).__name__)}")
    if labels.shape != input_ids.shape:
        raise ValueError(f"{where}: labels shape {tuple(labels.shape)} differs from input_ids {tuple(input_ids.shape)}")
    if attention_mask is not None:
        input_ids, labels, cu_seq_lens = _packed_rows(input_ids, labels, attention_mask, position_ids, cu_seq_lens,
                                                      where)
    batch, seq_len = input_ids.shape
    cu = _batch_packing(input_ids, position_ids, cu_seq_lens, where)
    if cu is None:  # the dense shards do not depend on the window; cp.shard still checks it
        shift_labels = F.pad(labels[:, 1:], (0, 1), value=ignore_index)
        positions = cp.positions(seq_len, window_size=window_size).to(input_ids.device).expand(batch, -1)
        return ({"input_ids": cp.shard(input_ids, seq_dim=1, window_size=window_size), "position_ids": positions},
                cp.shard(shift_labels, seq_dim=1, window_size=window_size))
    labels = labels.clone()
    labels[:, cu[:-1].long().to(labels.device)] = ignore_index  # a document's first token is nobody's target
    shift_labels = F.pad(labels[:, 1:], (0, 1), value=ignore_index)
    packed = {"cu_seqlens": cu, "window_size": window_size}
    positions = cp.positions(seq_len, **packed).to(input_ids.device)[None]
    longest = int(cu.diff().max())
    inputs = {"input_ids": cp.shard(input_ids, seq_dim=1, **packed), "position_ids": positions,
              "cu_seq_lens_q": cu, "cu_seq_lens_k": cu, "max_length_q": longest, "max_length_k": longest}
    return inputs, cp.shard(shift_labels, seq_dim=1, **packed)


def _packed_rows(input_ids, labels, attention_mask, position_ids, cu_seq_lens, where):
    """A padded batch packed into one row, one document per row with real tokens: (input_ids, labels, cu_seqlens)."""
    if position_ids is not None or cu_seq_lens is not None:
        raise ValueError(f"{where}: pass attention_mask (a padded batch, which shard_batch packs) or position_ids / "
                         "cu_seq_lens (a batch packed already), not both")
    if not isinstance(attention_mask, torch.Tensor) or attention_mask.shape != input_ids.shape:
        raise ValueError(f"{where}: attention_mask must be a tensor of input_ids' shape {tuple(input_ids.shape)}, "
                         f"got {getattr(attention_mask, 'shape', type(attention_mask).__name__)}")
    real = attention_mask.to(input_ids.device)
    if real.dtype != torch.bool:
        if real.is_floating_point() or real.is_complex() or not bool(((real == 0) | (real == 1)).all()):
            raise ValueError(f"{where}: attention_mask must hold 0 and 1 (a padding mask), got dtype {real.dtype} "
                             "with other values")
        real = real.bool()
    counts = real.sum(1)
    first = real.int().argmax(1)
    offset = torch.arange(real.shape[1], device=real.device)[None] - first[:, None]
    holes = (real != ((offset >= 0) & (offset < counts[:, None]))).any(1).nonzero().flatten()
    if len(holes):
        raise ValueError(f"{where}: attention_mask rows {holes.tolist()} have padding between real tokens; only left "
                         "or right padding packs into documents")
    if not bool(counts.any()):
        raise ValueError(f"{where}: attention_mask holds no real token")
    cu = torch.cat([counts.new_zeros(1), counts[counts > 0].cumsum(0)]).to(torch.int32)
    return input_ids[real][None], labels[real.to(labels.device)][None], cu


def _batch_packing(input_ids, position_ids, cu_seq_lens, where):
    """The global cu_seqlens (int32, on input_ids' device) that ``position_ids`` and/or ``cu_seq_lens``
    give a packed batch, checked against each other and the tokens; None for neither."""
    if position_ids is None and cu_seq_lens is None:
        return None
    batch, seq_len = input_ids.shape
    if batch != 1:
        raise ValueError(f"{where}: packed documents (position_ids or cu_seq_lens) need batch 1 (one row of "
                         f"concatenated documents, as DataCollatorWithFlattening makes), got batch {batch}")
    from_positions = None
    if position_ids is not None:
        if not isinstance(position_ids, torch.Tensor) or tuple(position_ids.shape) != (1, seq_len):
            raise ValueError(f"{where}: position_ids must be a (1, {seq_len}) tensor like input_ids, got "
                             f"{getattr(position_ids, 'shape', type(position_ids).__name__)}")
        from_positions, _ = _documents_of_positions(position_ids.to(input_ids.device))
        in_document = doc_positions(tuple(from_positions.tolist()))
        wrong = (position_ids[0].cpu() != in_document).nonzero().flatten()
        if wrong.numel():
            i = int(wrong[0])
            raise ValueError(f"{where}: position_ids must count 0, 1, 2, ... inside every document (restart at 0 "
                             f"where a document starts); token {i} has position {int(position_ids[0, i])}, its "
                             f"document's count says {int(in_document[i])}")
    if cu_seq_lens is None:
        return from_positions
    if not isinstance(cu_seq_lens, torch.Tensor) or cu_seq_lens.dim() != 1 or cu_seq_lens.dtype.is_floating_point:
        raise ValueError(f"{where}: cu_seq_lens must be a 1-D integer tensor, got "
                         f"{getattr(cu_seq_lens, 'shape', type(cu_seq_lens).__name__)}")
    cu = cu_seq_lens.to(device=input_ids.device, dtype=torch.int32)
    check_cu_seqlens(cu, seq_len, seq_len, cu.device, "cu_seq_lens", where)
    if bool((cu.diff() == 0).any()):
        raise ValueError(f"{where}: cu_seq_lens holds an empty document: {cu.tolist()}")
    if from_positions is not None and not torch.equal(cu, from_positions):
        raise ValueError(f"{where}: position_ids and cu_seq_lens describe different packings: the positions "
                         f"restart at {from_positions.tolist()[:-1]}, cu_seq_lens is {cu.tolist()}")
    return cu


def causal_lm_loss(logits, shift_labels, cp, ignore_index=-100):
    """This rank's share of the batch's mean next-token cross-entropy (float32).

    The sum of this rank's token losses over the number of targets on all ranks
    (one all-reduce), so the shares of all ranks add up to the single-device loss
    and backpropagating each rank's share gives every rank its part of the gradient.
    """
    count = (shift_labels != ignore_index).sum()
    dist.all_reduce(count, group=cp.group)
    local = F.cross_entropy(logits.float().flatten(0, 1), shift_labels.flatten().to(logits.device),
                            ignore_index=ignore_index, reduction="sum")
    return local / count.to(local.device)


def all_reduce_gradients(model, cp):
    """Sum every parameter's gradient over the context-parallel group (after the backward of ``causal_lm_loss``)."""
    for param in model.parameters():
        if param.grad is not None:
            dist.all_reduce(param.grad, group=cp.group)
