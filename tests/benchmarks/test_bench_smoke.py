"""Every benchmark script runs in smoke mode (tiny shapes, one repetition) so it never rots.
Smoke numbers are CPU figures: they are never written to the results CSVs here (--no-csv, or a
temporary --out), and a CUDA-graph column on CPU must stay empty (nan) with its reason."""

import csv
import json
import math
import os
import re
import subprocess
import sys

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
BENCH = os.path.join(REPO, "benchmarks")
SUITE = os.path.join(BENCH, "gpu_suite.sh")

# The suite's order: kernel rows, the MoE layer vs Megatron, the tile sweep, the step and data
# benchmarks, the charts, and the gpu_only tests last.
SUITE_ORDER = ["install", "moe_kernels", "attention", "rmsnorm", "moe_layer mm1-7b-moe",
               "moe_layer mm1-3b-moe", "tile_sweep", "step", "data", "plots", "pytest gpu_only"]
# The dispatch/combine rows (op, impl) bench_moe_kernels.py must write.
KERNEL_ROWS = {("dispatch_copy", "ours"), ("dispatch_copy", "torch.index_select"),
               ("dispatch+meta", "ours"), ("dispatch+meta", "megatron.permute"),
               ("combine_copy", "ours"), ("combine_copy", "torch.index_select"),
               ("combine_copy", "megatron.unpermute")}


def _env():
    return dict(os.environ, TORCHDYNAMO_DISABLE="1")


# What the GPU suite does not run in its smoke pass (test_gpu_suite_cpu_fallback runs the rest:
# the kernel rows, attention, RMSNorm, the MoE experts rows, the tile sweep, step and data).
@pytest.mark.parametrize("script", [("bench_moe_layer.py", "layer", "--routings", "balanced",
                                     "skew4"), ("bench_cpu_threads.py",)],
                         ids=lambda s: " ".join(s[:2]))
def test_benchmark_smoke(script):
    proc = subprocess.run([sys.executable, os.path.join(BENCH, script[0]), *script[1:],
                           "--smoke", "--no-csv"],
                          capture_output=True, text=True, timeout=600, env=_env(), cwd=BENCH)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "ceilings:" in proc.stdout and "ours" in proc.stdout
    if script[0] == "bench_moe_layer.py":
        for routing in ("balanced", "skew4"):
            assert f"layer mm1-7b-moe T=64 {routing}" in proc.stdout, routing


def check_moe_layer_rows(rows):
    """Every implementation's experts rows under each routing, imbalanced ones included, with
    the max/mean they claim."""
    routings = {(r["impl"], r["routing"]): float(r["max_load"]) for r in rows
                if r["bench"] == "experts"}
    for impl in ("ours", "megatron", "torch_reference"):
        for routing in ("dropless", "balanced", "trained", "skew2", "skew4"):
            assert (impl, routing) in routings, (impl, routing)
        assert routings[(impl, "balanced")] == 1.0
        assert routings[(impl, "skew2")] == pytest.approx(2.0)
        assert routings[(impl, "skew4")] == pytest.approx(4.0)


def test_imbalanced_routings_have_the_counts_they_claim():
    sys.path.insert(0, BENCH)
    try:
        import torch
        from moe_setup import ids_for_counts, imbalanced_counts
    finally:
        sys.path.remove(BENCH)
    T, E, K = 4096, 32, 2
    for kind, ratio in (("skew2", 2.0), ("skew4", 4.0), ("trained", None)):
        counts = imbalanced_counts(kind, T, E, K)
        assert counts is not None and int(counts.sum()) == T * K and len(counts) == E
        if ratio:
            assert float(counts.max()) / (T * K / E) == pytest.approx(ratio)
        ids = ids_for_counts(counts, T, K)
        assert torch.equal(torch.bincount(ids.reshape(-1), minlength=E), counts)
        assert bool((ids[:, 0] != ids[:, 1]).all())  # a token's K experts are distinct
    with pytest.raises(ValueError, match="must sum"):
        ids_for_counts(torch.tensor([3, 1]), 2, 2)


def _read_rows(path):
    with open(path, newline="", encoding="utf-8") as handle:
        return list(csv.DictReader(handle))


def check_kernel_rows(rows):
    """The copy-only and with-metadata dispatch rows, the copy-only combine rows, their ratios,
    and a CUDA-graph column that is empty (nan) with a reason on every CPU row."""
    assert KERNEL_ROWS <= {(r["op"], r["impl"]) for r in rows}
    for r in rows:
        assert r["smoke"] == "1" and r["card"] == "cpu", r
        assert math.isnan(float(r["graph_ms"])) and math.isnan(float(r["graph_rate"])), r
        assert r["graph_note"].startswith("no GPU"), r
        if r["unit"] == "GB/s":
            for column in ("ms", "rate", "of_ceiling", "of_copy", "same_bytes_copy_gbps"):
                assert float(r[column]) > 0, (column, r)
            assert math.isnan(float(r["graph_of_copy"])), r
    peers = {r["op"]: r for r in rows if r["impl"] == "ours"}
    for op in ("dispatch_copy", "dispatch+meta", "combine_copy"):
        assert float(peers[op]["vs_best_peer"]) > 0, op


