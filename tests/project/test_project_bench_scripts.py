"""The bench/ scripts run end to end in --quick mode (CPU, Triton interpreter) and
save what their README says. No timing is checked: --quick times mean nothing."""
import csv
import importlib
import importlib.util
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parents[2] / "bench"
ENV_KEYS = {"device", "date_utc", "torch", "triton", "cpattn", "quick", "timing", "note"}


def run_script(name, out_dir, *argv):
    """Call bench/<name>.py's main() with --quick; return (json payload, csv rows)."""
    sys.path.insert(0, str(BENCH))
    try:
        importlib.import_module(name).main(["--quick", "--out", str(out_dir), *argv])
    finally:
        sys.path.remove(str(BENCH))
    stem = name.removeprefix("bench_")
    payload = json.loads((out_dir / f"{stem}.json").read_text())
    with (out_dir / f"{stem}.csv").open() as f:
        rows = list(csv.DictReader(f))
    assert ENV_KEYS <= set(payload["environment"])
    assert payload["environment"]["quick"] is True and "NOT meaningful" in payload["environment"]["note"]
    assert len(rows) == len(payload["rows"]) > 0
    assert set(rows[0]) == set(payload["rows"][0])
    return payload, rows


@pytest.mark.slow  # a benchmark's CPU smoke (18 s); the varlen kernels are tested in tests/api
def test_bench_varlen(tmp_path):
    payload, _ = run_script("bench_varlen", tmp_path)
    rows = payload["rows"]
    assert len(rows) == 8 and {r["packing"] for r in rows} == {"long-tailed", "1 long + 16 short"}
    assert all(r["documents"] > 1 and r["tokens"] == 128 for r in rows)
    assert all(r[f"{impl}_status"] == "ok" and r[f"{impl}_tflops"] > 0 for r in rows
               for impl in ("cpattn", "sdpa-mask", "sdpa-loop"))


def test_bench_attention(tmp_path):
    payload, _ = run_script("bench_attention", tmp_path, "--seqlens", "64", "--modes", "fwd,bwd")
    rows = payload["rows"]
    # 2 causal x 2 (mha, gqa) shapes x 2 modes
    assert len(rows) == 8
    assert {r["mode"] for r in rows} == {"fwd", "bwd"} and {r["attn"] for r in rows} == {"mha", "gqa"}
    for r in rows:
        assert r["cpattn_ms"] > 0 and r["cpattn_tflops"] > 0
        assert r["math_status"] == "ok" and r["xmath"] == pytest.approx(r["math_ms"] / r["cpattn_ms"])
        # torch has no memory-efficient kernel on CPU: reported, not hidden
        assert r["efficient_status"].startswith("unsupported") and r["xefficient"] is None
        assert r["cpattn_max_abs_err_vs_sdpa"] < 1e-4
    fwd = next(r for r in rows if r["mode"] == "fwd" and not r["causal"])
    assert fwd["flops"] == 4 * fwd["batch"] * fwd["heads"] * 64 * 64 * fwd["head_dim"]


def test_bench_merge(tmp_path):
    payload, _ = run_script("bench_merge", tmp_path, "--seqlens", "64")
    for r in payload["rows"]:
        assert r["merge_gbs"] > 0 and r["copy_gbs"] > 0
        assert r["of_copy"] == pytest.approx(r["merge_gbs"] / r["copy_gbs"])
    assert {r["inplace"] for r in payload["rows"]} == {False, True}


def test_bench_memory(tmp_path):
    payload, _ = run_script("bench_memory", tmp_path)
    assert (tmp_path / "memory.png").exists() == (importlib.util.find_spec("matplotlib") is not None)
    assert "model only" in payload["environment"]["measures"]
    rows = payload["rows"]
    # the model: fused kernels linear in the sequence, the math backend quadratic
    for a, b in zip(rows, rows[1:]):
        assert b["model_fused_mib"] / a["model_fused_mib"] == pytest.approx(b["seqlen"] / a["seqlen"])
        quadratic = [r["model_math_mib"] - r["model_fused_mib"] for r in (a, b)]
        assert quadratic[1] / quadratic[0] == pytest.approx((b["seqlen"] / a["seqlen"]) ** 2)


