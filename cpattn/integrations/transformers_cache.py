"""Hugging Face ``generate()`` over a KV cache sharded along the sequence (``cpattn.ShardedKVCache``).

    cache = ShardedCache(model.config, batch_size=2, max_cache_len=256)      # collective over the group
    out_ids = model.generate(input_ids, attention_mask=mask, cache=cache, max_new_tokens=32, do_sample=False)

The model is built with ``attn_implementation="cpattn_cp"`` and every rank of the cache's group
runs it on the same ``input_ids``: the layers' weights and activations are replicated, each
layer's keys and values are sharded (``ShardedKVCache``), and its attention runs where they live:

* ``ShardedLayer.update`` (transformers calls it with the new keys and values just before the
  attention) stores nothing: it hands the new k, v back and remembers them, so that the
  "cpattn_cp" attention called next with these very tensors knows which layer of which cache
  they belong to (``layer_of_update``);
* the attention then calls ``cpattn.decode`` for a step of one new token per sequence, and for
  a prompt (or any longer step) ``cpattn.prefill`` on the real tokens packed (``cu_seqlens``),
  split over the ranks (``split_chunk``, zigzag) and gathered back (``gather_chunk``).

Left padding (how ``generate`` batches prompts of different lengths) is never stored: sequence
b's cache holds its real tokens only, at positions 0, 1, ... from its first real token, which
are the positions ``generate`` gives them (the attention mask's running count). The padding
rows' outputs are 0. The attention mask must be left padding only (zeros before a sequence's
first token, in the call that brings that token); anything else raises.

transformers is imported by this module: ``cpattn.integrations.transformers`` loads it on first
use of ``ShardedCache`` or ``transfer_cache``.
"""
from typing import NamedTuple

import torch
import torch.distributed as dist
from transformers.cache_utils import Cache, CacheLayerMixin

import cpattn
from cpattn.agreement import agree
from cpattn.comm import gather_rows
from cpattn.inference import gather_chunk

from .transformers import PACKED_KWARGS, cpattn_arguments, layer_name

ATTENTION_LAYER_TYPES = ("full_attention", "sliding_attention")
SPLIT = "zigzag"  # how a prompt's tokens are split over the ranks: balanced causal work for pass-KV

# The one update the next "cpattn_cp" attention call consumes: (layer, key tensor). transformers calls a
# layer's update and then its attention, with the tensors update returned, before any other layer runs.
_last_update = []


def layer_of_update(key):
    """The ``ShardedLayer`` whose ``update`` returned ``key`` just now (consumed), or None."""
    if _last_update and _last_update[0][1] is key:
        return _last_update.pop()[0]
    return None


class StepCall(NamedTuple):
    """What must be the same on every rank in one attention step over a ``ShardedLayer`` (agreement.py)."""
    layer: int
    columns: int  # tokens (padding included) the cache has seen before this step
    query_len: int
    new_tokens: tuple  # real (not padding) new tokens of each sequence

    FIXES = {"new_tokens": "pass the same input_ids and attention_mask on every rank",
             "query_len": "pass the same input_ids on every rank",
             "columns": "use the cache on every rank of its group for the same calls"}


