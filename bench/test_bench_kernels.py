"""pytest-benchmark timings of the kernels: forward, backward (given out and lse), merge.

    pytest bench --benchmark-only          # not collected by the README's test command (testpaths = tests)

On a GPU: one realistic bf16 shape, compiled kernels, synchronised after each
call; ``extra_info`` holds the FLOPs (or bytes) per call, so TFLOPS (GB/s) =
that / mean time. On CPU: a tiny fp32 shape through the Triton interpreter,
so the file runs anywhere; there the times measure the interpreter, not the
kernels. For comparisons with torch SDPA use bench_attention.py.
"""
import pytest
import torch

import _common as C
from cpattn.kernels import attention_backward, attention_forward, merge_attention

CUDA = torch.cuda.is_available()
DEVICE = torch.device("cuda" if CUDA else "cpu")
# batch, seqlen, heads, kv_heads, head_dim, dtype
SHAPE = (4, 4096, 32, 8, 128, "bf16") if CUDA else (1, 64, 4, 2, 32, "fp32")
ROUNDS, WARMUP = (30, 3) if CUDA else (2, 0)


def run(benchmark, fn, **info):
    def synced():
        fn()
        C.synchronize(DEVICE)

    benchmark.extra_info.update(device=C.device_name(DEVICE), shape=SHAPE, **info)
    benchmark.pedantic(synced, rounds=ROUNDS, iterations=1, warmup_rounds=WARMUP)


@pytest.fixture(scope="module")
def inputs():
    return C.attention_inputs(*SHAPE, DEVICE)


def flops(causal, mode):
    batch, seqlen, heads, _, head_dim, _ = SHAPE
    return C.attention_flops(batch, heads, seqlen, seqlen, head_dim, causal, mode)


@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
def test_forward(benchmark, inputs, causal):
    q, k, v, _ = inputs
    run(benchmark, lambda: attention_forward(q, k, v, causal=causal), flops=flops(causal, "fwd"))


@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
def test_backward(benchmark, inputs, causal):
    q, k, v, dout = inputs
    out, lse = attention_forward(q, k, v, causal=causal)
    run(benchmark, lambda: attention_backward(dout, q, k, v, out, lse, causal=causal), flops=flops(causal, "bwd"))


@pytest.mark.parametrize("inplace", [False, True], ids=["new", "inplace"])
def test_merge(benchmark, inputs, inplace):
    q, k, v, _ = inputs
    out_a, lse_a = attention_forward(q, k, v)
    out_b, lse_b = out_a.clone(), lse_a + 0.5
    nbytes = 3 * (out_a.numel() * out_a.element_size() + lse_a.numel() * lse_a.element_size())
    run(benchmark, lambda: merge_attention(out_a, lse_a, out_b, lse_b, inplace=inplace), bytes=nbytes)
