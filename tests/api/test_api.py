"""The single-device API: flash_attn_func and the SDPA drop-in, against the float64
reference and torch SDPA, forward and backward, odd sizes, GQA/MQA, strided views,
low precision, and every bad input."""
import warnings

import pytest
import torch
import torch.nn.functional as F

import cpattn
from reference import devices, reference_attention, reference_varlen, rel_err

FWD_TOL, GRAD_TOL = 1e-4, 1e-3
GRAD_FLOOR = 1e-2  # gradients with RMS below this count as zero (see rel_err)

# (Sq, Sk, heads, heads_kv, head_dim): every length in {1, 17, 64, 77, 129, 200} appears,
# with Sq < Sk, Sq == Sk and Sq > Sk; head dims {16, 32, 64, 80, 128}; H/Hkv {4/4, 6/2, 4/1}.
SHAPES = [
    (1, 1, 4, 4, 16),
    (1, 200, 6, 2, 64),
    (17, 64, 4, 1, 80),
    (64, 64, 4, 4, 32),
    (77, 129, 6, 2, 128),
    (129, 77, 4, 1, 32),
    (200, 17, 4, 4, 80),
    (129, 129, 6, 2, 16),
    (77, 77, 4, 1, 64),
]


def _leaf(t):
    return t.detach().clone().requires_grad_()


def _inputs(batch, seqlen_q, seqlen_k, heads, heads_kv, head_dim, device, dtype=torch.float32, seed=0):
    gen = torch.Generator().manual_seed(seed)
    shapes = [(batch, seqlen_q, heads, head_dim), (batch, seqlen_k, heads_kv, head_dim),
              (batch, seqlen_k, heads_kv, head_dim), (batch, seqlen_q, heads, head_dim)]
    return [torch.randn(s, generator=gen).to(device, dtype) for s in shapes]


def _check_against_reference(out, grads, q, k, v, dout, causal, q_start, lse=None):
    qd, kd, vd = (_leaf(t.double()) for t in (q, k, v))
    ref_out, ref_lse = reference_attention(qd, kd, vd, causal=causal, q_start=q_start)
    ref_grads = torch.autograd.grad(ref_out, (qd, kd, vd), dout.double())
    assert rel_err(out, ref_out) < FWD_TOL
    if lse is not None:
        assert lse.dtype == torch.float32 and lse.shape == ref_lse.shape
        assert rel_err(lse, ref_lse) < FWD_TOL
        assert torch.equal(torch.isinf(lse), torch.isinf(ref_lse))
    for got, want in zip(grads, ref_grads):
        assert got.shape == want.shape
        assert rel_err(got, want, floor=GRAD_FLOOR) < GRAD_TOL


@pytest.mark.parametrize("device", devices())
@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
def test_flash_attn_func(device, causal, shape):
    q, k, v, dout = _inputs(2, *shape, device)
    q, k, v = _leaf(q), _leaf(k), _leaf(v)
    out, lse = cpattn.flash_attn_func(q, k, v, causal=causal, return_lse=True)
    assert out.dtype == q.dtype and out.shape == q.shape
    grads = torch.autograd.grad(out, (q, k, v), dout)
    # flash-attn aligns causal masks bottom-right: row i sees keys j <= i + Sk - Sq
    _check_against_reference(out, grads, q, k, v, dout, causal, q_start=shape[1] - shape[0], lse=lse)


@pytest.mark.parametrize("device", devices())
@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
def test_sdpa_drop_in(device, causal, shape):
    seqlen_q, seqlen_k, heads, heads_kv, head_dim = shape
    q, k, v, dout = (t.transpose(1, 2) for t in _inputs(2, *shape, device))  # SDPA layout (B, H, L, D)
    q, k, v = _leaf(q), _leaf(k), _leaf(v)
    out = cpattn.scaled_dot_product_attention(q, k, v, is_causal=causal, enable_gqa=heads != heads_kv)
    assert out.shape == (2, heads, seqlen_q, head_dim)
    grads = torch.autograd.grad(out, (q, k, v), dout)
    # torch aligns causal masks top-left: row i sees keys j <= i
    flash = lambda t: t.transpose(1, 2)  # noqa: E731
    _check_against_reference(flash(out), [flash(g) for g in grads], flash(q), flash(k), flash(v), flash(dout),
                             causal, q_start=0)
    # and against torch's own SDPA, forward and backward
    ref = F.scaled_dot_product_attention(q, k, v, is_causal=causal, enable_gqa=heads != heads_kv)
    ref_grads = torch.autograd.grad(ref, (q, k, v), dout)
    assert rel_err(out, ref) < FWD_TOL
    for got, want in zip(grads, ref_grads):
        assert rel_err(got, want, floor=GRAD_FLOOR) < GRAD_TOL