class ShardedLayer(CacheLayerMixin):
    """One layer of a ``ShardedCache``: its ``ShardedKVCache`` (``kv``) and the number of columns (tokens,
    padding included) the model has fed it, which is what transformers calls the sequence length."""
    is_compileable = False
    is_sliding = False  # every token is kept; a sliding window is applied by the attention
    is_croppable = False

    def __init__(self, kv, index):
        super().__init__()
        self.kv, self.index = kv, index
        self.columns = 0
        self.awaiting_attention = False
        self.is_initialized = True  # the storage exists from the start

    def lazy_initialization(self, key_states, value_states):
        pass

    def update(self, key_states, value_states, *args, **kwargs):
        """Remember the new keys and values for the attention call that follows; store nothing yet."""
        if self.awaiting_attention:
            raise RuntimeError(f"ShardedCache: layer {self.index}'s previous keys never reached the 'cpattn_cp' "
                               "attention (is the model built with attn_implementation='cpattn_cp'? did that call "
                               "fail? call cache.reset() to start again)")
        self.awaiting_attention = True
        _last_update[:] = [(self, key_states)]
        return key_states, value_states

    def get_seq_length(self):
        return self.columns

    def get_mask_sizes(self, query_length):
        return self.columns + query_length, 0

    def get_max_length(self):
        return self.kv.capacity

    def reset(self):
        self.kv.reset()
        self.columns = 0
        self.awaiting_attention = False

    def _refuse(self, what):
        raise NotImplementedError(f"ShardedCache: {what} is not supported (no beam search or assisted decoding over a "
                                  "sharded cache)")

    reorder_cache = (lambda self, *args: self._refuse("reordering the batch (beam search)"))
    crop = (lambda self, *args: self._refuse("cropping (assisted decoding)"))
    batch_repeat_interleave = (lambda self, *args: self._refuse("repeating the batch"))
    batch_select_indices = (lambda self, *args: self._refuse("selecting from the batch"))
    offload = prefetch = (lambda self, *args: self._refuse("offloading"))

    # ---- the attention of one step ---------------------------------------------------------------------
    def _new_tokens(self, attention_mask, batch, q_len, where):
        """Real new tokens of each sequence (host int64, (batch,)) and their rows in the (batch * q_len)
        flattened step, after checking that the mask is left padding the cache can follow."""
        if batch != self.kv.batch:
            raise ValueError(f"{where}: the batch holds {batch} sequences but the ShardedCache was built for "
                             f"batch_size={self.kv.batch}")
        cached = self.kv.seqlens
        if attention_mask is None:  # no padding in this step, nor before it (the mask would keep it)
            if not bool((cached == self.columns).all()):
                raise ValueError(f"{where}: no attention mask, but the cache holds {cached.tolist()} real tokens of "
                                 f"the {self.columns} seen (padding before): pass the attention mask")
            return torch.full((batch,), q_len, dtype=torch.int64), None
        if attention_mask.dim() != 2 or attention_mask.shape[1] != self.columns + q_len:
            raise NotImplementedError(f"{where}: the attention mask {tuple(attention_mask.shape)} is not the 2-D "
                                      f"padding mask of the {self.columns} tokens seen and {q_len} new ones that a "
                                      "ShardedCache follows (register()'s mask function gives it)")
        mask = attention_mask.bool().cpu()
        new = mask[:, -q_len:]
        counts = new.sum(1)
        left_padded = torch.arange(q_len)[None, :] >= (q_len - counts)[:, None]
        if not torch.equal(new, left_padded) or bool(((counts < q_len) & (cached > 0)).any()):
            raise NotImplementedError(f"{where}: padding other than left padding before a sequence's first token "
                                      f"(new tokens' mask {new.int().tolist()}, cached lengths {cached.tolist()})")
        if not torch.equal(mask.sum(1), cached + counts):
            raise ValueError(f"{where}: the attention mask holds {mask.sum(1).tolist()} real tokens per sequence "
                             f"but the cache {cached.tolist()} plus {counts.tolist()} new ones (a cache used with "
                             "other inputs? cache.reset() starts again)")
        return counts, new.flatten().nonzero().flatten()

    def attend(self, module, query, key, value, attention_mask, dropout, scaling, kwargs):
        """This step's attention over the sharded cache, (B, L, H, D), the same on every rank; stores k, v."""
        where = f"ShardedCache ({layer_name(module)})"
        self.awaiting_attention = False
        batch, _, q_len, _ = query.shape

        def check():
            if torch.compiler.is_compiling():
                raise NotImplementedError(f"{where}: torch.compile of a model over a ShardedCache")
            packed = [name for name in PACKED_KWARGS if kwargs.get(name) is not None]
            if packed:
                raise NotImplementedError(f"{where}: packed sequences ({', '.join(packed)}) over a ShardedCache")
            counts, rows = self._new_tokens(attention_mask, batch, q_len, where)
            causal, extras = cpattn_arguments(module, dropout, int((self.kv.seqlens + counts).max()), kwargs, where)
            if not causal:
                raise NotImplementedError(f"{where}: {layer_name(module)} is not causal; a KV cache serves causal "
                                          "decoders")
            state.update(counts=counts, rows=rows, extras=extras)
            return StepCall(self.index, self.columns, q_len, tuple(counts.tolist()))
        state = {}
        agree(where, check, comm=self.kv.comm if self.kv.check_across_ranks else None, hint=query)
        q, k, v = (t.transpose(1, 2) for t in (query, key, value))  # (B, L, heads, D)
        counts, rows, options = state["counts"], state["rows"], dict(softmax_scale=scaling, **state["extras"])
        if q_len == 1 and bool((counts == 1).all()):
            out = cpattn.decode(self.kv, q, k, v, **options)
        else:
            out = self._prefill(q, k, v, counts, rows, options)
        self.columns += q_len
        return out

    def _prefill(self, q, k, v, counts, rows, options):
        """The real tokens of the step, packed, split over the ranks and prefilled; the outputs gathered
        back into (B, L, H, D), zeros at the padding."""
        batch, q_len = q.shape[:2]
        flat = [t.reshape(batch * q_len, *t.shape[2:]) for t in (q, k, v)]
        if rows is not None:
            flat = [t[rows.to(t.device)] for t in flat]
        n = int(counts.sum())
        out = q.new_zeros(batch * q_len, *q.shape[2:])
        if n:
            cu = torch.cat([counts.new_zeros(1), counts.cumsum(0)]).to(torch.int32)
            (q_i, index), (k_i, _), (v_i, _) = (cpattn.split_chunk(t[None], self.kv, order=SPLIT) for t in flat)
            local = cpattn.prefill(self.kv, q_i, k_i, v_i, token_index=index, cu_seqlens=cu, **options)
            full = gather_chunk(local, self.kv, n, order=SPLIT)[0]
            if rows is None:
                out = full
            else:
                out[rows.to(out.device)] = full
        return out.view(q.shape)


