"""The README's context-parallel demo command runs on CPU ranks and reports small errors on every rank."""
import re
import subprocess
import sys


def test_torchrun_demo_hybrid():
    # python -m torch.distributed.run is the torchrun command, without relying on PATH
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node=4", "-m", "cpattn.examples.demo",
           "--context-parallel-algo", "hybrid_cp_algo", "--ulysses-degree-in-cp", "2", "--seqlen", "64"]
    result = subprocess.run(cmd, capture_output=True, text=True, timeout=240)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "ring degree 2 (zigzag) x ulysses degree 2" in result.stdout
    rank_lines = [line for line in result.stdout.splitlines() if line.startswith("rank ")]
    assert len(rank_lines) == 4, result.stdout
    for line in rank_lines:
        errors = [float(x) for x in re.findall(r"(?:out|dq|dk|dv) ([0-9.e+-]+)", line)]
        assert len(errors) == 4 and max(errors) < 1e-4, line
        assert "peak RSS" in line


def test_single_device_demo_still_runs():
    result = subprocess.run([sys.executable, "-m", "cpattn.examples.demo", "--seqlen", "64"], capture_output=True, text=True,
                            timeout=240)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "rel error" in result.stdout
