"""The agreement across ranks (cpattn/agreement.py): what every rank says when ranks were called
differently, or one rank rejected its inputs. Each message names the argument, its value on every
rank and the fix. All cases share one run on 2 gloo ranks; a good call after them must still work."""
import torch

import cpattn
from cpattn.agreement import per_rank, spoken_list
from cpattn.testing import run_ranks


def outcome(call):
    try:
        call()
        return "no error"
    except Exception as exc:
        return f"{type(exc).__name__}: {exc}"


def misuse(rank, world_size):
    gen = torch.Generator().manual_seed(0)

    def qkv(local_len, heads=2):
        return [torch.randn(1, local_len, heads, 16, generator=gen) for _ in range(3)]
    cp = cpattn.ContextParallel(ring_impl="ring")
    cache = cpattn.ShardedKVCache(1, 64, 2, 16)
    chunk = [torch.randn(1, 6 - rank, h, 16, generator=gen) for h in (4, 2, 2)]
    new = [torch.randn(1, 1, h, 16, generator=gen) for h in (4, 2, 2)]
    seen = {
        "uneven lengths without seq_len": outcome(lambda: cp.attention(*qkv(49 - rank))),
        "lengths no sequence gives": outcome(lambda: cp.attention(*qkv(8 if rank == 0 else 4))),
        "different seq_len": outcome(lambda: cp.attention(*qkv(48), seq_len=96 + rank)),
        "different dtype": outcome(lambda: cp.attention(*[t.to(torch.float16 if rank else torch.float32)
                                                         for t in qkv(4)])),
        "one rank rejects": outcome(lambda: cp.attention(*qkv(4), window_size=(-5, 0) if rank == 0 else (-1, -1))),
        "prefill chunk split unevenly": outcome(lambda: cpattn.prefill(cache, *chunk)),
        "decode windows differ": outcome(lambda: cpattn.decode(cache, *new, window_size=(8 * rank - 1, -1))),
        "construction differs": outcome(lambda: cpattn.ContextParallel(ulysses_degree=2 - rank)),
        "gather shapes differ": outcome(lambda: cp.gather(torch.zeros(1, 2 + 2 * (rank == 0), 3))),
    }
    # Still usable: a good call after all that.
    q, k, v = (cp.shard(t) for t in qkv(8 * world_size))
    good = cp.attention(q, k, v, causal=True).shape
    return seen, tuple(good)


def test_messages_name_the_argument_the_values_and_the_fix():
    per_rank_outcomes = run_ranks(misuse, 2, timeout=180)
    for rank, (seen, good) in enumerate(per_rank_outcomes):
        assert good == (1, 8, 2, 16)
        expected = {
            "uneven lengths without seq_len": "ValueError: ContextParallel.attention: ranks disagree on seq_len "
                                              "(rank 0: 98, rank 1: 96): ranks hold 49 and 48 tokens: pass "
                                              "seq_len=97 on every rank",
            "lengths no sequence gives": "ranks hold 8 and 4 tokens, which no sequence length splits into: make "
                                         "the shards with ContextParallel.shard",
            "different seq_len": "ranks disagree on seq_len (rank 0: 96, rank 1: 97): pass the same seq_len, the "
                                 "full sequence length, on every rank",
            "different dtype": "ranks disagree on dtype (rank 0: torch.float32, rank 1: torch.float16): cast q, k, "
                               "v to the same dtype on every rank",
            "prefill chunk split unevenly": "ValueError: prefill: ranks disagree on tokens (rank 0: 6, rank 1: 5): "
                                            "every rank must pass the same number of the chunk's tokens, or "
                                            "token_index on every rank (split_chunk gives both)",
            "decode windows differ": "ValueError: decode: ranks disagree on window_left (rank 0: -1, rank 1: 7): "
                                     "pass the same window_left on every rank",
            "construction differs": "ValueError: ContextParallel: ranks disagree on ulysses_degree (rank 0: 2, "
                                    "rank 1: 1): pass the same ulysses_degree on every rank",
            "gather shapes differ": "ValueError: ContextParallel.gather: ranks disagree on shape (rank 0: (1, 8, 3), "
                                    "rank 1: (1, 4, 3)): gather every rank's shard of one tensor",
            "one rank rejects": ("ValueError: ContextParallel.attention: window_size left must be >= 0" if rank == 0
                                 else "ValueError: ContextParallel.attention: rank(s) [0] of the context-parallel "
                                      "group rejected their inputs (rank 0: ValueError: ContextParallel.attention: "
                                      "window_size left must be >= 0"),
        }
        for name, phrase in expected.items():
            assert phrase in seen[name], (rank, name, seen[name])


def test_values_of_many_ranks_are_grouped():
    assert per_rank([4, 8, 4, 8]) == "ranks [0, 2]: 4, ranks [1, 3]: 8"
    assert per_rank([25, 24, 24, 24]) == "rank 0: 25, ranks [1, 2, 3]: 24"
    assert per_rank(["torch.float32", None]) == "rank 0: torch.float32, rank 1: None"
    long = tuple(range(100))
    assert "..." in per_rank([long, ()]) and len(per_rank([long, ()])) < 100
    assert spoken_list([49, 48]) == "49 and 48" and spoken_list([25, 24, 24, 24]) == "25, 24, 24 and 24"
