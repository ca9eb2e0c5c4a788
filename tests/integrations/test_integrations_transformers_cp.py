"""Hugging Face transformers models trained context parallel with attn_implementation="cpattn_cp".

One run_ranks call per mesh (2 ranks zigzag, 4 ranks zigzag, 4 ranks USP =
Ulysses 2 x zigzag ring 2) trains one step of tiny Llama, Qwen2, Mistral
(sliding window) and gpt-oss (sinks) models on gloo CPU ranks with the recipe of docs/transformers.md
recipe (shard_batch, causal_lm_loss, all_reduce_gradients); every rank's loss
and every parameter's gradient must equal the single-device step on the whole
batch (transformers' "sdpa", "eager" for gpt-oss). Misuse on some ranks
only must make every rank raise. The torchrun example is run too.
"""
import re
import subprocess
import sys

import pytest
import torch

pytest.importorskip("transformers", reason="transformers is not installed "
                    "(pip install -e '.[transformers]'; CI installs it through the test extra)")

import cpattn  # noqa: E402
import cpattn.integrations.transformers as cpattn_hf  # noqa: E402
from cpattn.examples.train_transformers import build_model, context_parallel_step, tiny_config  # noqa: E402
from cpattn.testing import run_ranks  # noqa: E402
from reference import rel_err  # noqa: E402

TOL = 1e-4
# family -> (config overrides, batch, sequence length): each length divisible by 2 x 4 ranks
MODELS = {
    "llama": ({}, 2, 32),                      # GQA 4:2
    "qwen2": ({"head_dim": 40}, 1, 48),        # biases, head dim 40
    "mistral": ({"sliding_window": 8}, 1, 32),  # sliding window on every layer
    "gpt_oss": ({}, 1, 32),                    # attention sinks; sliding window of 8 on layer 0
}


def single_device_step(config, attn_implementation, loss_of):
    """(weights, loss, {name: grad}) of one step of a model built after seeding 0 with
    ``attn_implementation``; ``loss_of(model)`` runs its forward and returns the loss."""
    torch.manual_seed(0)
    model = build_model(config, attn_implementation)
    loss = loss_of(model)
    loss.backward()
    return model.state_dict(), loss.detach(), {n: p.grad for n, p in model.named_parameters()}


@pytest.fixture(scope="module")
def single_device():
    """family -> (config, weights, input_ids, loss, {name: grad}) of one "sdpa" step on the whole batch."""
    results = {}
    for family, (overrides, batch, seq_len) in MODELS.items():
        config, drawn = tiny_config(family, **overrides), []

        def loss_of(model):  # the tokens are drawn after the weights, from the same seeded generator
            drawn.append(torch.randint(0, config.vocab_size, (batch, seq_len)))
            return model(drawn[0], labels=drawn[0], use_cache=False).loss
        weights, loss, grads = single_device_step(config, "eager" if family == "gpt_oss" else "sdpa", loss_of)
        results[family] = (config, weights, drawn[0], loss, grads)  # eager for gpt-oss: sdpa has no sinks
    return results


def cp_train_step(cp, config, state_dict, input_ids):
    """(loss of the whole batch, {name: all-reduced grad}) of the docs/transformers.md recipe on this rank."""
    model = build_model(config, "cpattn_cp", state_dict)
    assert model.config._attn_implementation == "cpattn_cp"
    loss = context_parallel_step(model, cp, input_ids, input_ids)
    return loss, {n: p.grad for n, p in model.named_parameters()}


def error_of(fn):
    try:
        fn()
    except Exception as exc:  # every rank reports what it raised
        return type(exc).__name__, str(exc)
    return None


