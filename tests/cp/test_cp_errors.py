"""Bad input raises a clear error on every rank, and no rank hangs; from_config on real ranks.

Every case runs on all ranks of one process group with a timeout (run_ranks),
so a rank left waiting in a collective fails the test instead of hanging it.
After the bad calls, a good call must still work: no message was left behind.
"""
import pytest
import torch
import torch.distributed as dist

import cpattn
from cpattn.testing import run_ranks


def qkv(local_len, heads=4, kv_heads=4, head_dim=16, seed=0):
    gen = torch.Generator().manual_seed(seed)
    return (torch.randn(1, local_len, heads, head_dim, generator=gen),
            torch.randn(1, local_len, kv_heads, head_dim, generator=gen),
            torch.randn(1, local_len, kv_heads, head_dim, generator=gen))


def bad_calls(rank, world_size):
    """name -> (call, expected exception type, phrase the message must contain)."""
    ring = cpattn.ContextParallel(ring_impl="ring")
    zigzag = cpattn.ContextParallel()
    ulysses = cpattn.ContextParallel(ulysses_degree=world_size)
    q, k, v = qkv(4)
    return {
        "degree does not divide group": (lambda: cpattn.ContextParallel(ulysses_degree=3), ValueError,
                                         "does not divide"),
        "degree zero": (lambda: cpattn.ContextParallel(ulysses_degree=0), ValueError, "positive"),
        "degree not an int": (lambda: cpattn.ContextParallel(ulysses_degree=2.0), TypeError, "ulysses_degree"),
        "degree unknown word": (lambda: cpattn.ContextParallel(ulysses_degree="max"), ValueError, "'auto'"),
        "auto without heads": (lambda: cpattn.ContextParallel(ulysses_degree="auto"), ValueError, "num_heads"),
        "one rank's degree differs": (lambda: cpattn.ContextParallel(ulysses_degree=2 if rank == 0 else 1),
                                      ValueError, "disagree"),
        "one rank's degree invalid": (lambda: cpattn.ContextParallel(ulysses_degree=3 if rank == 0 else 1),
                                      ValueError, "does not divide" if rank == 0 else "rank(s) [0]"),
        "unknown ring_impl": (lambda: cpattn.ContextParallel(ring_impl="spiral"), ValueError, "ring_impl"),
        "heads declared not divisible": (lambda: cpattn.ContextParallel(ulysses_degree=world_size, num_heads=5),
                                         ValueError, "query heads"),
        "heads not divisible": (lambda: ulysses.attention(*qkv(4, heads=5, kv_heads=5)), ValueError, "query heads"),
        "kv heads not splittable": (lambda: ulysses.attention(*qkv(4, heads=6 * world_size, kv_heads=3)),
                                    ValueError, "kv heads"),
        # Any length lays out; a seq_len that does not match the local shards cannot.
        "zigzag seq_len vs shards": (lambda: zigzag.attention(*qkv(3), seq_len=5 * world_size), ValueError, "seq_len="),
        "empty shard input": (lambda: ring.shard(torch.randn(1, 0, 2, 8)), ValueError, "positive int"),
        "gather seq_len vs shards": (lambda: zigzag.gather(torch.randn(1, 3, 2, 8), seq_len=5 * world_size),
                                     ValueError, "seq_len="),
        "k length differs": (lambda: ring.attention(q, k[:, :2], v[:, :2]), ValueError, "same local sequence length"),
        "v length differs": (lambda: ring.attention(q, k, v[:, :2]), ValueError, "lengths differ"),
        "head dims differ": (lambda: ring.attention(q, k[..., :8], v[..., :8]), ValueError, "head dims differ"),
        "q not a tensor": (lambda: ring.attention(q.tolist(), k, v), TypeError, "torch.Tensor"),
        "gqa without enable_gqa": (lambda: ring.scaled_dot_product_attention(
            *(t.transpose(1, 2) for t in qkv(4, kv_heads=2))), ValueError, "enable_gqa"),
        # Inputs that differ between ranks: only the exchange of shapes can catch these.
        "one rank's length differs": (lambda: ring.attention(*qkv(8 if rank == 1 else 4)), ValueError,
                                      "disagree"),
        "one rank passes garbage": (lambda: zigzag.attention(None if rank == 0 else q, k, v), (TypeError, ValueError),
                                    "torch.Tensor" if rank == 0 else "rank(s) [0]"),
        "one rank's causal differs": (lambda: ring.attention(q, k, v, causal=rank == 0), ValueError, "disagree"),
        "gather of different shapes": (lambda: ring.gather(torch.zeros(1, 2 + 2 * (rank == 0), 3)), ValueError,
                                       "disagree"),
        "gather of different dtypes": (lambda: ring.gather(torch.zeros(1, 2, 3, dtype=torch.float64 if rank else
                                                                        torch.float32)), ValueError, "disagree"),
        "gather bad seq_dim": (lambda: ring.gather(torch.zeros(1, 2, 3), seq_dim=5), ValueError, "seq_dim"),
        "from_config unknown algo": (lambda: cpattn.ContextParallel.from_config(world_size, "ring_cp_algo"),
                                     ValueError, "context_parallel_algo"),
        "from_config size mismatch": (lambda: cpattn.ContextParallel.from_config(world_size * 2, "megatron_cp_algo"),
                                      ValueError, "differs from the process group"),
        "from_config hybrid without degree": (lambda: cpattn.ContextParallel.from_config(world_size, "hybrid_cp_algo"),
                                              ValueError, "needs ulysses_degree_in_cp"),
        "from_config degree not dividing size": (
            lambda: cpattn.ContextParallel.from_config(world_size, "hybrid_cp_algo", 3), ValueError, "not divisible"),
        "from_config heads vs tp x ulysses": (
            lambda: cpattn.ContextParallel.from_config(world_size, "ulysses_cp_algo", num_heads=8,
                                                       tensor_parallel_size=8), ValueError, "tensor_parallel_size"),
        "from_config contradicting degree": (
            lambda: cpattn.ContextParallel.from_config(world_size, "megatron_cp_algo", 2), ValueError, "contradicts"),
    }


