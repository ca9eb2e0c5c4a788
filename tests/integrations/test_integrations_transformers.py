"""Hugging Face transformers models with attn_implementation="cpattn" on one device.

Tiny randomly initialised Llama, Qwen2, Mistral (sliding window), Gemma 2
(softcap) and gpt-oss (sinks) models built in code (no download): logits, loss
and every parameter's gradient match transformers' own "sdpa" (or "eager")
attention in float32; packed documents match the model run on each document
alone, padded batches (and left-padded KV-cache decoding) match "sdpa" with the
same mask; every input cpattn cannot honour is refused with an error naming it.
"""
import subprocess
import sys

import pytest
import torch

transformers = pytest.importorskip("transformers", reason="transformers is not installed "
                                   "(pip install -e '.[transformers]'; CI installs it through the test extra)")

import cpattn.integrations.transformers as cpattn_hf  # noqa: E402
from cpattn.examples.train_transformers import build_model, tiny_config  # noqa: E402
from reference import rel_err  # noqa: E402

TOL = 1e-4


def train_step(model, input_ids, *args, run=None, **kwargs):
    """(logits, loss, {name: grad of model}) of one forward and backward through ``run`` (default: model)."""
    out = (model if run is None else run)(input_ids, *args, labels=input_ids, use_cache=False, **kwargs)
    out.loss.backward()
    return out.logits.detach(), out.loss.detach(), {n: p.grad for n, p in model.named_parameters()}


def assert_matches(config, reference_impl, input_ids, **kwargs):
    """The "cpattn" model's logits, loss and all gradients equal the ``reference_impl`` model's."""
    torch.manual_seed(0)
    reference = build_model(config, reference_impl)
    model = build_model(config, "cpattn", reference.state_dict())
    assert model.config._attn_implementation == "cpattn"
    want, got = train_step(reference, input_ids, **kwargs), train_step(model, input_ids, **kwargs)
    assert rel_err(got[0], want[0]) < TOL
    assert rel_err(got[1], want[1]) < TOL
    assert got[2].keys() == want[2].keys() and len(got[2]) > 10
    errors = {name: rel_err(got[2][name], want[2][name]) for name in want[2]}
    assert max(errors.values()) < TOL, errors


def tokens(batch, seq_len, seed=0):
    return torch.randint(0, 128, (batch, seq_len), generator=torch.Generator().manual_seed(seed))


def gemma2_config(softcap):
    from transformers import Gemma2Config
    # a window of 8 on every other layer; a small cap, so that capping changes the logits noticeably
    return Gemma2Config(vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                        num_attention_heads=4, num_key_value_heads=2, head_dim=16, query_pre_attn_scalar=16,
                        sliding_window=8, attn_logit_softcapping=softcap, final_logit_softcapping=None)


# transformers' sdpa has no softcap and no sinks: Gemma 2 and gpt-oss are compared with its eager attention
@pytest.mark.parametrize("family, overrides, reference_impl, batch, seq_len", [
    ("llama", {}, "sdpa", 2, 64),                            # GQA 4:2
    ("qwen2", {"head_dim": 40}, "sdpa", 1, 37),              # q/k/v biases, a head dim that is not a power of 2
    ("mistral", {"sliding_window": 4096}, "sdpa", 2, 50),    # a window longer than the sequence masks nothing
    ("mistral", {"sliding_window": 16}, "sdpa", 1, 40),      # sliding-window attention
    ("gemma2", {}, "eager", 1, 32),                          # logit softcapping, sliding window on layer 0
    ("gpt_oss", {}, "eager", 1, 32),                         # attention sinks, sliding window on layer 0
])
def test_model_matches_transformers(family, overrides, reference_impl, batch, seq_len):
    config = gemma2_config(0.05) if family == "gemma2" else tiny_config(family, **overrides)
    assert_matches(config, reference_impl, tokens(batch, seq_len))


