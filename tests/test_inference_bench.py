"""bench/bench_decode.py --quick keeps working and writes what it promises (no timing claims)."""
import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


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
