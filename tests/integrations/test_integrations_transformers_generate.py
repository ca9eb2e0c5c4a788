"""Hugging Face generate() over a sequence-sharded KV cache (cpattn.integrations.transformers.ShardedCache).

Tiny Llama (GQA), Qwen2 (biases, head dim 40), Mistral (sliding window 8) and gpt-oss (sinks, a window of 8
on layer 0) models with random weights generate greedily from a left-padded batch of two prompts (7 and 13
real tokens): the tokens must equal transformers' own generate() ("sdpa", "eager" for gpt-oss) and the
logits of every step agree to float32 rounding. The default run (about 2 minutes of 2 loaded cores) keeps
it short: 2 ranks, the four families, 12 tokens, then the cache prefilled on both ranks and handed to a
1-rank decode group (transfer_cache) that generates 32 tokens, a mask that differs on one rank making
every rank raise, and a fault on one rank inside a decode step making the other raise PeerFailure in bounded
time; 4 ranks, Llama and gpt-oss, 8 tokens; the torchrun example on 2 ranks; Gemma 2 and
generate()'s chunked prefill on one process. ``-m slow``: the four families, 32 tokens, on 1, 2 and 4 ranks.
One run_ranks call per group size.
"""
import subprocess
import sys
import time

import pytest
import torch

pytest.importorskip("transformers", reason="transformers is not installed (pip install -e '.[transformers]')")

import torch.distributed as dist  # noqa: E402

import cpattn.integrations.transformers as cpattn_hf  # noqa: E402
from cpattn.examples.train_transformers import build_model, tiny_config  # noqa: E402
from cpattn.faults import inject_faults  # noqa: E402
from cpattn.testing import run_ranks  # noqa: E402
from fault_scenarios import fault_hook, outcome  # noqa: E402

FAMILIES = {"llama": {}, "qwen2": {"head_dim": 40}, "mistral": {"sliding_window": 8}, "gpt_oss": {}}
NEW_TOKENS = 32   # the length: the slow runs and the transfer
LOGIT_TOL = 1e-4
FAULT_TIMEOUT = 6.0  # the caches' timeout in the fault case


def prompts():
    """Two prompts of 7 and 13 tokens, left padded (token 0) as generate() batches them."""
    ids = torch.randint(1, 128, (2, 13), generator=torch.Generator().manual_seed(0))
    mask = torch.ones_like(ids)
    mask[0, :6] = 0
    return ids.masked_fill(mask == 0, 0), mask


GENERATE = dict(do_sample=False, pad_token_id=0, return_dict_in_generate=True, output_logits=True)


def models(family):
    """(reference model, "cpattn_cp" model with the same weights)."""
    config = tiny_config(family, **FAMILIES[family])
    torch.manual_seed(0)
    reference = build_model(config, "eager" if family == "gpt_oss" else "sdpa")  # sdpa has no sinks
    return reference, build_model(config, "cpattn_cp", reference.state_dict())


def compare(want, got):
    """(tokens identical, largest logit difference over every step)."""
    same = torch.equal(want.sequences, got.sequences)
    return same, max(float((a - b).abs().max()) for a, b in zip(want.logits, got.logits))


def generate_every_family(rank, world, families=tuple(FAMILIES), new_tokens=NEW_TOKENS):
    ids, mask = prompts()
    results = {}
    for family in families:
        reference, model = models(family)
        want = reference.generate(ids, attention_mask=mask, max_new_tokens=new_tokens, **GENERATE)
        cache = cpattn_hf.ShardedCache(model.config, batch_size=2, max_cache_len=64)
        got = model.generate(ids, attention_mask=mask, cache=cache, max_new_tokens=new_tokens, **GENERATE)
        results[family] = compare(want, got)
        # Padding is not stored: each sequence holds its real tokens (the last generated one is not fed back).
        assert cache.layers[0].kv.seqlens.tolist() == [7 + new_tokens - 1, 13 + new_tokens - 1]
        cache.close()
    return results


