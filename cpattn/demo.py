"""cpattn demo: attention on random inputs, checked against torch SDPA.

    python -m cpattn.demo            # single device: small on CPU, large on a GPU

Prints the error against torch SDPA (forward and gradients) and the time.
"""
import argparse
import time

import torch

import cpattn


def _sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _timed(fn, device):
    _sync(device)
    start = time.perf_counter()
    result = fn()
    _sync(device)
    return result, time.perf_counter() - start


def rel_error(x, ref):
    return ((x.float() - ref.float()).norm() / ref.float().norm().clamp_min(1e-30)).item()


def single_device(args):
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.type == "cuda":
        batch, seqlen, heads, heads_kv, head_dim, dtype = 2, 4096, 16, 4, 128, torch.bfloat16
    else:
        batch, seqlen, heads, heads_kv, head_dim, dtype = 1, 256, 4, 2, 64, torch.float32
    seqlen = args.seqlen or seqlen
    gen = torch.Generator(device="cpu").manual_seed(0)
    q = torch.randn(batch, seqlen, heads, head_dim, generator=gen).to(device, dtype).requires_grad_()
    k = torch.randn(batch, seqlen, heads_kv, head_dim, generator=gen).to(device, dtype).requires_grad_()
    v = torch.randn(batch, seqlen, heads_kv, head_dim, generator=gen).to(device, dtype).requires_grad_()
    dout = torch.randn(batch, seqlen, heads, head_dim, generator=gen).to(device, dtype)
    print(f"cpattn {cpattn.__version__} on {device} ({'compiled Triton' if device.type == 'cuda' else 'Triton interpreter'})")
    print(f"shape: batch={batch} seqlen={seqlen} heads={heads} kv_heads={heads_kv} head_dim={head_dim} "
          f"dtype={str(dtype).replace('torch.', '')} causal={args.causal}")

    out, t_fwd = _timed(lambda: cpattn.flash_attn_func(q, k, v, causal=args.causal), device)
    grads, t_bwd = _timed(lambda: torch.autograd.grad(out, (q, k, v), dout), device)

    # torch SDPA in SDPA layout; fp32 math on CPU as the reference
    def sdpa():
        qt, kt, vt = (t.transpose(1, 2) for t in (q, k, v))
        return torch.nn.functional.scaled_dot_product_attention(qt, kt, vt, is_causal=args.causal,
                                                                enable_gqa=True).transpose(1, 2)
    ref, t_ref_fwd = _timed(sdpa, device)
    ref_grads, t_ref_bwd = _timed(lambda: torch.autograd.grad(ref, (q, k, v), dout), device)

    print(f"{'':10s}{'forward':>12s}{'dq':>12s}{'dk':>12s}{'dv':>12s}")
    print(f"{'rel error':10s}{rel_error(out, ref):12.2e}" + "".join(f"{rel_error(a, b):12.2e}"
                                                              for a, b in zip(grads, ref_grads)))
    print(f"time  cpattn fwd {t_fwd * 1e3:9.1f} ms  bwd {t_bwd * 1e3:9.1f} ms")
    print(f"time  torch  fwd {t_ref_fwd * 1e3:9.1f} ms  bwd {t_ref_bwd * 1e3:9.1f} ms"
          + ("   (first calls include Triton compilation/autotuning; see bench/ for timings)"
             if device.type == "cuda" else "   (CPU runs the Triton interpreter: correctness, not speed)"))


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seqlen", type=int, default=None, help="sequence length (default: sized for the device)")
    parser.add_argument("--no-causal", dest="causal", action="store_false", help="full (non-causal) attention")
    args = parser.parse_args(argv)
    single_device(args)


if __name__ == "__main__":
    main()
