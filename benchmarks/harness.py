"""The shared benchmark harness: timing, ceilings, and CSV rows that say where they came from.

Every benchmark script in this folder:
  * times with ``time_ms`` (CUDA events via ``triton.testing.do_bench``: warm-up, then the
    median of repeated runs; on CPU a wall-clock median, which is never a GPU figure) and, where
    launch overhead would hide a kernel, also with ``time_graph_ms`` (the same calls replayed
    from one CUDA graph; nan with a reason on CPU, in smoke mode or when capture fails: a graph
    column never holds a CPU figure);
  * measures its ceilings once per run with ``ceilings()`` (device-to-device copy bandwidth
    counting read + write, dense bf16 matmul TFLOP/s) and prints ratios to them;
  * appends rows to ``benchmarks/results/<name>.csv`` with ``append_rows``: each row carries the
    card, driver, torch/triton versions, commit and date, so a number is never separated from
    the machine that produced it.
  * runs in smoke mode on CPU (``--smoke``, or automatically without a GPU): tiny shapes, one
    repetition, results marked ``smoke=1``; this is what the test suite runs so scripts never rot.
"""

from __future__ import annotations

import argparse
import csv
import datetime
import os
import statistics
import subprocess
import time
from dataclasses import dataclass
from typing import Callable, Dict, Iterable, List, Optional, Tuple

import torch

# The benchmark process's set-up, once here for every script (each imports this module before
# any kernel): the kernels package picks the Triton interpreter when there is no GPU (at its
# import), and setup_process() does the rest (mm1_moe/runtime/process.py).
import mm1_moe.kernels  # noqa: E402,F401
from mm1_moe.runtime import setup_process  # noqa: E402

setup_process()

RESULTS_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results")


def on_gpu() -> bool:
    return torch.cuda.is_available()


def base_parser(description: str) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--smoke", action="store_true",
                        help="tiny shapes, one repetition (the default without a GPU)")
    parser.add_argument("--out", default=RESULTS_DIR, help="folder for the CSV results")
    parser.add_argument("--no-csv", action="store_true", help="print only")
    return parser


def time_ms(fn: Callable[[], object], smoke: bool = False, rep_ms: int = 100) -> float:
    """Median milliseconds per call of ``fn``."""
    if on_gpu() and not smoke:
        from triton.testing import do_bench

        return float(do_bench(fn, warmup=25, rep=rep_ms, return_mode="median"))
    fn()  # warm-up (first-call allocation, interpreter set-up)
    samples = []
    for _ in range(1 if smoke else 5):
        start = time.perf_counter()
        fn()
        samples.append((time.perf_counter() - start) * 1e3)
    return statistics.median(samples)


def graph_unavailable(smoke: bool = False) -> Optional[str]:
    """Why this run times nothing from CUDA graphs, or None where it does."""
    if not on_gpu():
        return "no GPU: CUDA graphs need one (CPU/smoke run)"
    return "smoke mode: not measured" if smoke else None


def time_graph_ms(fn: Callable[[], object], smoke: bool = False,
                  rep_ms: int = 20) -> Tuple[float, str]:
    """(median milliseconds per call of ``fn`` replayed from a CUDA graph, ''), or (nan, why not).

    ``triton.testing.do_bench_cudagraph``: a warm-up and an estimate, then ``fn`` unrolled ~rep_ms
    worth of times into one graph, replayed 10 times on a side stream. No host launch cost, no L2
    flush between calls (do_bench flushes): an input smaller than L2 (50 MB on H100/H200) may be
    read from it, so compare a graph figure with another graph figure (e.g. a copy of the same
    bytes). ``fn`` must not synchronise with the host (``.item()``, ``masked_select``,
    ``nonzero``): capture fails and the reason comes back instead of a number."""
    why_not = graph_unavailable(smoke)
    if why_not:
        return float("nan"), why_not
    from triton.testing import do_bench_cudagraph

    try:
        with torch.cuda.stream(torch.cuda.Stream()):  # capture needs a side stream
            return float(do_bench_cudagraph(fn, rep=rep_ms, return_mode="median")), ""
    except Exception as err:  # noqa: BLE001 - capture errors come as several types
        return float("nan"), f"capture failed: {type(err).__name__}: {str(err)[:100]}"


@dataclass(frozen=True)
class Ceilings:
    copy_gbps: float
    """Device-to-device copy bandwidth, counting bytes read + written."""
    matmul_tflops: float
    """Dense bf16 matmul rate (fp32 on CPU)."""