@pytest.mark.parametrize("device", devices())
def test_strided_views_are_read_without_copy(device):
    """q, k, v as views into a packed (B, S, 3, H, D) tensor, with a custom softmax scale."""
    gen = torch.Generator().manual_seed(3)
    qkv = torch.randn(2, 77, 3, 4, 80, generator=gen).to(device).requires_grad_()
    dout = torch.randn(2, 77, 4, 80, generator=gen).to(device)
    q, k, v = qkv.unbind(2)
    assert not q.is_contiguous()
    out = cpattn.flash_attn_func(q, k, v, causal=True, softmax_scale=0.3)
    (grad,) = torch.autograd.grad(out, qkv, dout)
    qkv_ref = qkv.detach().double().requires_grad_()
    ref_out, _ = reference_attention(*qkv_ref.unbind(2), softmax_scale=0.3, causal=True)
    (ref_grad,) = torch.autograd.grad(ref_out, qkv_ref, dout.double())
    assert rel_err(out, ref_out) < FWD_TOL
    assert rel_err(grad, ref_grad, floor=GRAD_FLOOR) < GRAD_TOL


@pytest.mark.parametrize("device", devices())
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("causal", [False, True])
def test_low_precision_within_twice_torch_error(device, dtype, causal):
    """flash-attn's rule: our error vs fp32 is at most about twice torch's error in the same dtype."""
    shape = (2, 129, 77, 4, 2, 64) if device == "cpu" else (2, 1024, 1024, 8, 2, 128)
    q32, k32, v32, dout32 = _inputs(*shape, device)
    q32, k32, v32 = (t.transpose(1, 2) for t in (q32, k32, v32))
    dout32 = dout32.transpose(1, 2)
    ref = F.scaled_dot_product_attention(_leaf(q32), _leaf(k32), _leaf(v32), is_causal=causal, enable_gqa=True)

    def run(fn, cast):
        q, k, v = (_leaf(t.to(cast)) for t in (q32, k32, v32))
        out = fn(q, k, v, is_causal=causal, enable_gqa=True)
        return [out] + list(torch.autograd.grad(out, (q, k, v), dout32.to(cast)))

    ref_all = run(F.scaled_dot_product_attention, torch.float32)
    ours = run(cpattn.scaled_dot_product_attention, dtype)
    torch_low = run(F.scaled_dot_product_attention, dtype)
    for name, mine, theirs, exact in zip(["out", "dq", "dk", "dv"], ours, torch_low, ref_all):
        assert mine.dtype == dtype
        err_mine = (mine.float() - exact).abs().max().item()
        err_torch = (theirs.float() - exact).abs().max().item()
        assert err_mine <= 2 * err_torch + 1e-5, f"{name}: ours {err_mine:.3g} vs torch {err_torch:.3g}"
    del ref


def test_inputs_are_not_modified():
    q, k, v, dout = _inputs(1, 33, 40, 4, 2, 32, "cpu")
    copies = [t.clone() for t in (q, k, v, dout)]
    q, k, v = _leaf(q), _leaf(k), _leaf(v)
    out = cpattn.flash_attn_func(q, k, v, causal=True)
    out.backward(dout)
    for t, c in zip((q, k, v, dout), copies):
        assert torch.equal(t.detach(), c)


def _outputs_and_grads(fn, shapes, seed=0, **kwargs):
    """(outputs, gradients of q, k, v for a random dout) of ``fn`` on random inputs of ``shapes``."""
    gen = torch.Generator().manual_seed(seed)
    q, k, v = (torch.randn(shape, generator=gen).requires_grad_() for shape in shapes)
    outs = fn(q, k, v, **kwargs)
    outs = outs if isinstance(outs, tuple) else (outs,)
    grads = torch.autograd.grad(outs[0], (q, k, v), torch.randn(outs[0].shape, generator=gen))
    return outs, grads


