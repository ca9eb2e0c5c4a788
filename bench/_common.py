"""What every bench/ script shares: device and versions, the FLOP formula,
timing, torch SDPA's backends, result saving and table printing.

Each script is run as ``python bench/<script>.py``, which puts this folder on
``sys.path``, so the scripts ``import _common``.

``--quick`` runs a tiny grid on CPU, where the kernels go through Triton's
interpreter: it checks that a script works end to end, and its times say
nothing about speed (every saved file carries that note).
"""
import argparse
import csv
import datetime
import json
import platform
import re
import statistics
import sys
import time
import warnings
from pathlib import Path

import torch
import triton

import cpattn

RESULTS_ROOT = Path(__file__).resolve().parent / "results"
QUICK_NOTE = ("--quick: CPU through the Triton interpreter; the times are NOT meaningful "
              "performance numbers, they only show the script runs")
DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


# ---------------------------------------------------------------- arguments

def base_parser(description):
    """The arguments every script takes: --quick and --out."""
    parser = argparse.ArgumentParser(description=description,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true",
                        help="tiny grid on CPU through the Triton interpreter (tests the script; no timing claims)")
    parser.add_argument("--out", type=Path, default=None,
                        help="output folder (default: bench/results/<device>/, or bench/results/quick/ with --quick)")
    return parser


def int_list(text):
    return [int(x) for x in text.split(",") if x]


def head_dim_list(text):
    """"64,128,192:128" -> [(64, 64), (128, 128), (192, 128)]: q/k head dim, then v's where it differs."""
    pairs = []
    for item in text.split(","):
        if item:
            d, _, dv = item.partition(":")
            pairs.append((int(d), int(dv or d)))
    return pairs


def str_list(text):
    return [x for x in text.split(",") if x]


def pick_device(quick):
    """CPU for --quick; otherwise a GPU, which the real benchmarks need."""
    if quick:
        return torch.device("cpu")
    if not torch.cuda.is_available():
        sys.exit("no CUDA GPU found: run with --quick for the CPU smoke run (no meaningful timings)")
    return torch.device("cuda")


# ---------------------------------------------------------------- environment

def device_name(device):
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"CPU {platform.processor() or platform.machine()}".strip()


def environment(device, quick):
    """Where and when the numbers were taken; saved with every result file."""
    env = {
        "device": device_name(device),
        "date_utc": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"),
        "torch": torch.__version__,
        "triton": triton.__version__,
        "cpattn": cpattn.__version__,
        "python": platform.python_version(),
        "cuda": torch.version.cuda if device.type == "cuda" else None,
        "quick": bool(quick),
        "timing": ("triton.testing.do_bench, median" if device.type == "cuda"
                   else "time.perf_counter, one call (no warm-up)"),
    }
    if quick:
        env["note"] = QUICK_NOTE
    return env


def output_dir(args, device):
    if args.out is not None:
        return Path(args.out)
    if args.quick:
        return RESULTS_ROOT / "quick"
    return RESULTS_ROOT / re.sub(r"[^A-Za-z0-9]+", "_", device_name(device)).strip("_")


# ---------------------------------------------------------------- FLOPs and timing

def attention_flops(batch, heads, seqlen_q, seqlen_k, head_dim, causal, mode="fwd", value_head_dim=None):
    """2*B*H*Sq*Sk*(D + Dv) for the forward (q.k over D, p.v over Dv; 4*B*H*Sq*Sk*D when they are
    equal), halved when causal with Sq == Sk; the backward counts 2.5x the forward, forward+backward 3.5x."""
    value_head_dim = head_dim if value_head_dim is None else value_head_dim
    flops = 2 * batch * heads * seqlen_q * seqlen_k * (head_dim + value_head_dim)
    if causal and seqlen_q == seqlen_k:
        flops //= 2
    return flops * {"fwd": 1.0, "bwd": 2.5, "fwd+bwd": 3.5}[mode]


def synchronize(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_ms(fn, device, grad_to_none=None, cpu_reps=1):
    """Median milliseconds of ``fn()``: triton.testing.do_bench on a GPU; on CPU (--quick, the
    interpreter, where the number means nothing) ``cpu_reps`` timed calls, no warm-up."""
    if device.type == "cuda":
        return triton.testing.do_bench(fn, grad_to_none=grad_to_none, return_mode="median")
    times = []
    for _ in range(cpu_reps):
        for t in grad_to_none or ():
            t.grad = None
        start = time.perf_counter()
        fn()
        times.append((time.perf_counter() - start) * 1e3)
    return statistics.median(times)


# ---------------------------------------------------------------- inputs and torch SDPA backends

def attention_inputs(batch, seqlen, heads, kv_heads, head_dim, dtype, device, seed=0, value_head_dim=None):
    """Random q, k, v, dout in flash layout (B, S, H, D), contiguous; ``dtype`` a DTYPES key.
    ``value_head_dim``: v's and dout's head dim when it differs from q's and k's (MLA)."""
    gen = torch.Generator(device=device).manual_seed(seed)
    value_head_dim = head_dim if value_head_dim is None else value_head_dim

    def rand(h, dim):
        return torch.randn((batch, seqlen, h, dim), generator=gen, device=device, dtype=DTYPES[dtype])

    return rand(heads, head_dim), rand(kv_heads, head_dim), rand(kv_heads, value_head_dim), rand(heads, value_head_dim)


def sdpa_backends(names):
    """{name: SDPBackend} for the names given (math, flash, efficient, cudnn)."""
    from torch.nn.attention import SDPBackend
    table = {"math": SDPBackend.MATH, "flash": SDPBackend.FLASH_ATTENTION,
             "efficient": SDPBackend.EFFICIENT_ATTENTION, "cudnn": SDPBackend.CUDNN_ATTENTION}
    unknown = set(names) - set(table)
    if unknown:
        raise SystemExit(f"unknown SDPA backend(s) {sorted(unknown)}; choose from {sorted(table)}")
    return {n: table[n] for n in names}


def sdpa_call(backend, q, k, v, causal):
    """A function running torch SDPA on (B, H, S, D) inputs with exactly one backend.

    GQA is passed as ``enable_gqa=True`` (kv is not repeated). Raises
    ``Unsupported`` when the backend refuses the inputs, with torch's reason.
    """
    from torch.nn.attention import sdpa_kernel
    gqa = q.shape[1] != k.shape[1]

    def run():
        with sdpa_kernel(backend):
            return torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=causal, enable_gqa=gqa)

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            with torch.no_grad():  # a probe: no graph to keep
                run()
        except RuntimeError as exc:
            reasons = [str(w.message).splitlines()[0] for w in caught] or [str(exc).splitlines()[0]]
            raise Unsupported("; ".join(reasons)[:300]) from None
    return run


