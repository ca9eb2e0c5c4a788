"""Long sequences and big batches: element offsets past 2**31 and more (batch x heads)
programs than CUDA allows on a secondary grid axis."""
import pytest
import torch

import cpattn
from cpattn.kernels.launcher import check_grid
from cpattn.kernels.tiles import grid_1d, needs_int64
from reference import reference_attention, rel_err

ROW_STRIDE = 2**24  # 160 rows x 2**24 elements = 2.7e9 > 2**31: row offsets need 64 bits


@pytest.mark.large_memory  # reserves 10.7 GB of address space; touches only a few MB of it
def test_offsets_past_two_to_the_31_forward_and_backward():
    rows, heads, head_dim = 160, 2, 16
    buffer = torch.empty(rows * ROW_STRIDE, dtype=torch.float32)  # pages untouched stay unallocated

    def strided(part):  # a flash-layout (1, rows, heads, head_dim) view with a huge sequence stride
        return buffer.as_strided((1, rows, heads, head_dim), (0, ROW_STRIDE, head_dim, 1), part * heads * head_dim)

    gen = torch.Generator().manual_seed(0)
    q, k, v = (strided(i) for i in range(3))
    for t in (q, k, v):
        t.copy_(torch.randn(t.shape, generator=gen))
    assert needs_int64(q)
    leaves = [t.requires_grad_() for t in (q, k, v)]  # views of the buffer, read in place
    out = cpattn.flash_attn_func(*leaves, causal=True)
    dout = torch.randn(out.shape, generator=gen)
    grads = torch.autograd.grad(out, leaves, dout)
    dense = [t.detach().contiguous().double().requires_grad_() for t in (q, k, v)]
    ref_out, _ = reference_attention(*dense, causal=True)
    ref_grads = torch.autograd.grad(ref_out, dense, dout.double())
    assert rel_err(out, ref_out) < 1e-5
    for got, want in zip(grads, ref_grads):
        assert rel_err(got, want) < 1e-4


def test_grid_limits_are_checked_on_cpu_too():
    assert check_grid((2**31 - 1,)) == (2**31 - 1, 1, 1)
    with pytest.raises(ValueError, match="exceeds CUDA's limit of 65535 programs on axis 1"):
        check_grid((1, 65536))
    with pytest.raises(ValueError, match="axis 0"):
        check_grid((2**31,))
    # B=4096 x H=16 pairs: one grid axis of 65536+ programs, which CUDA allows on axis 0.
    # (Launching that many programs through the interpreter takes minutes, so the grid
    # function is tested here; every launch goes through check_grid.)
    assert check_grid(grid_1d(100, 4096 * 16)({"BLOCK_M": 64})) == (2 * 4096 * 16, 1, 1)