def test_gemma2_softcap_is_exercised():
    """The cap of test_model_matches_transformers[gemma2] changes the logits well beyond the tolerance."""
    torch.manual_seed(0)
    capped = build_model(gemma2_config(0.05), "eager")
    uncapped = build_model(gemma2_config(None), "eager", capped.state_dict())
    ids = tokens(1, 32)
    with torch.no_grad():
        assert rel_err(capped(ids).logits, uncapped(ids).logits) > 10 * TOL


def test_all_ones_attention_mask_is_no_mask():
    ids = tokens(2, 24)
    assert_matches(tiny_config("llama"), "sdpa", ids, attention_mask=torch.ones_like(ids))


@pytest.mark.parametrize("family, overrides", [("llama", {}), ("mistral", {"sliding_window": 8})])
def test_kv_cache_decoding_matches_sdpa(family, overrides):
    config, ids = tiny_config(family, **overrides), tokens(2, 20)
    logits = {}
    torch.manual_seed(0)
    reference = build_model(config, "sdpa")
    for impl, model in (("sdpa", reference), ("cpattn", build_model(config, "cpattn", reference.state_dict()))):
        cache = transformers.DynamicCache(config=model.config)  # sliding-window layers keep the newest keys only
        with torch.no_grad():  # the cache is the 4th positional argument (renamed in transformers 5.x)
            model(ids[:, :-3], None, None, cache, use_cache=True)
            logits[impl] = model(ids[:, -3:], None, None, cache, use_cache=True).logits  # 3 new queries
    assert rel_err(logits["cpattn"], logits["sdpa"]) < TOL


def test_attention_dropout_in_training_is_refused():
    model = build_model(tiny_config("llama", attention_dropout=0.1), "cpattn").train()
    ids = tokens(1, 16)
    with pytest.raises(NotImplementedError, match=r"LlamaAttention \(layer 0\) needs attention dropout"):
        model(ids, labels=ids, use_cache=False)
    model.eval()(ids, labels=ids, use_cache=False)  # no dropout in eval mode: runs


DOCUMENTS = (0, 10, 11, 17, 30)  # packed documents of 10, 1, 6 and 13 tokens


def logits_and_grads(model, input_ids, weight, **kwargs):
    """Logits and every parameter's gradient of sum(logits * weight) (a loss that sees every position)."""
    model.zero_grad()
    logits = model(input_ids, use_cache=False, **kwargs).logits
    (logits * weight).sum().backward()
    return logits.detach(), {n: p.grad.clone() for n, p in model.named_parameters()}


def assert_close(got, want):
    assert rel_err(got[0], want[0]) < TOL
    errors = {name: rel_err(got[1][name], want[1][name]) for name in want[1]}
    assert max(errors.values()) < TOL, errors


@pytest.mark.parametrize("family, overrides", [("llama", {}), ("mistral", {"sliding_window": 5})])
@pytest.mark.parametrize("how", ["position_ids", "flash-attention kwargs"])
def test_packed_sequences_attend_within_each_document(family, overrides, how):
    """Packed documents (position_ids that restart, or DataCollatorWithFlattening's flash-attention kwargs)
    give each document's own logits and gradients: the model run on every document alone is the reference."""
    config, ids = tiny_config(family, **overrides), tokens(1, DOCUMENTS[-1])
    torch.manual_seed(0)
    reference = build_model(config, "sdpa")
    model = build_model(config, "cpattn", reference.state_dict())
    weight = torch.randn(1, DOCUMENTS[-1], config.vocab_size, generator=torch.Generator().manual_seed(2))
    pieces = list(zip(DOCUMENTS[:-1], DOCUMENTS[1:]))
    kwargs = {"position_ids": torch.cat([torch.arange(end - start) for start, end in pieces])[None]}
    if how == "flash-attention kwargs":
        cu = torch.tensor(DOCUMENTS, dtype=torch.int32)
        longest = max(end - start for start, end in pieces)
        kwargs.update(cu_seq_lens_q=cu, cu_seq_lens_k=cu, max_length_q=longest, max_length_k=longest)
    got = logits_and_grads(model, ids, weight, **kwargs)
    reference.zero_grad()
    want_logits = []
    for start, end in pieces:
        logits = reference(ids[:, start:end], use_cache=False).logits
        (logits * weight[:, start:end]).sum().backward()  # gradients add up over the documents
        want_logits.append(logits.detach())
    assert_close(got, (torch.cat(want_logits, dim=1), {n: p.grad for n, p in reference.named_parameters()}))


