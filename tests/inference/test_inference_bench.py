"""bench/bench_decode.py and bench/bench_serving.py --quick keep working and write what they promise
(no timing claims)."""
import json
import subprocess
import sys
from pathlib import Path

import pytest

from cpattn.inference import decode_merge_bytes

ROOT = Path(__file__).resolve().parents[2]


def test_bench_decode_quick(tmp_path):
    subprocess.run([sys.executable, str(ROOT / "bench" / "bench_decode.py"), "--quick", "--out", str(tmp_path),
                    "--seqlens", "40,70", "--ranks", "1,2,4,8"], check=True, cwd=ROOT, timeout=120,
                   capture_output=True)
    latency = json.loads((tmp_path / "decode.json").read_text())
    memory = json.loads((tmp_path / "decode_memory.json").read_text())
    env = latency["environment"]
    for key in ("device", "date_utc", "torch", "triton"):
        assert env[key]
    assert env["quick"] and "NOT meaningful" in env["note"]
    assert [r["seqlen"] for r in latency["rows"]] == [40, 70]
    for row in latency["rows"]:
        assert row["max_abs_diff_vs_sdpa"] < 1e-5  # the kernel and the step agree with SDPA
        assert row["kernel_us"] > 0 and row["sdpa_us"] > 0
    # Per-rank memory shrinks with the group size (whole pages of 16 tokens, 2 x 2 sequences x 2 heads x 32 x 4 B).
    per_rank = {(r["seqlen"], r["ranks"]): r["kv_bytes_per_rank"] for r in memory["rows"]}
    page_bytes = 2 * 2 * 16 * 2 * 32 * 4
    assert per_rank[(70, 1)] == 5 * page_bytes and per_rank[(70, 2)] == 3 * page_bytes
    assert per_rank[(70, 4)] == 2 * page_bytes and per_rank[(70, 8)] == page_bytes
    # MLA (--quick: a latent cache of 72 with values of 64, 16 heads): the latent kernel read the one buffer
    # and agreed with separate keys and values; bytes read differ by the layout's (D + Dv) / D.
    mla = json.loads((tmp_path / "decode_mla.json").read_text())["rows"]
    assert [r["seqlen"] for r in mla] == [40, 70]
    assert all(r["one_buffer"] and r["max_abs_diff_latent_vs_separate"] < 1e-5 for r in mla)
    mla_bytes = json.loads((tmp_path / "decode_mla_bytes.json").read_text())["rows"]
    mla_bytes = {(r["seqlen"], r["ranks"]): r for r in mla_bytes}
    for (seqlen, ranks), r in mla_bytes.items():
        assert r["latent_bytes_per_token_per_rank"] == r["slots_per_rank"] * 72 * 4
        assert r["gqa_bytes_per_token_per_rank"] * 72 == r["latent_bytes_per_token_per_rank"] * (72 + 64)
        assert r["merge_bytes_per_step"] == decode_merge_bytes(ranks, 2 * 16, 64)
    assert mla_bytes[(70, 1)]["slots_per_rank"] == 70 and mla_bytes[(70, 2)]["slots_per_rank"] == 38
    # The modelled step over P ranks (--quick: contexts of 40 and 70): the kernel over one rank's slots.
    modelled = json.loads((tmp_path / "decode_mla_modelled.json").read_text())["rows"]
    assert [(r["seqlen"], r["ranks"]) for r in modelled] == [(n, p) for n in (40, 70) for p in (1, 2, 4, 8)]
    for r in modelled:
        assert r["slots_per_rank"] == mla_bytes[(r["seqlen"], r["ranks"])]["slots_per_rank"] and r["kernel_us"] > 0
        assert r["merge_bytes_per_step"] == mla_bytes[(r["seqlen"], r["ranks"])]["merge_bytes_per_step"]


def test_bench_serving_quick(tmp_path):
    sys.path.insert(0, str(ROOT / "bench"))
    try:
        import bench_serving
        bench_serving.main(["--quick", "--out", str(tmp_path), "--prompts", "16,32", "--cp-sizes", "1,2",
                            "--new-tokens", "3", "--chunk", "16", "--prefix-cached", "16"])
    finally:
        sys.path.remove(str(ROOT / "bench"))
    serving = json.loads((tmp_path / "serving.json").read_text())
    prefix = json.loads((tmp_path / "serving_prefix.json").read_text())
    assert serving["environment"]["quick"] and "NOT meaningful" in serving["environment"]["note"]
    assert sorted((r["cp"], r["prompt"]) for r in serving["rows"]) == \
        [(cp, n) for cp in ("cp1", "cp2", "sdpa") for n in (16, 32)]
    for r in serving["rows"]:
        assert r["same_tokens"], r  # fp32: greedy tokens equal single-device SDPA's
        assert r["ttft_ms"] > 0 and r["itl_p99_ms"] >= r["itl_mean_ms"] > 0
        assert r["e2e_ms"] == pytest.approx(r["ttft_ms"] + 2 * r["itl_mean_ms"])
    # The prefix-hit table crosses over: pass-Q moves fewer bytes for a short new chunk, pass-KV for a long one.
    rows = prefix["rows"]
    assert prefix["ranks"] == 2 and rows[0]["auto"] == "pass-q" and rows[-1]["auto"] == "pass-kv"
    assert all((r["pass-kv_bytes"] < r["pass-q_bytes"]) == (r["auto"] == "pass-kv") for r in rows)


def test_bench_serving_generate_quick(tmp_path):
    pytest.importorskip("transformers")
    sys.path.insert(0, str(ROOT / "bench"))
    try:
        import bench_serving
        bench_serving.main(["--quick", "--generate", "--out", str(tmp_path), "--prompts", "9", "--cp-sizes", "2",
                            "--new-tokens", "3", "--batch", "2"])
    finally:
        sys.path.remove(str(ROOT / "bench"))
    serving = json.loads((tmp_path / "serving_generate.json").read_text())
    assert serving["environment"]["quick"] and "NOT meaningful" in serving["environment"]["note"]
    assert sorted(r["cp"] for r in serving["rows"]) == ["cp2", "hf-sdpa"]
    for r in serving["rows"]:
        assert r["same_tokens"] and r["lengths"] == [9, 7], r  # mixed lengths, greedy tokens as on one device
        assert r["ttft_ms"] > 0 and r["ttft_alone_ms"] > 0 and r["itl_p99_ms"] >= r["itl_mean_ms"] > 0
    cp2 = next(r for r in serving["rows"] if r["cp"] == "cp2")
    assert cp2["prefill_bytes"] > 0 and cp2["decode_step_bytes"] > 0
