"""Every benchmark script runs in smoke mode (tiny shapes, one repetition) so it never rots.
Smoke numbers are CPU figures and are never written to the results CSVs here (--no-csv)."""

import os
import subprocess
import sys

import pytest

BENCH = os.path.join(os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))),
                     "benchmarks")


@pytest.mark.parametrize("script", ["bench_moe_kernels.py"])
def test_benchmark_smoke(script):
    env = dict(os.environ, TORCHDYNAMO_DISABLE="1")
    proc = subprocess.run([sys.executable, os.path.join(BENCH, script), "--smoke", "--no-csv"],
                          capture_output=True, text=True, timeout=600, env=env, cwd=BENCH)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "ceilings:" in proc.stdout and "ours" in proc.stdout