def run_bad_calls(rank, world_size):
    outcomes = {}
    for name, (call, expected, phrase) in bad_calls(rank, world_size).items():
        try:
            call()
            outcomes[name] = "no error"
        except expected as exc:
            outcomes[name] = "ok" if phrase in str(exc) else f"message lacks {phrase!r}: {exc}"
        except Exception as exc:  # the wrong kind of error
            outcomes[name] = f"{type(exc).__name__}: {exc}"
    # The group still works: a good call after all the bad ones.
    cp = cpattn.ContextParallel(ulysses_degree=2 if world_size % 2 == 0 else 1)
    q, k, v = (cp.shard(t) for t in qkv(4 * world_size, seed=1))
    out = cp.gather(cp.attention(q, k, v, causal=True))
    return outcomes, out.tolist()  # plain lists: a tensor would be shared through a file the exiting rank closes


@pytest.mark.parametrize("world_size", [2, 4])
def test_bad_input_raises_on_every_rank(world_size):
    per_rank = run_ranks(run_bad_calls, world_size, timeout=180)
    for rank, (outcomes, out) in enumerate(per_rank):
        failures = {name: outcome for name, outcome in outcomes.items() if outcome != "ok"}
        assert not failures, f"rank {rank}: {failures}"
        assert torch.isfinite(torch.tensor(out)).all() and out == per_rank[0][1]


def run_configs(rank, world_size):
    """World of 5 ranks; the context-parallel group is ranks 0-3, so rank 4 never
    builds a ContextParallel and the subgroups are made by their members only."""
    import os
    os.environ["LOCAL_WORLD_SIZE"] = "2"
    cp_group = dist.new_group([0, 1, 2, 3])  # new_group: every rank of the world calls it
    pair = dist.new_group([0, 1])
    if rank == 4:
        return None
    size = 4
    made = {
        "ulysses": cpattn.ContextParallel.from_config(size, "ulysses_cp_algo", group=cp_group, num_heads=8),
        "megatron": cpattn.ContextParallel.from_config(None, "megatron_cp_algo", group=cp_group),
        "hybrid": cpattn.ContextParallel.from_config(size, "hybrid_cp_algo", 2, group=cp_group, num_heads=16,
                                                     num_kv_heads=4, tensor_parallel_size=2),
        "hybrid auto": cpattn.ContextParallel.from_config(size, "hybrid_cp_algo", "auto", group=cp_group, num_heads=8),
        "hybrid ring impl": cpattn.ContextParallel.from_config(size, "hybrid_cp_algo", 2, group=cp_group,
                                                               ring_impl="ring"),
        "pair": cpattn.ContextParallel(group=pair) if rank < 2 else None,
    }
    described = {name: None if cp is None else (cp.ring_degree, cp.ulysses_degree, cp.ring_impl, cp.ring_index,
                                                cp.ulysses_index) for name, cp in made.items()}
    # Ranks 0 and 1 hold one more process group (pair) than 2 and 3, so torch cannot create groups among
    # all four: those objects use cp_group itself. Within pair the counts agree: it gets its own groups.
    described["communicators"] = {name: None if cp is None else cp.describe()["communicators"]
                                  for name, cp in made.items()}
    errors = {}
    for name in ("hybrid", "hybrid ring impl"):
        cp = made[name]
        full = qkv(16, seed=2)
        out = cp.gather(cp.attention(*(cp.shard(t) for t in full), causal=True))
        ref = torch.nn.functional.scaled_dot_product_attention(*(t.transpose(1, 2) for t in full),
                                                                is_causal=True).transpose(1, 2)
        errors[name] = ((out - ref).norm() / ref.norm()).item()
    described["errors"] = errors
    return described


def test_from_config_on_a_subgroup():
    per_rank = run_ranks(run_configs, 5, timeout=180)
    assert per_rank[4] is None
    for rank, d in enumerate(per_rank[:4]):
        ring_index, ulysses_index = divmod(rank, 2)
        assert d["ulysses"] == (1, 4, "zigzag", 0, rank)
        assert d["megatron"] == (4, 1, "zigzag", rank, 0)
        assert d["hybrid"] == (2, 2, "zigzag", ring_index, ulysses_index)
        assert d["hybrid auto"] == (2, 2, "zigzag", ring_index, ulysses_index)  # LOCAL_WORLD_SIZE=2 caps it
        assert d["hybrid ring impl"] == (2, 2, "ring", ring_index, ulysses_index)
        assert d["pair"] == ((2, 1, "zigzag", rank, 0) if rank < 2 else None)
        for name, communicators in d["communicators"].items():
            if name == "pair":
                assert (communicators is None) == (rank >= 2)
                assert rank >= 2 or communicators.startswith("cpattn's own process groups"), communicators
            else:
                assert communicators.startswith("the given group itself"), (name, communicators)
        for name, err in d["errors"].items():
            assert err < 1e-4, f"rank {rank} {name}: rel error {err:.2e}"