class Unsupported(Exception):
    """A torch SDPA backend refused the inputs (reported, never hidden)."""


def try_backend(measure):
    """``measure()`` for one SDPA backend, or a string saying why it could not run:
    "unsupported: ..." (refused the shape), "out of memory", or "error: ..." (accepted
    the shape, then failed, e.g. in the backward)."""
    try:
        return measure()
    except Unsupported as exc:
        return f"unsupported: {exc}"
    except torch.cuda.OutOfMemoryError:
        torch.cuda.empty_cache()
        return "out of memory"
    except RuntimeError as exc:
        return f"error: {str(exc).splitlines()[0][:200]}"


# ---------------------------------------------------------------- saving and printing

def save_results(out_dir, name, env, rows, extra=None):
    """Write <name>.json (environment + rows + extra) and <name>.csv (rows); return the paths."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    json_path, csv_path = out_dir / f"{name}.json", out_dir / f"{name}.csv"
    payload = {"environment": env, "rows": rows, **(extra or {})}
    json_path.write_text(json.dumps(payload, indent=1, default=str) + "\n")
    columns = list(dict.fromkeys(key for row in rows for key in row))
    with csv_path.open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=columns)
        writer.writeheader()
        writer.writerows(rows)
    return [json_path, csv_path]


def print_saved(paths, quick, quick_note=QUICK_NOTE):
    """The closing lines of every script: the --quick warning where it applies, then the files written."""
    if quick:
        print(quick_note)
    print("saved: " + ", ".join(str(p) for p in paths if p))


def fmt(value):
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:.3g}" if abs(value) < 1e4 else f"{value:.3e}"
    return str(value)


def print_table(rows, columns, title=None):
    """Print ``rows`` (dicts) as an aligned text table; ``columns`` is [(key, header), ...]."""
    if title:
        print(f"\n{title}")
    cells = [[header for _, header in columns]] + [[fmt(row.get(key)) for key, _ in columns] for row in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(columns))]
    for i, r in enumerate(cells):
        print("  ".join(c.rjust(w) for c, w in zip(r, widths)))
        if i == 0:
            print("  ".join("-" * w for w in widths))


def progress(i, total, label):
    """One self-overwriting progress line (a newline at the end)."""
    end = "\n" if i == total else ""
    print(f"\r[{i}/{total}] {label:<90.90s}", end=end, flush=True)


def plot_title(env, text):
    """A plot title naming the device, and saying so when the numbers come from --quick."""
    return f"{env['device']}: {text}" + ("\n[--quick: CPU interpreter, NOT meaningful timing]" if env["quick"] else "")


def plot_lines(path, rows, x, series, panel_key, title, ylabel, log_y=False, ncols=4):
    """Plot y against ``x`` for each (label, column) in ``series``, one panel per value of
    ``panel_key(row)``. Needs matplotlib (optional): without it, says so and returns None."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print(f"matplotlib not installed: skipping the plot {Path(path).name} (pip install matplotlib)")
        return None
    panels = list(dict.fromkeys(panel_key(r) for r in rows))
    ncols = min(ncols, len(panels))
    nrows = -(-len(panels) // ncols)
    fig, axes = plt.subplots(nrows, ncols, figsize=(max(7.0, 4.5 * ncols), 3.4 * nrows + 0.6), squeeze=False)
    for ax, panel in zip(axes.flat, panels):
        sub = [r for r in rows if panel_key(r) == panel]
        for label, column in series:
            points = sorted((r[x], r[column]) for r in sub if isinstance(r.get(column), (int, float)))
            if points:
                ax.plot(*zip(*points), marker="o", label=label)
        ax.set_title(panel, fontsize=9)
        ax.set_xscale("log", base=2)
        if log_y:
            ax.set_yscale("log")
        ax.set_xlabel(x)
        ax.set_ylabel(ylabel)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    for ax in list(axes.flat)[len(panels):]:
        ax.axis("off")
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return Path(path)