def prefill_here_decode_on_rank_0(rank, world):
    """Prefill (and the first token) on both ranks, transfer_cache to a 1-rank group, the rest there."""
    ids, mask = prompts()
    reference, model = models("llama")
    for m in (reference, model):  # the restarted generate() cannot know which sequences ended: none may end
        m.generation_config.eos_token_id = None
    want = reference.generate(ids, attention_mask=mask, max_new_tokens=NEW_TOKENS, **GENERATE)
    decode_group = dist.new_group([0])
    prefill_cache = cpattn_hf.ShardedCache(model.config, batch_size=2, max_cache_len=64)
    first = model.generate(ids, attention_mask=mask, cache=prefill_cache, max_new_tokens=1, **GENERATE)
    decode_cache = cpattn_hf.ShardedCache(model.config, 2, 64, group=decode_group) if rank == 0 else None
    cpattn_hf.transfer_cache(prefill_cache, decode_cache)
    if rank != 0:
        return None
    assert decode_cache.get_seq_length() == ids.shape[1]
    rest = model.generate(first.sequences, attention_mask=torch.cat([mask, torch.ones(2, 1, dtype=mask.dtype)], 1),
                          cache=decode_cache, max_new_tokens=NEW_TOKENS - 1, **GENERATE)
    same = torch.equal(want.sequences, rest.sequences)
    return same, max(float((a - b).abs().max()) for a, b in zip(want.logits, first.logits + rest.logits))


def mask_differs_on_one_rank(rank, world):
    ids, mask = prompts()
    _, model = models("llama")
    if rank == 1:
        mask = torch.ones_like(mask)
    cache = cpattn_hf.ShardedCache(model.config, batch_size=2, max_cache_len=64)
    try:
        model.generate(ids, attention_mask=mask, cache=cache, max_new_tokens=2, **GENERATE)
    except ValueError as exc:
        return str(exc)
    return None


def fault_in_a_decode_step(rank, world):
    """Rank 1 fails inside a decode step of generate(): (what each rank raised, seconds after the fault)."""
    ids, mask = prompts()
    _, model = models("llama")
    cache = cpattn_hf.ShardedCache(model.config, batch_size=2, max_cache_len=64, timeout=FAULT_TIMEOUT)
    fault = {}
    with inject_faults(fault_hook(rank, "decode", None, 1, "raise", FAULT_TIMEOUT, fault)):
        kind, named, message = outcome(lambda: model.generate(ids, attention_mask=mask, cache=cache,
                                                               max_new_tokens=4, **GENERATE))
    return kind, named, message, time.time(), fault.get("time")


def two_rank_cases(rank, world):
    return (generate_every_family(rank, world, new_tokens=12), prefill_here_decode_on_rank_0(rank, world),
            mask_differs_on_one_rank(rank, world), fault_in_a_decode_step(rank, world))


def assert_exact(results):
    for family, (same, logit_error) in results.items():
        assert same, family
        assert logit_error < LOGIT_TOL, (family, logit_error)


@pytest.mark.slow
def test_generate_one_process():
    assert_exact(generate_every_family(0, 1))


def test_generate_two_ranks_transfer_misuse_and_fault():
    per_rank = run_ranks(two_rank_cases, 2, timeout=600)
    fault_time = per_rank[1][3][4]
    for rank, (results, transferred, misuse, fault) in enumerate(per_rank):
        assert_exact(results)
        if rank == 0:
            assert_exact({"transferred": transferred})
        assert misuse is not None and "disagree on new_tokens" in misuse, misuse
        kind, named, message, raised_at, _ = fault
        assert (kind, named) == (("RuntimeError", None) if rank == 1 else ("PeerFailure", 1)), fault
        assert raised_at - fault_time < FAULT_TIMEOUT + 8.0, fault  # 8 s: the kernels before the next exchange


def test_generate_four_ranks():
    for results in run_ranks(generate_every_family, 4, ("llama", "gpt_oss"), 8, timeout=600):
        assert_exact(results)