def _attention_shape(config, where):
    """(the text config, kv heads, head dim) of ``config``'s layers; refuses layers that are not attention."""
    text = config.get_text_config() if hasattr(config, "get_text_config") else config
    kinds = set(getattr(text, "layer_types", None) or ["full_attention"])
    if not kinds <= set(ATTENTION_LAYER_TYPES):
        raise NotImplementedError(f"{where}: layer types {sorted(kinds - set(ATTENTION_LAYER_TYPES))} are not "
                                  "attention layers a ShardedCache holds")
    heads = text.num_attention_heads
    head_dim = getattr(text, "head_dim", None) or text.hidden_size // heads
    return text, getattr(text, "num_key_value_heads", None) or heads, head_dim


class ShardedCache(Cache):
    """A transformers ``Cache`` of one ``cpattn.ShardedKVCache`` per layer, sharded over ``group``.

    ``config``: the model's config (its attention implementation must be "cpattn_cp");
    ``batch_size`` sequences of up to ``max_cache_len`` real tokens (padding is not stored);
    ``dtype`` (default: the config's, else float32) and ``device`` of the keys; ``page_size``,
    ``stripe``, ``timeout``: as ``ShardedKVCache``. Collective over ``group`` (None: the default
    group, or one process without torch.distributed): every rank builds it alike. ``close()``
    gives back the process group. ``reset()`` empties it for the next batch.
    """

    def __init__(self, config, batch_size, max_cache_len, group=None, dtype=None, device=None, page_size=None,
                 stripe=None, timeout=30.0):
        where = "ShardedCache"
        implementation = getattr(config, "_attn_implementation", None)
        if implementation != "cpattn_cp":
            raise ValueError(f"{where}: the model's attention implementation is {implementation!r}; build it with "
                             "attn_implementation='cpattn_cp' (after cpattn.integrations.transformers.register())")
        text, kv_heads, head_dim = _attention_shape(config, where)
        if dtype is None:
            dtype = text.dtype if isinstance(getattr(text, "dtype", None), torch.dtype) else torch.float32
        layers = [ShardedLayer(cpattn.ShardedKVCache(batch_size, max_cache_len, kv_heads, head_dim, dtype=dtype,
                                                     device=device, group=group, page_size=page_size,
                                                     stripe=stripe, timeout=timeout), index)
                  for index in range(text.num_hidden_layers)]
        super().__init__(layers=layers)

    def close(self):
        for layer in self.layers:
            layer.kv.close()


class TransferCall(NamedTuple):
    """What must be the same on every rank of one ``transfer_cache`` of ShardedCaches."""
    layers: int


def transfer_cache(src, dst, group=None):
    """Hand a prefilled ``ShardedCache`` from a prefill group to a decode group's empty one (same model and
    batch size): ``cpattn.transfer_cache`` layer by layer, all waited for, then the count of tokens seen
    (``get_seq_length``), so that ``generate`` continues on the decode group. Collective over ``group``
    (default: the default group), which holds every rank of both; each rank passes its cache of each side,
    or None."""
    where = "ShardedCache transfer_cache"
    group = group or dist.group.WORLD

    def check():
        caches = [c for c in (src, dst) if c is not None]
        if not caches or any(not isinstance(c, ShardedCache) for c in caches):
            raise TypeError(f"{where}: pass this rank's ShardedCache of either side (None for a side it is not "
                            f"in), got {type(src).__name__} and {type(dst).__name__}")
        if len({len(c.layers) for c in caches}) != 1:
            raise ValueError(f"{where}: the caches hold different numbers of layers")
        return TransferCall(len(caches[0].layers))
    depth = agree(where, check, group=group).layers
    # Layer i + 1 is posted before layer i is waited for: the transfers overlap, two layers' messages at most
    # are in flight.
    previous = None
    for i in range(depth):
        transfer = cpattn.transfer_cache(None if src is None else src.layers[i].kv,
                                         None if dst is None else dst.layers[i].kv, group=group)
        if previous is not None:
            previous.wait()
        previous = transfer
    previous.wait()
    hint = (src or dst).layers[0].kv.k
    seen = max(row[0] for row in gather_rows(group, [-1 if src is None else src.layers[0].columns], hint))
    if dst is not None:
        for layer in dst.layers:
            layer.columns = seen