def _assert_same(got, want):
    """Equal shapes, values within fp32 rounding, and exact zeros wherever ``want`` has them."""
    assert got.shape == want.shape and got.dtype == want.dtype
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    assert (got[want == 0] == 0).all()


# (query, key, value shapes, kwargs): every zero-size dimension torch SDPA accepts. Torch (math backend)
# gives an empty output, zeros for an empty key set (also key/value without heads), uniform weights
# for a head dim of 0; the gradients are zeros of the inputs' shapes.
SDPA_ZERO_SIZES = [
    ("batch 0", (0, 2, 3, 8), (0, 2, 4, 8), (0, 2, 4, 8), {}),
    ("heads 0", (1, 0, 3, 8), (1, 0, 4, 8), (1, 0, 4, 8), {"is_causal": True}),
    ("L 0", (1, 2, 0, 8), (1, 2, 4, 8), (1, 2, 4, 8), {"is_causal": True}),
    ("S 0", (2, 2, 3, 8), (2, 2, 0, 8), (2, 2, 0, 8), {}),
    ("S 0 causal", (1, 2, 3, 8), (1, 2, 0, 8), (1, 2, 0, 8), {"is_causal": True}),
    ("L S 0", (1, 2, 0, 8), (1, 2, 0, 8), (1, 2, 0, 8), {}),
    ("GQA S 0", (1, 4, 3, 8), (1, 2, 0, 8), (1, 2, 0, 8), {"enable_gqa": True}),
    ("GQA L 0", (1, 4, 0, 8), (1, 2, 5, 8), (1, 2, 5, 8), {"enable_gqa": True, "is_causal": True}),
    ("GQA no query heads", (1, 0, 3, 8), (1, 2, 4, 8), (1, 2, 4, 8), {"enable_gqa": True}),
    ("no key heads", (1, 2, 3, 8), (1, 0, 4, 8), (1, 0, 4, 8), {}),
    ("no key heads GQA", (1, 2, 3, 8), (1, 0, 4, 8), (1, 0, 4, 8), {"enable_gqa": True}),
    ("one query head, no key heads", (1, 1, 3, 8), (1, 0, 4, 8), (1, 0, 4, 8), {}),
    ("no query heads, one key head", (1, 0, 3, 8), (1, 1, 4, 8), (1, 1, 4, 8), {}),
    ("head dim 0", (1, 2, 3, 0), (1, 2, 5, 0), (1, 2, 5, 8), {"is_causal": True}),
    ("value dim 0", (1, 2, 3, 8), (1, 2, 5, 8), (1, 2, 5, 0), {}),
    ("head dims 0", (1, 2, 3, 0), (1, 2, 5, 0), (1, 2, 5, 0), {"scale": 0.5}),
    ("broadcast batch 0", (0, 2, 3, 8), (1, 2, 4, 8), (1, 2, 4, 8), {}),
    ("3-D S 0", (2, 3, 8), (2, 0, 8), (2, 0, 8), {"is_causal": True}),
]


@pytest.mark.parametrize("query,key,value,kwargs", [c[1:] for c in SDPA_ZERO_SIZES],
                         ids=[c[0] for c in SDPA_ZERO_SIZES])
def test_sdpa_zero_sizes_match_torch(query, key, value, kwargs):
    with torch.nn.attention.sdpa_kernel(torch.nn.attention.SDPBackend.MATH):
        (want,), want_grads = _outputs_and_grads(F.scaled_dot_product_attention, (query, key, value), **kwargs)
    (got,), grads = _outputs_and_grads(cpattn.scaled_dot_product_attention, (query, key, value), **kwargs)
    _assert_same(got, want)
    for g, w in zip(grads, want_grads):
        _assert_same(g, w)