def test_bench_cp_decomposition(tmp_path):
    sys.path.insert(0, str(BENCH))
    try:
        summary, comm = importlib.import_module("bench_cp_decomposition").main(
            ["--quick", "--out", str(tmp_path), "--degrees", "2", "--impls", "ring,zigzag"])
    finally:
        sys.path.remove(str(BENCH))
    for stem, rows in (("cp_decomposition", summary), ("cp_comm", comm)):
        payload = json.loads((tmp_path / f"{stem}.json").read_text())
        assert ENV_KEYS <= set(payload["environment"]) and len(payload["rows"]) == len(rows) > 0
    assert {(r["impl"], r["direction"]) for r in summary} == {(i, d) for i in ("ring", "zigzag") for d in ("fwd", "bwd")}
    for r in summary:
        assert r["fwd_max_abs_err"] < 1e-5  # the replayed ranks together give the monolithic output
        assert r["ratio"] == pytest.approx(r["total_ms"] / r["mono_ms"])
    # 2 ranks: the forward sends one kv shard (step 0); the backward also sends dk/dv after each step
    fwd = [r for r in comm if r["impl"] == "zigzag" and r["direction"] == "fwd"]
    bwd = [r for r in comm if r["impl"] == "zigzag" and r["direction"] == "bwd"]
    kv_bytes = fwd[0]["send_bytes"]
    assert [r["send_bytes"] for r in fwd] == [kv_bytes, 0]
    assert [r["step"] for r in bwd] == [0, 1, "after last"] and bwd[-1]["nvlink_hidden"] is False
    # the window table: a 4k causal window over 128k on 8 ranks needs 2 ring steps (1 kv send per rank)
    window = {(r["impl"], r["window"]): r for r in json.loads((tmp_path / "cp_window.json").read_text())["rows"]}
    assert window[("ring", 4096)]["steps"] == 2 and window[("ring", "none")]["steps"] == 8
    assert window[("ring", 4096)]["kv_bytes_sent_per_rank"] * 7 == window[("ring", "none")]["kv_bytes_sent_per_rank"]
    assert window[("zigzag", 4096)]["kernel_calls_max"] < window[("zigzag", "none")]["kernel_calls_min"]


def test_plot_skipped_without_matplotlib(tmp_path, monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # makes "import matplotlib" fail
    monkeypatch.syspath_prepend(str(BENCH))
    common = importlib.import_module("_common")
    rows = [{"seqlen": 64, "y": 1.0}]
    assert common.plot_lines(tmp_path / "p.png", rows, "seqlen", [("y", "y")], lambda r: "", "t", "y") is None
    assert not (tmp_path / "p.png").exists() and "matplotlib not installed" in capsys.readouterr().out


@pytest.mark.slow  # the GPU session's NCCL script on gloo (21 s); every algorithm is tested in tests/cp
def test_check_nccl_quick_runs_every_algorithm_on_gloo(tmp_path):
    payload, _ = run_script("check_nccl", tmp_path)
    rows = payload["rows"]
    assert {r["algo"] for r in rows} == {"ring", "zigzag", "ulysses"}
    assert {r["causal"] for r in rows} == {True, False} and {r["kv_heads"] for r in rows} == {8, 2}
    for r in rows:
        assert r["ok"] and r["out_rel_err"] < 1e-4 and r["dk_rel_err"] < 1e-3


def test_gpu_smoke_quick_applies_flash_attn_rule(tmp_path):
    sys.path.insert(0, str(BENCH))
    try:  # its rows differ per kind of case (out/dq/dk/dv, kernel/step): read the JSON only
        importlib.import_module("gpu_smoke").main(["--quick", "--out", str(tmp_path), "--cases",
                                                   "flash-bf16-d64-causal-gqa-q>k,decode-bf16-d128-paged-gqa"])
    finally:
        sys.path.remove(str(BENCH))
    payload = json.loads((tmp_path / "gpu_smoke.json").read_text())
    assert ENV_KEYS <= set(payload["environment"]) and "2 x torch" in payload["environment"]["rule"]
    rows = {r["case"]: r for r in payload["rows"]}
    assert set(rows) == {"flash-bf16-d64-causal-gqa-q>k", "decode-bf16-d128-paged-gqa"}
    flash = rows["flash-bf16-d64-causal-gqa-q>k"]
    for name in ("out", "dq", "dk", "dv"):
        assert flash[f"{name}_err"] <= 2 * flash[f"{name}_torch_err"] + 1e-5
    assert all(r["ok"] for r in rows.values()) and rows["decode-bf16-d128-paged-gqa"]["kernel_err"] < 1e-5


def _session(*args):
    """bench/gpu_session.sh with this interpreter first on PATH (its stages call python3)."""
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}"}
    env.pop("OUT", None)
    return subprocess.run(["bash", str(BENCH / "gpu_session.sh"), *args], capture_output=True, text=True,
                          env=env, timeout=600, cwd=BENCH.parent)


def test_gpu_session_dry_run_reaches_every_stage():
    result = _session("all", "--dry-run")
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert re.findall(r"^=== stage (\d) ", result.stdout, re.M) == ["1", "2", "3", "4", "5"]
    for script in ("gpu_env.py", "gpu_smoke.py", "check_fwd_configs.py", "bench_attention.py", "bench_cp_decomposition.py",
                   "bench_merge.py", "bench_decode.py", "test_decode_step_cuda_graph_replays_exactly",
                   "check_nccl.py"):
        assert script in result.stdout
    assert "every step passed" in result.stdout
    assert not (BENCH / "results" / "dry-run").exists()  # a dry run writes no results
    # The budget: the whole command within 8 minutes on a fresh GPU machine, enforced by the stage timeouts.
    assert sum(int(t) for t in re.findall(r"^\+ \(timeout (\d+)s\)", result.stdout, re.M)) <= 480


def test_gpu_session_more_head_dims_dry_run():
    result = _session("more-head-dims", "--dry-run")
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert "--head-dims 64,192:128" in result.stdout and "every step passed" in result.stdout


def test_gpu_session_refuses_an_unknown_stage():
    result = _session("everything", "--dry-run")
    assert result.returncode == 2 and "usage" in result.stderr
