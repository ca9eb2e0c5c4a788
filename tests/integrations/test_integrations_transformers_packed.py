"""Packed SFT through transformers with attn_implementation="cpattn_cp" (issue 20).

A batch of five documents (80 tokens, one of them a single token) made by transformers'
DataCollatorWithFlattening trains one step of a tiny Llama and a tiny Mistral (sliding
window 8) on 2 gloo ranks (zigzag) and on 4 (USP: Ulysses 2 x zigzag ring 2; a zigzag ring
of 4 is several times slower on the interpreter): ``shard_batch`` makes the packing from the
restarting position_ids (Llama, labels as plain input_ids: shard_batch ignores each
document's first label itself) or from cu_seq_lens (Mistral, the collator's labels).
Every rank's loss and every parameter's gradient must equal the single-device step
("sdpa" fed the collator's packed batch), and the tokens per rank must meet issue 20's
bound. On 2 ranks, bad packed input must raise ValueError on every rank, and a right-padded
batch (``shard_batch(attention_mask=)`` packs it) must train like the padded batch on one device.
"""
import pytest
import torch

pytest.importorskip("transformers", reason="transformers is not installed "
                    "(pip install -e '.[transformers]'; CI installs it through the test extra)")

import cpattn  # noqa: E402
import cpattn.integrations.transformers as cpattn_hf  # noqa: E402
from cpattn.examples.train_transformers import build_model, tiny_config  # noqa: E402
from test_integrations_transformers_cp import error_of, single_device_step  # noqa: E402
from cpattn.testing import run_ranks  # noqa: E402
from reference import rel_err  # noqa: E402

TOL = 1e-4
DOCUMENTS = (23, 1, 31, 6, 19)  # 80 tokens; three documents longer than Mistral's window
# family -> (config overrides, the window_size its layers use, how shard_batch gets the packing)
MODELS = {
    "llama": ({}, (-1, -1), "position_ids"),
    "mistral": ({"sliding_window": 8}, (7, 0), "cu_seq_lens"),
    # layers of two windows (a window of 8 on layer 0, none on layer 1) on shards cut for none; sinks
    "gpt_oss": ({}, (-1, -1), "position_ids"),
}


def packed_batch(vocab_size):
    """DataCollatorWithFlattening's batch of DOCUMENTS (random tokens), with the flash-attention kwargs."""
    from transformers import DataCollatorWithFlattening

    generator = torch.Generator().manual_seed(0)
    features = [{"input_ids": torch.randint(0, vocab_size, (n,), generator=generator).tolist()} for n in DOCUMENTS]
    return DataCollatorWithFlattening(return_flash_attn_kwargs=True)(features, return_tensors="pt")


def per_document_loss(config, weights, batch):
    """The packed batch's mean loss with each document run alone through transformers' "eager" model: what
    packing means, independent of how an implementation reads packed position_ids."""
    model = build_model(config, "eager", weights)
    ids, total, count, start = batch["input_ids"][0], 0.0, 0, 0
    with torch.no_grad():
        for n in DOCUMENTS:
            if n > 1:
                logits = model(input_ids=ids[None, start:start + n], use_cache=False).logits[0]
                total += torch.nn.functional.cross_entropy(logits[:-1].double(), ids[start + 1:start + n],
                                                           reduction="sum").item()
                count += n - 1
            start += n
    return total / count


@pytest.fixture(scope="module")
def single_device():
    """family -> (config, weights, batch, loss, {name: grad}) of one single-device step on the packed batch:
    "sdpa", or for gpt-oss (sinks, which sdpa lacks) "cpattn", checked here against each document run alone;
    transformers' "eager" gpt-oss reads the packed position_ids of its sliding layer otherwise (loss off by
    4e-4 of the per-document one, 2026-12-04, transformers 5.25)."""
    results = {}
    for family, (overrides, _, _) in MODELS.items():
        config = tiny_config(family, **overrides)
        batch = packed_batch(config.vocab_size)
        implementation = "cpattn" if family == "gpt_oss" else "sdpa"
        weights, loss, grads = single_device_step(config, implementation, lambda model: model(
            input_ids=batch["input_ids"], position_ids=batch["position_ids"], labels=batch["labels"],
            use_cache=False).loss)
        if family == "gpt_oss":
            assert abs(loss.item() - per_document_loss(config, weights, batch)) < 1e-5 * loss.item()
        results[family] = (config, weights, batch, loss, grads)
    return results