def ceilings(smoke: bool = False) -> Ceilings:
    """Measure the copy bandwidth and dense matmul rate of this device, once per run."""
    device = "cuda" if on_gpu() else "cpu"
    n = (1 << 20) if smoke or not on_gpu() else (1 << 28)  # 1 GiB of bf16 on GPU
    dtype = torch.bfloat16 if on_gpu() else torch.float32
    src = torch.empty(n, dtype=dtype, device=device)
    dst = torch.empty_like(src)
    ms = time_ms(lambda: dst.copy_(src), smoke)
    copy_gbps = 2 * src.numel() * src.element_size() / (ms * 1e-3) / 1e9
    m = 256 if smoke or not on_gpu() else 8192
    a = torch.randn(m, m, dtype=dtype, device=device)
    b = torch.randn(m, m, dtype=dtype, device=device)
    ms = time_ms(lambda: a @ b, smoke)
    return Ceilings(copy_gbps, 2 * m**3 / (ms * 1e-3) / 1e12)


def _git_commit() -> str:
    """The checkout's commit; MM1_BENCH_COMMIT wins (a copied tree may have no .git)."""
    if os.environ.get("MM1_BENCH_COMMIT"):
        return os.environ["MM1_BENCH_COMMIT"]
    try:
        root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
        out = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=root,
                             capture_output=True, text=True, timeout=10)
        return out.stdout.strip() or "unknown"
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def environment() -> Dict[str, str]:
    """Card, driver, versions, commit and date: stamped on every CSV row."""
    import triton

    card, driver = "cpu", ""
    if on_gpu():
        card = torch.cuda.get_device_name()
        try:
            driver = subprocess.run(["nvidia-smi", "--query-gpu=driver_version",
                                     "--format=csv,noheader"], capture_output=True,
                                    text=True, timeout=10).stdout.strip().splitlines()[0]
        except (OSError, subprocess.SubprocessError, IndexError):
            driver = "unknown"
    return {
        "card": card,
        "driver": driver,
        "torch": torch.__version__,
        "triton": triton.__version__,
        "commit": _git_commit(),
        "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"),
    }


def append_rows(name: str, rows: Iterable[Dict[str, object]], out_dir: str = RESULTS_DIR,
                smoke: bool = False) -> Optional[str]:
    """Append ``rows`` (dicts) to ``<out_dir>/<name>.csv`` with the environment columns.
    Smoke rows go to ``<name>.smoke.csv`` so they never mix with real measurements."""
    rows = list(rows)
    if not rows:
        return None
    env = environment()
    os.makedirs(out_dir, exist_ok=True)
    path = os.path.join(out_dir, f"{name}{'.smoke' if smoke else ''}.csv")
    fields = list(env) + [k for k in rows[0] if k not in env]
    new = not os.path.exists(path)
    with open(path, "a", newline="", encoding="utf-8") as handle:
        writer = csv.DictWriter(handle, fieldnames=fields, extrasaction="ignore")
        if new:
            writer.writeheader()
        for row in rows:
            writer.writerow({**env, **row})
    return path


def save_results(name: str, rows: List[Dict[str, object]], args, smoke: bool,
                 ceil: Optional[Ceilings] = None, **columns: object) -> None:
    """What every script ends with: unless ``--no-csv``, append ``rows`` to ``<args.out>/<name>``
    with the run's ceilings, the smoke flag and any ``columns`` on each row, and say where."""
    if args.no_csv:
        return
    extra: Dict[str, object] = dict(columns)
    if ceil is not None:
        extra.update(copy_gbps=ceil.copy_gbps, matmul_tflops=ceil.matmul_tflops)
    extra["smoke"] = int(smoke)
    path = append_rows(name, [{**row, **extra} for row in rows], args.out, smoke)
    print(f"rows appended to {path}")


def print_table(rows: List[Dict[str, object]], columns: List[str]) -> None:
    """A plain aligned table of ``columns`` from ``rows`` (floats with 3 significant digits)."""

    def cell(v: object) -> str:
        return f"{v:.3g}" if isinstance(v, float) else str(v)

    widths = [max(len(c), *(len(cell(r.get(c, ""))) for r in rows)) for c in columns]
    print("  ".join(c.ljust(w) for c, w in zip(columns, widths)))
    for r in rows:
        print("  ".join(cell(r.get(c, "")).ljust(w) for c, w in zip(columns, widths)))