def misuse_cases(rank, world_size):
    """Mistakes that reach some ranks only; each must make every rank raise (none may hang)."""
    cp = cpattn.ContextParallel(ring_impl="ring")  # rank 0 holds positions 0..S/P-1, the same as a local arange
    model = build_model(tiny_config("llama"), "cpattn_cp")
    ids = torch.randint(0, 128, (1, 16), generator=torch.Generator().manual_seed(0))
    local = cp.shard(ids)
    padding = cp.shard(torch.tensor([[1] * 14 + [0] * 2]))  # only the last rank holds padding
    with cpattn_hf.context_parallel(cp):
        return {
            "no positions": error_of(lambda: model(local, use_cache=False)),
            "padding on one rank": error_of(lambda: model(local, attention_mask=padding, use_cache=False,
                                                          position_ids=cp.positions(16)[None])),
            "kv cache": error_of(lambda: cpattn_hf.cpattn_cp_attention(  # 1 new query, 8 cached keys
                torch.nn.Module(), torch.randn(1, 4, 1, 16), torch.randn(1, 2, 8, 16), torch.randn(1, 2, 8, 16), None)),
        }


def run_mesh(rank, world_size, ulysses_degree, single_device):
    cp = cpattn.ContextParallel(ulysses_degree=ulysses_degree, ring_impl="zigzag")
    results = {family: cp_train_step(cp, config, weights, ids)
               for family, (config, weights, ids, *_) in single_device.items()}
    return results, (misuse_cases(rank, world_size) if world_size == 2 else None)


# The 4-rank meshes run with -m slow: a 4-rank ring and USP through transformers cost about a minute on two
# cores; the packed test (test_integrations_transformers_packed.py) runs USP 2 x 2 by default.
@pytest.mark.parametrize("world_size, ulysses_degree",
                         [(2, 1), pytest.param(4, 1, marks=pytest.mark.slow), pytest.param(4, 2, marks=pytest.mark.slow)],
                         ids=["zigzag2", "zigzag4", "usp4"])
def test_context_parallel_training_step_matches_single_device(world_size, ulysses_degree, single_device):
    outcomes = run_ranks(run_mesh, world_size, ulysses_degree, single_device, timeout=300)
    for rank, (results, misuse) in enumerate(outcomes):
        for family, (loss, grads) in results.items():
            _, _, _, want_loss, want_grads = single_device[family]
            assert rel_err(loss, want_loss) < TOL, (rank, family)
            errors = {name: rel_err(grads[name], want_grads[name]) for name in want_grads}
            assert grads.keys() == want_grads.keys() and max(errors.values()) < TOL, (rank, family, errors)
        if misuse is not None:
            name, message = misuse["no positions"]
            assert name == "ValueError" and ("not this rank's global token positions" in message
                                             or "rank(s) [1]" in message), (rank, message)
            name, message = misuse["padding on one rank"]
            assert name in ("NotImplementedError", "ValueError") and ("attention mask" in message
                                                                      or "rank(s) [1]" in message), (rank, message)
            name, message = misuse["kv cache"]
            assert name == "NotImplementedError" and "use_cache=False" in message, (rank, message)
    if world_size == 2:  # rank 0's own inputs were fine: it raised because rank 1 failed
        assert "rank(s) [1]" in outcomes[0][1]["no positions"][1]
        assert "rank(s) [1]" in outcomes[0][1]["padding on one rank"][1]


def test_torchrun_example_trains_like_single_device():
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node=2", "-m",
           "cpattn.examples.train_transformers", "--steps", "2", "--batch", "1", "--seq-len", "32"]
    result = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stdout + result.stderr
    steps = re.findall(r"step \d+: loss ([0-9.]+) context parallel \| ([0-9.]+) single device", result.stdout)
    assert len(steps) == 2, result.stdout
    for cp_loss, single_loss in steps:
        assert abs(float(cp_loss) - float(single_loss)) <= TOL * float(single_loss), result.stdout
    assert float(steps[1][0]) < float(steps[0][0]), result.stdout  # it trains
    weight_diff = float(re.search(r"max relative weight difference ([0-9.e+-]+)", result.stdout).group(1))
    # AdamW's normalised update magnifies the rounding differences of tiny gradients (~1e-7) about a hundredfold
    assert weight_diff < 1e-3, result.stdout