def test_sdpa_zero_sizes_keep_dtype_and_refuse_what_torch_refuses():
    q, kv = torch.randn(1, 2, 3, 8, dtype=torch.float16), torch.randn(1, 2, 0, 8, dtype=torch.float16)
    out = cpattn.scaled_dot_product_attention(q, kv, kv)
    assert out.dtype == torch.float16 and out.shape == (1, 2, 3, 8) and (out == 0).all()
    with pytest.raises(ValueError, match="enable_gqa=True"):  # torch: a RuntimeError, the heads do not broadcast
        cpattn.scaled_dot_product_attention(q[:, :0], kv[:, :, :1].repeat(1, 1, 4, 1), kv[:, :, :1].repeat(1, 1, 4, 1))


# (batch, Sq, Sk, heads, heads_kv, causal, sinks): an empty key set gives out 0 and lse -inf (the
# merge's identity; flash-attn's CUDA code writes +inf there, which cpattn's merges also read as
# empty), or lse = the sink's logit with sinks; every gradient is zero.
FLASH_ZERO_SIZES = [
    (1, 3, 0, 2, 2, False, False),
    (1, 3, 0, 4, 2, True, False),
    (1, 3, 0, 2, 2, True, True),
    (1, 0, 4, 2, 2, True, False),
    (1, 0, 0, 2, 2, False, False),
    (0, 3, 4, 2, 2, True, False),
    (1, 3, 4, 0, 2, False, False),
    (1, 3, 4, 0, 0, True, False),
]


@pytest.mark.parametrize("batch,seqlen_q,seqlen_k,heads,heads_kv,causal,sinks", FLASH_ZERO_SIZES,
                         ids=["x".join(map(str, c[:5])) + ("-causal" if c[5] else "") + ("-sinks" if c[6] else "")
                              for c in FLASH_ZERO_SIZES])
def test_flash_attn_func_zero_sizes(batch, seqlen_q, seqlen_k, heads, heads_kv, causal, sinks):
    sinks = torch.randn(heads).requires_grad_() if sinks else None
    shapes = [(batch, seqlen_q, heads, 8), (batch, seqlen_k, heads_kv, 8), (batch, seqlen_k, heads_kv, 8)]
    (out, lse, _), grads = _outputs_and_grads(cpattn.flash_attn_func, shapes, causal=causal, sinks=sinks,
                                              return_attn_probs=True)
    assert out.shape == shapes[0] and lse.shape == (batch, heads, seqlen_q) and lse.dtype == torch.float32
    # No row here sees a key (or there is no row).
    empty_lse = torch.full_like(lse, float("-inf")) if sinks is None else sinks.detach()[None, :, None].expand_as(lse)
    assert (out == 0).all() and torch.equal(lse, empty_lse)
    for g, shape in zip(grads, shapes):
        assert g.shape == shape and (g == 0).all()
    if sinks is not None:  # d out / d sink = -p_sink * out = 0, and lse is not in the loss
        (dsinks,) = torch.autograd.grad(cpattn.flash_attn_func(*(torch.randn(s) for s in shapes), sinks=sinks).sum(),
                                        sinks)
        assert (dsinks == 0).all()


def test_flash_attn_func_refuses_key_heads_0_and_head_dim_0():
    with pytest.raises(ValueError, match=r"multiple of kv heads \(0\)"):
        cpattn.flash_attn_func(_t(1, 3, 2, 8), _t(1, 4, 0, 8), _t(1, 4, 0, 8))
    with pytest.raises(ValueError, match="head dim must be at least 1"):  # its lse would be log(#keys)
        cpattn.flash_attn_func(_t(1, 3, 2, 0), _t(1, 4, 2, 0), _t(1, 4, 2, 0))


# (cu_seqlens_q, cu_seqlens_k): no documents, only empty ones, no keys at all, no queries at all, and
# documents with queries but no keys next to keys without queries.
VARLEN_ZERO_SIZES = [([0], [0]), ([0, 0], [0, 0]), ([0, 3], [0, 0]), ([0, 0], [0, 4]),
                     ([0, 2, 2, 5], [0, 0, 3, 3])]


