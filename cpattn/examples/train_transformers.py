"""Train a tiny, randomly initialised Hugging Face Llama with context-parallel cpattn attention.

    torchrun --nproc-per-node=2 -m cpattn.examples.train_transformers      # 2 CPU ranks (gloo) or GPUs (NCCL)
    python -m cpattn.examples.train_transformers                           # one rank

Every rank builds the same model ("cpattn_cp" attention) and trains it on its
share of every sequence; rank 0 also trains a copy with transformers' own "sdpa"
attention on the whole batch, and prints both losses at every step. They agree
to float32 rounding, and so do the trained weights (printed at the end).
"""
import argparse
import copy
import os

import torch
import torch.distributed as dist

import cpattn
import cpattn.integrations.transformers as cpattn_hf
from cpattn.examples.demo import init_distributed
from cpattn.testing import free_port


def tiny_config(family="llama", **overrides):
    """A tiny transformers config (2 layers, hidden 64, 4 query heads, 2 kv heads).

    ``family``: "llama", "qwen2", "mistral" or "gpt_oss" (2 experts, one per token,
    learned attention sinks, a sliding window of 8 on every other layer).
    """
    import transformers

    configs = {"llama": "LlamaConfig", "qwen2": "Qwen2Config", "mistral": "MistralConfig", "gpt_oss": "GptOssConfig"}
    if family not in configs:
        raise ValueError(f"tiny_config: family must be one of {sorted(configs)}, got {family!r}")
    sizes = dict(vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                 num_key_value_heads=2, max_position_embeddings=256)
    if family == "gpt_oss":
        sizes.update(head_dim=16, num_local_experts=2, num_experts_per_tok=1, sliding_window=8,
                     rope_parameters={"rope_type": "default", "rope_theta": 10000.0})
    return getattr(transformers, configs[family])(**{**sizes, **overrides})


def build_model(config, attn_implementation, state_dict=None):
    """A causal LM for ``config`` (copied: transformers writes the implementation into the config it gets)."""
    from transformers import AutoModelForCausalLM

    cpattn_hf.register()  # idempotent; "cpattn" and "cpattn_cp" must be known to from_config
    model = AutoModelForCausalLM.from_config(copy.deepcopy(config), attn_implementation=attn_implementation)
    if state_dict is not None:
        model.load_state_dict(state_dict)
    return model


def context_parallel_step(model, cp, input_ids, labels):
    """Forward and backward of one whole (B, S) batch, context parallel: the recipe of docs/transformers.md.

    Leaves every parameter's gradient summed over the group (the single-device
    gradient) and returns the batch's mean loss, the same on every rank.
    """
    inputs, shift_labels = cpattn_hf.shard_batch(cp, input_ids, labels)
    with cpattn_hf.context_parallel(cp):
        logits = model(**inputs, use_cache=False).logits
        loss = cpattn_hf.causal_lm_loss(logits, shift_labels, cp)  # this rank's share of the mean loss
        loss.backward()
    cpattn_hf.all_reduce_gradients(model, cp)
    total = loss.detach().clone()
    dist.all_reduce(total, group=cp.group)  # the shares add up to the mean loss
    return total


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--seq-len", type=int, default=64)
    parser.add_argument("--ulysses-degree", type=int, default=1)
    parser.add_argument("--ring-impl", choices=("zigzag", "ring"), default="zigzag")
    parser.add_argument("--lr", type=float, default=3e-3)
    args = parser.parse_args(argv)

    if "WORLD_SIZE" not in os.environ:  # plain python: a process group of one rank
        os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(free_port()), RANK="0", WORLD_SIZE="1")
    device = init_distributed()
    rank = dist.get_rank()
    cp = cpattn.ContextParallel(ulysses_degree=args.ulysses_degree, ring_impl=args.ring_impl)

    torch.manual_seed(0)  # the same weights and data on every rank
    config = tiny_config("llama")
    input_ids = torch.randint(0, config.vocab_size, (args.batch, args.seq_len)).to(device)
    model = build_model(config, "cpattn_cp").to(device)
    optimizer = torch.optim.AdamW(model.parameters(), lr=args.lr)
    reference = build_model(config, "sdpa", model.state_dict()).to(device) if rank == 0 else None
    ref_optimizer = torch.optim.AdamW(reference.parameters(), lr=args.lr) if rank == 0 else None
    if rank == 0:
        print(f"{type(model).__name__}, {sum(p.numel() for p in model.parameters())} parameters, batch "
              f"{args.batch} x {args.seq_len} tokens, {cp} on {dist.get_world_size()} rank(s), {device}")

    for step in range(1, args.steps + 1):
        total = context_parallel_step(model, cp, input_ids, input_ids)
        optimizer.step()
        optimizer.zero_grad()

        if rank == 0:
            ref_loss = reference(input_ids=input_ids, labels=input_ids, use_cache=False).loss
            ref_loss.backward()
            ref_optimizer.step()
            ref_optimizer.zero_grad()
            print(f"step {step}: loss {total.item():.6f} context parallel | {ref_loss.item():.6f} single device "
                  f"(sdpa) | rel diff {abs(total.item() - ref_loss.item()) / ref_loss.item():.1e}", flush=True)

    if rank == 0:
        diff = max(((p - q).norm() / q.norm()).item() for p, q in zip(model.parameters(), reference.parameters()))
        print(f"after {args.steps} steps: max relative weight difference {diff:.1e}")
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
