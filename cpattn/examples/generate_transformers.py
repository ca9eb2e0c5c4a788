"""Generate with a Hugging Face model whose KV cache is sharded along the sequence over the ranks.

    torchrun --nproc-per-node=2 -m cpattn.examples.generate_transformers     # 2 CPU ranks (gloo) or GPUs (NCCL)
    python -m cpattn.examples.generate_transformers                          # one rank

Every rank builds the same tiny, randomly initialised model (``--family``: llama, qwen2,
mistral or gpt_oss) with "cpattn_cp" attention and calls ``generate()`` on the same
left-padded batch of prompts of different lengths, passing a ``ShardedCache``: each
rank stores its stripes of every layer's keys and values, and every rank gets the same
tokens. Rank 0 also generates with transformers' own attention and a ``DynamicCache`` on
one device, and prints both.
"""
import argparse
import os

import torch
import torch.distributed as dist

import cpattn.integrations.transformers as cpattn_hf
from cpattn.examples.demo import init_distributed
from cpattn.examples.train_transformers import build_model, tiny_config
from cpattn.testing import free_port


def left_padded_prompts(lengths, vocab_size, pad_token_id=0, seed=0):
    """(input_ids, attention_mask) of random prompts of ``lengths`` tokens, left padded as generate() batches them."""
    gen = torch.Generator().manual_seed(seed)
    width = max(lengths)
    ids = torch.full((len(lengths), width), pad_token_id)
    mask = torch.zeros_like(ids)
    for row, n in enumerate(lengths):
        ids[row, width - n:] = torch.randint(1, vocab_size, (n,), generator=gen)
        mask[row, width - n:] = 1
    return ids, mask


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--family", choices=("llama", "qwen2", "mistral", "gpt_oss"), default="llama")
    parser.add_argument("--prompt-lengths", type=int, nargs="+", default=[7, 23])
    parser.add_argument("--max-new-tokens", type=int, default=32)
    args = parser.parse_args(argv)

    if "WORLD_SIZE" not in os.environ:  # plain python: a process group of one rank
        os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(free_port()), RANK="0", WORLD_SIZE="1")
    device = init_distributed()
    rank = dist.get_rank()

    torch.manual_seed(0)  # the same weights on every rank
    config = tiny_config(args.family, **({"sliding_window": 8} if args.family == "mistral" else {}))
    model = build_model(config, "cpattn_cp").to(device).eval()
    input_ids, attention_mask = (t.to(device) for t in left_padded_prompts(args.prompt_lengths, config.vocab_size))
    generate = dict(max_new_tokens=args.max_new_tokens, do_sample=False, pad_token_id=0)

    # One ShardedKVCache per layer over the default group; padding is never stored.
    cache = cpattn_hf.ShardedCache(model.config, batch_size=len(args.prompt_lengths),
                                   max_cache_len=max(args.prompt_lengths) + args.max_new_tokens, device=device)
    with torch.no_grad():
        out = model.generate(input_ids, attention_mask=attention_mask, cache=cache, **generate)
    local = [layer.kv.local_lengths().sum().item() for layer in cache.layers]
    if rank == 0:
        reference = build_model(config, "eager" if args.family == "gpt_oss" else "sdpa", model.state_dict())
        with torch.no_grad():
            want = reference.to(device).eval().generate(input_ids, attention_mask=attention_mask, **generate)
        width = input_ids.shape[1]
        print(f"{args.family}: prompts of {args.prompt_lengths} tokens, KV cache sharded over "
              f"{dist.get_world_size()} rank(s); rank 0 holds {local[0]} of layer 0's "
              f"{cache.layers[0].kv.seqlens.sum().item()} cached tokens")
        for row in range(len(args.prompt_lengths)):
            print(f"  sequence {row}: {out[row, width:].tolist()}")
        print(f"same tokens as single-device generate(): {torch.equal(out, want)}")
    cache.close()
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