PADDED_LENGTHS = (23, 1, 17)  # real tokens per row of a right-padded batch of 23 columns


@pytest.fixture(scope="module")
def padded_single_device():
    """(config, weights, input_ids, attention_mask, labels, loss, {name: grad}) of one "sdpa" step of tiny Llama
    on a right-padded batch, padding labels ignored (-100)."""
    config = tiny_config("llama")
    generator = torch.Generator().manual_seed(1)
    ids = torch.randint(0, config.vocab_size, (len(PADDED_LENGTHS), max(PADDED_LENGTHS)), generator=generator)
    mask = (torch.arange(ids.shape[1])[None] < torch.tensor(PADDED_LENGTHS)[:, None]).long()
    ids = ids.masked_fill(mask == 0, 0)  # the pad token
    labels = ids.masked_fill(mask == 0, -100)
    weights, loss, grads = single_device_step(config, "sdpa", lambda model: model(
        input_ids=ids, attention_mask=mask, labels=labels, use_cache=False).loss)
    return config, weights, ids, mask, labels, loss, grads


def padded_step(cp, config, weights, ids, mask, labels):
    """(mean loss, {name: all-reduced grad}) of a padded batch packed by shard_batch(attention_mask=)."""
    model = build_model(config, "cpattn_cp", weights)
    inputs, shift_labels = cpattn_hf.shard_batch(cp, ids, labels, attention_mask=mask)
    assert inputs["cu_seq_lens_q"].tolist() == [0, 23, 24, 41]
    with cpattn_hf.context_parallel(cp):
        loss = cpattn_hf.causal_lm_loss(model(**inputs, use_cache=False).logits, shift_labels, cp)
        loss.backward()
    cpattn_hf.all_reduce_gradients(model, cp)
    total = loss.detach().clone()
    torch.distributed.all_reduce(total, group=cp.group)
    return total, {n: p.grad for n, p in model.named_parameters()}


def packed_step(cp, family, config, weights, batch):
    """(mean loss, {name: all-reduced grad}, this rank's token count) of docs/transformers.md's packed recipe."""
    _, window, packing = MODELS[family]
    model = build_model(config, "cpattn_cp", weights)
    if packing == "position_ids":
        labels = batch["input_ids"].clone()
        inputs, shift_labels = cpattn_hf.shard_batch(cp, batch["input_ids"], labels,
                                                     position_ids=batch["position_ids"], window_size=window)
        assert torch.equal(labels, batch["input_ids"])  # not modified
    else:
        inputs, shift_labels = cpattn_hf.shard_batch(cp, batch["input_ids"], batch["labels"],
                                                     cu_seq_lens=batch["cu_seq_lens_q"], window_size=window)
    with cpattn_hf.context_parallel(cp):
        logits = model(**inputs, use_cache=False).logits
        loss = cpattn_hf.causal_lm_loss(logits, shift_labels, cp)
        loss.backward()
    cpattn_hf.all_reduce_gradients(model, cp)
    total = loss.detach().clone()
    torch.distributed.all_reduce(total, group=cp.group)
    return total, {n: p.grad for n, p in model.named_parameters()}, inputs["input_ids"].shape[1]