@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("cu_q,cu_k", VARLEN_ZERO_SIZES, ids=[f"{q}-{k}" for q, k in VARLEN_ZERO_SIZES])
def test_flash_attn_varlen_func_zero_sizes(cu_q, cu_k, causal):
    shapes = [(cu_q[-1], 2, 8), (cu_k[-1], 1, 8), (cu_k[-1], 1, 8)]
    cu_q, cu_k = torch.tensor(cu_q, dtype=torch.int32), torch.tensor(cu_k, dtype=torch.int32)
    longest = [int(cu.diff().max()) if cu.numel() > 1 else 0 for cu in (cu_q, cu_k)]
    (out, lse, _), grads = _outputs_and_grads(
        lambda q, k, v: cpattn.flash_attn_varlen_func(q, k, v, cu_q, cu_k, *longest, causal=causal,
                                                      return_attn_probs=True), shapes)
    assert out.shape == shapes[0] and lse.shape == (2, shapes[0][0])
    if cu_q.numel() > 1:
        gen = torch.Generator().manual_seed(0)  # _outputs_and_grads' inputs
        ref_out, ref_lse = reference_varlen(*(torch.randn(s, generator=gen) for s in shapes), cu_q, cu_k,
                                            causal=causal)
        assert torch.equal(torch.isinf(lse), torch.isinf(ref_lse)) and rel_err(lse, ref_lse) < FWD_TOL
        assert rel_err(out, ref_out) < FWD_TOL
    assert (out == 0).all() and (lse == float("-inf")).all()  # every document here lacks keys or queries
    for g, shape in zip(grads, shapes):
        assert g.shape == shape and (g == 0).all()


def test_sdpa_fallbacks_warn_once_and_match_torch():
    q, k, v = (torch.randn(1, 2, 9, 16) for _ in range(3))
    mask = torch.rand(9, 9) > 0.3
    mask[:, 0] = True
    cpattn.attention.warned_fallbacks.clear()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        out = cpattn.scaled_dot_product_attention(q, k, v, attn_mask=mask)
        cpattn.scaled_dot_product_attention(q, k, v, attn_mask=mask)
    assert sum("attn_mask" in str(w.message) for w in caught) == 1
    torch.testing.assert_close(out, F.scaled_dot_product_attention(q, k, v, attn_mask=mask))
    with pytest.warns(UserWarning, match="dropout"):
        cpattn.scaled_dot_product_attention(q, k, v, dropout_p=0.5)
    with pytest.warns(UserWarning, match="float64"):
        out = cpattn.scaled_dot_product_attention(q.double(), k.double(), v.double(), is_causal=True)
    torch.testing.assert_close(out, F.scaled_dot_product_attention(q.double(), k.double(), v.double(), is_causal=True))


def _t(*shape, dtype=torch.float32):
    return torch.zeros(*shape, dtype=dtype)


BAD_FLASH_INPUTS = [
    ("3-D q", (_t(2, 8, 16), _t(1, 8, 2, 16), _t(1, 8, 2, 16)), ValueError, "must be 4-D"),
    ("head dim mismatch", (_t(1, 8, 2, 16), _t(1, 8, 2, 32), _t(1, 8, 2, 32)), ValueError, "head dims differ"),
    ("v head dim too big", (_t(1, 8, 2, 16), _t(1, 8, 2, 16), _t(1, 8, 2, 264)), ValueError, "maximum 256"),
    ("v head dim 0", (_t(1, 8, 2, 16), _t(1, 8, 2, 16), _t(1, 8, 2, 0)), ValueError, "at least 1"),
    ("H not multiple of Hkv", (_t(1, 8, 6, 16), _t(1, 8, 4, 16), _t(1, 8, 4, 16)), ValueError, "multiple of kv heads"),
    ("batch mismatch", (_t(2, 8, 2, 16), _t(1, 8, 2, 16), _t(1, 8, 2, 16)), ValueError, "batch sizes differ"),
    ("kv length mismatch", (_t(1, 8, 2, 16), _t(1, 8, 2, 16), _t(1, 9, 2, 16)), ValueError, "lengths differ"),
    ("kv heads mismatch", (_t(1, 8, 2, 16), _t(1, 8, 2, 16), _t(1, 8, 1, 16)), ValueError, "head counts differ"),
    ("dtype mismatch", (_t(1, 8, 2, 16), _t(1, 8, 2, 16, dtype=torch.float16), _t(1, 8, 2, 16)), TypeError,
     "share one dtype"),
    ("integer dtype", (_t(1, 8, 2, 16, dtype=torch.int32),) * 3, TypeError, "dtype torch.int32"),
    ("float64", (_t(1, 8, 2, 16, dtype=torch.float64),) * 3, TypeError, "supported: float16"),
    ("head dim too big", (_t(1, 8, 2, 320),) * 3, ValueError, "above the supported maximum 256"),
    ("not a tensor", ([[1.0]], _t(1, 8, 2, 16), _t(1, 8, 2, 16)), TypeError, "must be a torch.Tensor"),
]