def check_tile_sweep_outputs(folder):
    """bench_tile_sweep.py's smoke pass: every op's candidates ran and matched the table tile;
    CPU figures are named as such (no GPU time column, no winner)."""
    rows = _read_rows(folder / "tile_sweep.smoke.csv")
    assert "cpu_smoke_ms" in rows[0] and "gpu_ms" not in rows[0] and "winner" not in rows[0]
    assert {r["smoke"] for r in rows} == {"1"} and {r["card"] for r in rows} == {"cpu"}
    from mm1_moe.kernels.tile_candidates import ops

    assert {r["op"] for r in rows} == set(ops())
    bad = [r for r in rows if r["status"] != "ok" or r["match"] != "1"]
    assert not bad, bad
    assert sum(r["table"] == "1" for r in rows) == len({(r["op"], r["key"]) for r in rows})
    winners = json.loads((folder / "tile_sweep_winners.smoke.json").read_text())
    assert winners["winners"] == {} and winners["timing"].startswith("cpu-smoke")


def check_kernel_table(log: str):
    """bench_moe_kernels.py's console table shows the graph column and why it is empty."""
    assert "ceilings:" in log and "CPU figures" in log
    header = next(line for line in log.splitlines() if line.startswith("op "))
    assert header.split()[4:6] == ["ms", "graph_ms"]
    assert "graph_ms nan (dispatch_copy, dispatch+meta, combine_copy" in log


def _nominal_timeouts():
    """(step, nominal seconds) of each `run "NAME" SECONDS ...` line of gpu_suite.sh."""
    with open(SUITE, encoding="utf-8") as handle:
        return re.findall(r'^\s*run "([^"]+)" (\d+) ', handle.read(), flags=re.M)


def test_gpu_suite_time_table():
    """Every step's nominal timeout is in the script's header table and the README's, and the
    steps + install (~20 s) + the summary reserve (15 s) fit the 470 s budget (8 minutes)."""
    steps = _nominal_timeouts()
    assert [name for name, _ in steps] == [s for s in SUITE_ORDER if s != "install"]
    with open(SUITE, encoding="utf-8") as handle:
        header = [line for line in handle if line.startswith("#")]
    with open(os.path.join(BENCH, "README.md"), encoding="utf-8") as handle:
        readme = handle.read()
    for name, seconds in steps:
        assert any(re.search(rf"\b{re.escape(name)}\s+{seconds}\b", line) for line in header), name
        assert re.search(rf"\| `?{re.escape(name)}`? \| {seconds} \|", readme), name
    assert any("SUITE_BUDGET_S:-470}" in line for line in open(SUITE, encoding="utf-8"))
    assert sum(int(s) for _, s in steps) + 20 + 15 <= 470


def test_gpu_suite_cpu_fallback(tmp_path):
    """benchmarks/gpu_suite.sh end to end without a GPU (about a minute on 2 cores): it detects
    the CPU, runs every benchmark in smoke mode into OUTDIR in the suite's order, skips the
    gpu_only tests (last; their command names only the test files with the mark), writes the
    summary, and reports success in its exit code."""
    if torch_has_gpu():
        pytest.skip("a GPU is present: the suite would run at full size")
    env = dict(_env(), PYTHON=sys.executable)
    out = tmp_path / "suite"
    proc = subprocess.run(["bash", SUITE, str(out)], capture_output=True, text=True,
                          timeout=480, env=env)
    steps = (out / "steps.tsv").read_text() if (out / "steps.tsv").exists() else ""
    assert proc.returncode == 0, proc.stdout[-3000:] + steps
    status = dict(line.split("\t")[:2] for line in steps.splitlines())
    assert [line.split("\t")[0] for line in steps.splitlines()] == SUITE_ORDER, steps
    assert status["tile_sweep"] == "ok", steps
    assert status["pytest gpu_only"] == "skipped (no GPU)", steps
    command = (out / "logs" / "pytest_gpu_only.cmd").read_text()
    assert " -m pytest -m gpu_only -q " in command, command
    assert sorted(command.split(" -q ", 1)[1].split()) == gpu_only_test_files(), command
    for name in ("moe_layer", "step", "moe_kernels", "rmsnorm", "attention", "data"):
        assert (out / f"{name}.smoke.csv").exists(), name
    check_kernel_rows(_read_rows(out / "moe_kernels.smoke.csv"))
    check_kernel_table((out / "logs" / "moe_kernels.log").read_text())
    check_moe_layer_rows(_read_rows(out / "moe_layer.smoke.csv"))
    check_tile_sweep_outputs(out)
    summary = (out / "summary.md").read_text()
    assert "Smoke run" in summary and "## moe_layer.smoke" in summary
    assert "graph_ms" in summary and "no GPU: CUDA graphs need one" in summary


def gpu_only_test_files():
    """The test files (repo-relative) that mark a test gpu_only, found as the suite finds them."""
    found = []
    for folder, _, names in os.walk(os.path.join(REPO, "tests")):
        for name in names:
            path = os.path.join(folder, name)
            if re.fullmatch(r"test_.*\.py", name) and re.search(
                    r"mark\.gpu_only", open(path, encoding="utf-8").read()):
                found.append(os.path.relpath(path, REPO))
    return sorted(found)


def torch_has_gpu() -> bool:
    import torch

    return torch.cuda.is_available()
