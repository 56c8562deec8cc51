"""Every benchmark script runs in smoke mode (tiny shapes, one repetition) so it never rots.
Smoke numbers are CPU figures and are never written to the results CSVs here (--no-csv)."""

import os
import subprocess
import sys

import pytest

BENCH = os.path.join(os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))),
                     "benchmarks")


@pytest.mark.parametrize("script", ["bench_moe_kernels.py", "bench_rmsnorm.py", "bench_data.py",
                                    "bench_moe_layer.py", "bench_step.py", "bench_cpu_threads.py"])
def test_benchmark_smoke(script):
    env = dict(os.environ, TORCHDYNAMO_DISABLE="1")
    proc = subprocess.run([sys.executable, os.path.join(BENCH, script), "--smoke", "--no-csv"],
                          capture_output=True, text=True, timeout=600, env=env, cwd=BENCH)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "ceilings:" in proc.stdout and "ours" in proc.stdout


def test_gpu_suite_cpu_fallback(tmp_path):
    """benchmarks/gpu_suite.sh end to end without a GPU (about a minute on 2 cores): it detects
    the CPU, skips the gpu_only tests, runs every benchmark in smoke mode into OUTDIR, writes the
    summary, and reports success in its exit code."""
    if torch_has_gpu():
        pytest.skip("a GPU is present: the suite would run at full size")
    env = dict(os.environ, TORCHDYNAMO_DISABLE="1", PYTHON=sys.executable)
    out = tmp_path / "suite"
    proc = subprocess.run(["bash", os.path.join(BENCH, "gpu_suite.sh"), str(out)],
                          capture_output=True, text=True, timeout=480, env=env)
    steps = (out / "steps.tsv").read_text() if (out / "steps.tsv").exists() else ""
    assert proc.returncode == 0, proc.stdout[-3000:] + steps
    assert "pytest gpu_only\tskipped (no GPU)" in steps
    for name in ("moe_layer", "step", "moe_kernels", "rmsnorm", "attention", "data"):
        assert (out / f"{name}.smoke.csv").exists(), name
    summary = (out / "summary.md").read_text()
    assert "Smoke run" in summary and "## moe_layer.smoke" in summary


def torch_has_gpu() -> bool:
    import torch

    return torch.cuda.is_available()