@pytest.mark.parametrize("name,args,exc,match", BAD_FLASH_INPUTS, ids=[c[0] for c in BAD_FLASH_INPUTS])
def test_flash_attn_func_rejects_bad_input(name, args, exc, match):
    with pytest.raises(exc, match=match):
        cpattn.flash_attn_func(*args)


def test_bad_input_devices_and_scale():
    q = _t(1, 8, 2, 16)
    with pytest.raises(ValueError, match="one device"):
        cpattn.flash_attn_func(q, q, q.to("meta"))
    with pytest.raises(TypeError, match="softmax scale"):
        cpattn.flash_attn_func(q, q, q, softmax_scale="0.1")


def test_sdpa_rejects_bad_input():
    q = _t(1, 4, 8, 16)
    kv = _t(1, 2, 8, 16)
    with pytest.raises(ValueError, match="enable_gqa=True"):
        cpattn.scaled_dot_product_attention(q, kv, kv)
    with pytest.raises(ValueError, match="do not broadcast"):
        cpattn.scaled_dot_product_attention(q[0], kv[0], kv[0], enable_gqa=True)
    with pytest.raises(ValueError, match="at least 3 dimensions"):
        cpattn.scaled_dot_product_attention(q[0, 0], kv[0, 0], kv[0, 0])
    with pytest.raises(ValueError, match="lengths differ"):
        cpattn.scaled_dot_product_attention(q, kv, kv[:, :, :5], enable_gqa=True)
    with pytest.raises(TypeError, match="dtype torch.int64"):
        cpattn.scaled_dot_product_attention(q.long(), kv.long(), kv.long(), enable_gqa=True)


def test_positive_int_check():
    from cpattn.checks import positive_int
    assert positive_int(3, "n", "f") == 3 and positive_int(None, "n", "f", allow_none=True) is None
    with pytest.raises(TypeError, match="f: n must be a positive int, got bool"):
        positive_int(True, "n", "f")
    with pytest.raises(ValueError, match="f: n must be a positive int, got 0"):
        positive_int(0, "n", "f")


@pytest.mark.parametrize("device", devices())
def test_atomic_dq_keyword(device):
    """atomic_dq=True (the 5-GEMM backward) gives the reference gradients through the public
    functions, dense and varlen, and is refused with deterministic=True or a non-bool."""
    q, k, v, dout = _inputs(1, 33, 65, 4, 2, 32, device)
    q, k, v = _leaf(q), _leaf(k), _leaf(v)
    out = cpattn.flash_attn_func(q, k, v, causal=True, atomic_dq=True)
    grads = torch.autograd.grad(out, (q, k, v), dout)
    _check_against_reference(out, grads, q, k, v, dout, True, q_start=65 - 33)
    cu = torch.tensor([0, 33], dtype=torch.int32, device=device)
    cu_k = torch.tensor([0, 65], dtype=torch.int32, device=device)
    out = cpattn.flash_attn_varlen_func(q[0], k[0], v[0], cu, cu_k, 33, 65, causal=True, atomic_dq=True)
    varlen_grads = torch.autograd.grad(out, (q, k, v), dout[0])
    for got, want in zip(varlen_grads, grads):
        assert rel_err(got[0], want[0].double(), floor=GRAD_FLOOR) < GRAD_TOL
    with pytest.raises(ValueError, match="deterministic=True"):
        cpattn.flash_attn_func(q, k, v, deterministic=True, atomic_dq=True)
    with pytest.raises(TypeError, match="atomic_dq must be a bool"):
        cpattn.flash_attn_func(q, k, v, atomic_dq=1)