def test_packed_kwargs_compile_with_fullgraph():
    """DataCollatorWithFlattening's kwargs (host ints and a cu_seqlens tensor) trace without a graph break."""
    model, ids = build_model(tiny_config("llama"), "cpattn"), tokens(1, DOCUMENTS[-1])
    cu = torch.tensor(DOCUMENTS, dtype=torch.int32)
    kwargs = {"position_ids": torch.cat([torch.arange(b - a) for a, b in zip(DOCUMENTS, DOCUMENTS[1:])])[None],
              "cu_seq_lens_q": cu, "cu_seq_lens_k": cu, "max_length_q": 13, "max_length_k": 13, "use_cache": False}
    with torch.no_grad():
        want = model(ids, **kwargs).logits
        got = torch.compile(model, fullgraph=True)(ids, **kwargs).logits
    assert rel_err(got, want) < TOL


@pytest.mark.parametrize("family, overrides", [("llama", {}), ("mistral", {"sliding_window": 6})])
def test_padded_batch_matches_sdpa(family, overrides):
    """A padding mask (right and left padded rows): the real tokens' logits and the gradients of a loss
    over them equal transformers' sdpa with the same mask."""
    config, ids = tiny_config(family, **overrides), tokens(3, 16)
    mask = torch.ones(3, 16, dtype=torch.long)
    mask[0, 11:] = 0  # right padding
    mask[1, :4] = 0   # left padding
    weight = torch.randn(3, 16, config.vocab_size, generator=torch.Generator().manual_seed(3))
    weight = weight * mask[..., None]  # padded positions take no part in the loss
    torch.manual_seed(0)
    reference = build_model(config, "sdpa")
    model = build_model(config, "cpattn", reference.state_dict())
    got = logits_and_grads(model, ids, weight, attention_mask=mask)
    want = logits_and_grads(reference, ids, weight, attention_mask=mask)
    real = mask.bool()
    assert_close((got[0][real], got[1]), (want[0][real], want[1]))


def test_left_padded_generation_with_a_kv_cache_matches_sdpa():
    config, ids = tiny_config("llama"), tokens(2, 12)
    mask = torch.ones(2, 12, dtype=torch.long)
    mask[0, :5] = 0  # a shorter prompt, left padded as generate() pads
    torch.manual_seed(0)
    reference = build_model(config, "sdpa")
    logits = {}
    for impl, model in (("sdpa", reference), ("cpattn", build_model(config, "cpattn", reference.state_dict()))):
        cache = transformers.DynamicCache(config=model.config)
        positions = (mask.cumsum(1) - 1).clamp(min=0)
        with torch.no_grad():  # the cache is the 4th positional argument (renamed in transformers 5.x)
            model(ids[:, :-3], mask[:, :-3], positions[:, :-3], cache, use_cache=True)
            logits[impl] = model(ids[:, -3:], mask, positions[:, -3:], cache, use_cache=True).logits
    assert rel_err(logits["cpattn"], logits["sdpa"]) < TOL


@pytest.mark.parametrize("kwargs, match", [
    ({"output_attentions": True}, "output_attentions"),
    ({"attention_mask": torch.tensor([[1] * 14 + [0] * 2]), "cu_seq_lens_q": torch.tensor([0, 10, 16]),
      "cu_seq_lens_k": torch.tensor([0, 10, 16]), "max_length_q": 10, "max_length_k": 10},
     "padding mask together with packed sequences"),
])
def test_model_inputs_cpattn_cannot_honour_are_refused(kwargs, match):
    model = build_model(tiny_config("llama"), "cpattn")
    ids = tokens(1, 16)
    with pytest.raises(NotImplementedError, match=match):
        model(ids, labels=ids, use_cache=False, **kwargs)