def misuse_cases(cp, rank, single_device):
    """Bad packed input, on every rank or on one rank only; each must make every rank raise."""
    config, weights, batch, *_ = single_device["llama"]
    model = build_model(config, "cpattn_cp", weights)
    ids, positions, cu = batch["input_ids"], batch["position_ids"], batch["cu_seq_lens_q"]
    holes = torch.ones_like(ids)
    holes[0, 5] = 0
    inputs, _ = cpattn_hf.shard_batch(cp, ids, ids, position_ids=positions)
    unpacked = {"input_ids": inputs["input_ids"], "position_ids": inputs["position_ids"]}
    one_rank_unpacked = unpacked if rank == 1 else inputs
    shifted = positions.clone()
    shifted[0, 23:] += 1  # the one-token document starts at 1: the positions do not restart at 0
    with cpattn_hf.context_parallel(cp):
        return {
            "positions not restarting at 0": error_of(lambda: cpattn_hf.shard_batch(cp, ids, ids,
                                                                                position_ids=shifted)),
            "cu_seq_lens short": error_of(lambda: cpattn_hf.shard_batch(cp, ids, ids, cu_seq_lens=cu[:-1])),
            "cu_seq_lens against positions": error_of(lambda: cpattn_hf.shard_batch(
                cp, ids, ids, position_ids=positions, cu_seq_lens=torch.tensor([0, 24, 80], dtype=torch.int32))),
            "packed without the packing": error_of(lambda: model(**unpacked, use_cache=False)),
            "packing on one rank only": error_of(lambda: model(**one_rank_unpacked, use_cache=False)),
            "padding between real tokens": error_of(lambda: cpattn_hf.shard_batch(cp, ids, ids, attention_mask=holes)),
            "attention_mask with a packing": error_of(lambda: cpattn_hf.shard_batch(
                cp, ids, ids, position_ids=positions, attention_mask=torch.ones_like(ids))),
            "attention_mask of another shape": error_of(lambda: cpattn_hf.shard_batch(
                cp, ids, ids, attention_mask=torch.ones(1, 5, dtype=torch.long))),
            "attention_mask not 0/1": error_of(lambda: cpattn_hf.shard_batch(cp, ids, ids, attention_mask=holes * 2)),
            "attention_mask without a real token": error_of(lambda: cpattn_hf.shard_batch(
                cp, ids, ids, attention_mask=torch.zeros_like(ids))),
            "unsharded packed batch": error_of(lambda: model(
                input_ids=ids, position_ids=positions, use_cache=False,
                **{k: batch[k] for k in ("cu_seq_lens_q", "cu_seq_lens_k", "max_length_q", "max_length_k")})),
        }


def run_packed(rank, world_size, single_device, padded_single_device):
    cp = cpattn.ContextParallel(ulysses_degree=world_size // 2, ring_impl="zigzag")
    results = {family: packed_step(cp, family, config, weights, batch)
               for family, (config, weights, batch, *_) in single_device.items()}
    if world_size == 2:
        results["llama, right-padded"] = padded_step(cp, *padded_single_device[:5])
        return results, misuse_cases(cp, rank, single_device)
    return results, None


@pytest.mark.parametrize("world_size", [2, 4], ids=["zigzag2", "usp4"])
def test_packed_training_step_matches_single_device(world_size, single_device, padded_single_device):
    outcomes = run_ranks(run_packed, world_size, single_device, padded_single_device, timeout=300)
    for family, (*_, want_loss, want_grads) in single_device.items():
        tokens = []
        for rank, (results, _) in enumerate(outcomes):
            loss, grads, local_tokens = results[family]
            assert rel_err(loss, want_loss) < TOL, (rank, family)
            errors = {name: rel_err(grads[name], want_grads[name]) for name in want_grads}
            assert grads.keys() == want_grads.keys() and max(errors.values()) < TOL, (rank, family, errors)
            tokens.append(local_tokens)
        mean = sum(DOCUMENTS) / world_size
        assert sum(tokens) == sum(DOCUMENTS) and max(tokens) <= 1.02 * mean + 1, (family, tokens)
    if world_size == 2:
        *_, want_loss, want_grads = padded_single_device
        for rank, (results, _) in enumerate(outcomes):
            loss, grads = results["llama, right-padded"]
            errors = {name: rel_err(grads[name], want_grads[name]) for name in want_grads}
            assert rel_err(loss, want_loss) < TOL and max(errors.values()) < TOL, (rank, loss, want_loss, errors)
        for rank, (_, misuse) in enumerate(outcomes):
            for case, outcome in misuse.items():
                assert outcome is not None and outcome[0] == "ValueError", (rank, case, outcome)
            assert "restart at 0" in misuse["positions not restarting at 0"][1]
            assert "ends at 61" in misuse["cu_seq_lens short"][1]
            assert "different packings" in misuse["cu_seq_lens against positions"][1]
            assert "shard_batch" in misuse["packed without the packing"][1]
            assert "rows [0] have padding between real tokens" in misuse["padding between real tokens"][1]
            assert "not both" in misuse["attention_mask with a packing"][1]
            assert "input_ids' shape (1, 80)" in misuse["attention_mask of another shape"][1]
            assert "must hold 0 and 1" in misuse["attention_mask not 0/1"][1]
            assert "no real token" in misuse["attention_mask without a real token"][1]
        assert "rank(s) [1]" in outcomes[0][1]["packing on one rank only"][1]  # rank 0's own input was fine
