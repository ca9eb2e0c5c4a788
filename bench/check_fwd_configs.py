"""Every kept forward config, one at a time, against torch SDPA on a GPU (a correctness sweep).

    python bench/check_fwd_configs.py --out DIR      # on a GPU: about two minutes, mostly compiles

Autotuning picks one config per shape and the others never run, so a config that computes
wrong values hides until a shape picks it. Here each config in the list that
``kernels/autotune.keep_configs`` keeps for this GPU is forced in turn (every other config
pruned), for bf16 and fp16, head dims 64 and 128, causal and not, and two lengths; the
forward's out is compared with SDPA's (flash backend) and a NaN or an error above 4x
SDPA's own error against float32 fails the config. Each row is written as it finishes.
"""
import argparse
import json
import math
import sys
import time
from pathlib import Path

import torch

import cpattn
from cpattn.kernels import autotune

_forced = {"index": 0, "seen": None}


def _forced_limit(configs, limit):
    """The config at the forced index of the kept list (the list itself remembered for the row)."""
    _forced["seen"] = [str(c) for c in configs]
    index = _forced["index"]
    return configs[index:index + 1] if index < len(configs) else []


def _case(dtype, head_dim, causal, seqlen, batch=2, heads=8):
    gen = torch.Generator(device="cuda").manual_seed(seqlen + head_dim)
    q, k, v = (torch.randn((batch, seqlen, heads, head_dim), generator=gen, device="cuda", dtype=dtype)
               for _ in range(3))
    ref = torch.nn.functional.scaled_dot_product_attention(
        *(t.float().transpose(1, 2) for t in (q, k, v)), is_causal=causal).transpose(1, 2)
    with torch.nn.attention.sdpa_kernel(torch.nn.attention.SDPBackend.FLASH_ATTENTION):
        torch_out = torch.nn.functional.scaled_dot_product_attention(
            *(t.transpose(1, 2) for t in (q, k, v)), is_causal=causal).transpose(1, 2)
    return q, k, v, ref, (torch_out.float() - ref).abs().max().item()


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--seqlens", default="1000,4096")
    args = p.parse_args(argv)
    if not torch.cuda.is_available():
        print("check_fwd_configs: needs a GPU (CPU runs one fixed block size: nothing to sweep)")
        return 0
    autotune.limit_configs = _forced_limit
    args.out.mkdir(parents=True, exist_ok=True)
    rows, failed = [], 0
    path = args.out / "fwd_configs.json"
    for dtype in (torch.bfloat16, torch.float16):
        for head_dim in (64, 128):
            for causal in (False, True):
                for seqlen in (int(s) for s in args.seqlens.split(",")):
                    q, k, v, ref, torch_err = _case(dtype, head_dim, causal, seqlen)
                    index = 0
                    while True:
                        _forced["index"], _forced["seen"] = index, None
                        autotune.forget_tuning()
                        start = time.time()
                        try:
                            out = cpattn.flash_attn_func(q, k, v, causal=causal)
                            torch.cuda.synchronize()
                            err = (out.float() - ref).abs().max().item()
                            status = "ok" if math.isfinite(err) and err <= 4 * torch_err + 1e-3 else "WRONG"
                        except Exception as exc:  # an index past the list prunes every config
                            if _forced["seen"] is not None and index >= len(_forced["seen"]):
                                break
                            err, status = None, f"error: {type(exc).__name__}: {str(exc)[:200]}"
                        config = _forced["seen"][index] if _forced["seen"] and index < len(_forced["seen"]) else "?"
                        row = dict(dtype=str(dtype).replace("torch.", ""), head_dim=head_dim, causal=causal,
                                   seqlen=seqlen, config=config, max_err=err, sdpa_flash_err=torch_err,
                                   status=status, seconds=round(time.time() - start, 1))
                        rows.append(row)
                        failed += status != "ok"
                        print(f"{status:5s} {row['dtype']} d{head_dim} {'causal' if causal else 'full'} "
                              f"S={seqlen} err={err} (sdpa {torch_err:.2e}) {config}", flush=True)
                        path.write_text(json.dumps({"device": torch.cuda.get_device_name(), "rows": rows},
                                                   indent=1))
                        index += 1
                        if _forced["seen"] is None or index >= len(_forced["seen"]):
                            break
    print(f"check_fwd_configs: {len(rows) - failed}/{len(rows)} config runs ok")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