@pytest.mark.slow
def test_generate_two_ranks_every_family_32_tokens():
    for results in run_ranks(generate_every_family, 2, timeout=600):
        assert_exact(results)


@pytest.mark.slow
def test_generate_four_ranks_every_family_32_tokens():
    for results in run_ranks(generate_every_family, 4, timeout=600):
        assert_exact(results)


def test_gemma2_and_chunked_prefill_one_process():
    """Gemma 2 (softcap, a window of 8 on layer 0, query_pre_attn_scalar) and generate()'s chunked prefill
    (prefill_chunk_size=5: a chunk of padding only, a chunk starting with padding, then real tokens)."""
    from test_integrations_transformers import gemma2_config
    ids, mask = prompts()
    torch.manual_seed(0)
    reference = build_model(gemma2_config(0.05), "eager")
    model = build_model(gemma2_config(0.05), "cpattn_cp", reference.state_dict())
    results = {}
    for name, options in (("gemma2", {}), ("chunked prefill", {"prefill_chunk_size": 5})):
        if name == "chunked prefill":
            reference, model = models("llama")
        want = reference.generate(ids, attention_mask=mask, max_new_tokens=8, **GENERATE)
        cache = cpattn_hf.ShardedCache(model.config, batch_size=2, max_cache_len=64)
        results[name] = compare(want, model.generate(ids, attention_mask=mask, cache=cache, max_new_tokens=8,
                                                     **options, **GENERATE))
    assert_exact(results)


def test_refusals():
    """What a ShardedCache refuses, by name (one process)."""
    ids, mask = prompts()
    reference, model = models("llama")
    with pytest.raises(ValueError, match="attention implementation is 'sdpa'"):
        cpattn_hf.ShardedCache(reference.config, batch_size=2, max_cache_len=64)
    cache = cpattn_hf.ShardedCache(model.config, batch_size=3, max_cache_len=64)
    with pytest.raises(ValueError, match="batch holds 2 sequences but the ShardedCache was built for batch_size=3"):
        model.generate(ids, attention_mask=mask, cache=cache, max_new_tokens=2, **GENERATE)
    cache = cpattn_hf.ShardedCache(model.config, batch_size=4, max_cache_len=64)  # 2 prompts x 2 beams
    with pytest.raises(NotImplementedError, match="beam search"):
        model.generate(ids, attention_mask=mask, cache=cache, max_new_tokens=3, num_beams=2, do_sample=False,
                       pad_token_id=0)
    right_padded = torch.ones_like(mask)
    right_padded[0, -6:] = 0
    with pytest.raises(NotImplementedError, match="other than left padding"):
        model(ids, attention_mask=right_padded, cache=cpattn_hf.ShardedCache(model.config, 2, 64))
    cache = cpattn_hf.ShardedCache(model.config, batch_size=2, max_cache_len=16)
    with pytest.raises(ValueError, match="cache overflow"):
        model.generate(ids, attention_mask=mask, cache=cache, max_new_tokens=8, **GENERATE)
    cache = cpattn_hf.ShardedCache(model.config, batch_size=2, max_cache_len=64)
    model(ids, attention_mask=mask, cache=cache)
    with pytest.raises(ValueError, match="no attention mask, but the cache holds"):  # the padding is forgotten
        model(ids[:, :1], cache=cache)
    # A model whose attention is not "cpattn_cp" given a ShardedCache directly: the next update says so.
    cache = cpattn_hf.ShardedCache(model.config, batch_size=2, max_cache_len=64)
    reference(ids, attention_mask=mask, cache=cache)
    with pytest.raises(RuntimeError, match="never reached the 'cpattn_cp' attention"):
        reference(ids, attention_mask=mask, cache=cache)


@pytest.mark.slow  # the example's code path runs in the rank tests above; this adds torchrun itself
def test_torchrun_example_generates_like_single_device():
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node=2", "-m",
           "cpattn.examples.generate_transformers", "--max-new-tokens", "4", "--prompt-lengths", "3", "6"]
    result = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "same tokens as single-device generate(): True" in result.stdout, result.stdout