class _Attention(torch.nn.Module):
    is_causal, layer_idx = True, 3


def _qkv(q_len, k_len):
    gen = torch.Generator().manual_seed(1)
    return (torch.randn(1, 4, q_len, 16, generator=gen),
            *(torch.randn(1, 2, k_len, 16, generator=gen) for _ in range(2)))


@pytest.mark.parametrize("kwargs, match", [
    ({"position_bias": torch.zeros(1, 4, 8, 8)}, "position bias"),
    ({"is_causal": False, "sliding_window": 4}, "bidirectional sliding window"),
])
def test_attention_features_are_refused_by_name(kwargs, match):
    with pytest.raises(NotImplementedError, match=match):
        cpattn_hf.cpattn_attention(_Attention(), *_qkv(8, 8), None, **kwargs)


def test_keys_past_the_newest_query_are_refused():
    q, k, v = _qkv(1, 8)  # one query against 8 cached keys
    with pytest.raises(NotImplementedError, match="keys extend past the newest query"):
        cpattn_hf.cpattn_attention(_Attention(), q, k, v, None, position_ids=torch.tensor([[3]]))  # a StaticCache
    out, weights = cpattn_hf.cpattn_attention(_Attention(), q, k, v, None, position_ids=torch.tensor([[7]]),
                                              scaling=0.3)
    want = torch.nn.functional.scaled_dot_product_attention(q, k, v, scale=0.3, enable_gqa=True).transpose(1, 2)
    assert weights is None and rel_err(out, want) < TOL


def test_a_static_caches_empty_slots_are_masked_out():
    """With the 2-D mask transformers passes for a StaticCache (shorter than the keys: the slots past it
    are empty) a query at position 3 sees keys 0..3 only, and a custom 4-D mask is refused."""
    q, k, v = _qkv(1, 8)
    out, _ = cpattn_hf.cpattn_attention(_Attention(), q, k, v, torch.ones(1, 4, dtype=torch.bool),
                                        position_ids=torch.tensor([[3]]), scaling=0.3)
    want = torch.nn.functional.scaled_dot_product_attention(q, k[:, :, :4], v[:, :, :4], scale=0.3,
                                                            enable_gqa=True).transpose(1, 2)
    assert rel_err(out, want) < TOL
    with pytest.raises(NotImplementedError, match="4-D attention mask"):
        cpattn_hf.cpattn_attention(_Attention(), q, k, v, torch.ones(1, 1, 1, 8, dtype=torch.bool))


def test_cp_attention_outside_context_parallel_block():
    with pytest.raises(RuntimeError, match="inside `with cpattn.integrations.transformers.context_parallel"):
        cpattn_hf.cpattn_cp_attention(_Attention(), *_qkv(8, 8), None)
    with pytest.raises(TypeError, match="expected a cpattn.ContextParallel"):
        cpattn_hf.context_parallel("cp")


def test_compiled_model_matches_eager():
    torch.manual_seed(0)
    model = build_model(tiny_config("llama"), "cpattn")
    ids, positions = tokens(1, 32), torch.arange(32)[None]
    want = train_step(model, ids, position_ids=positions)
    model.zero_grad()
    try:
        compiled = torch.compile(model, fullgraph=True)
        got = train_step(model, ids, position_ids=positions, run=compiled)
        assert rel_err(got[0], want[0]) < TOL and rel_err(got[1], want[1]) < TOL
        assert max(rel_err(got[2][name], want[2][name]) for name in want[2]) < TOL
        with pytest.raises(NotImplementedError, match="packed sequences"):  # same shapes: no recompilation
            train_step(model, ids, position_ids=positions % 16, run=compiled)
    finally:
        torch._dynamo.reset()


def test_importing_cpattn_does_not_import_transformers():
    code = ("import sys, cpattn, cpattn.integrations.transformers, cpattn.examples.train_transformers; "
            "print('transformers' in sys.modules)")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "False"
