"""``mm1-moe bench MODE [ARGS]``: run a benchmark script of the source checkout.

The benchmarks are scripts in ``benchmarks/`` (one per kernel or layer, on a shared harness),
not part of the installed package: this finds that folder next to the package (an editable
install or a source checkout) and runs the script in a fresh interpreter, so each benchmark
chooses its device and the Triton interpreter before any kernel is imported, as when run by
hand. ``mm1-moe bench experts --config C --tokens T --ep 1`` is
``python benchmarks/bench_moe_layer.py experts --config C --tokens T --ep 1``.
"""

from __future__ import annotations

import os
import subprocess
import sys
from typing import Dict, List, Optional, Sequence, Tuple

# mode -> (script, arguments placed before the user's)
MODES: Dict[str, Tuple[str, Tuple[str, ...]]] = {
    "experts": ("bench_moe_layer.py", ("experts",)),
    "layer": ("bench_moe_layer.py", ("layer",)),
    "step": ("bench_step.py", ()),
    "kernels": ("bench_moe_kernels.py", ()),
    "attention": ("bench_attention.py", ()),
    "rmsnorm": ("bench_rmsnorm.py", ()),
    "tiles": ("bench_tile_sweep.py", ()),
    "data": ("bench_data.py", ()),
    "threads": ("bench_cpu_threads.py", ()),
    "plot": ("plot.py", ()),
}


def benchmarks_dir() -> Optional[str]:
    """``benchmarks/`` beside the package, or None for an install without the sources."""
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    path = os.path.join(root, "benchmarks")
    return path if os.path.isfile(os.path.join(path, "harness.py")) else None


def command(mode: str, args: Sequence[str] = ()) -> List[str]:
    """The command line ``mm1-moe bench MODE ARGS`` runs."""
    if mode not in MODES:
        raise ValueError(f"bench mode {mode!r} is not one of {sorted(MODES)}")
    folder = benchmarks_dir()
    if folder is None:
        raise FileNotFoundError(
            "mm1-moe bench runs the scripts in the repository's benchmarks/ folder, which this "
            "installation does not have: install from a source checkout (pip install -e .)")
    script, prefix = MODES[mode]
    return [sys.executable, os.path.join(folder, script), *prefix, *args]


def run_benchmark(mode: str, args: Sequence[str] = ()) -> int:
    """Run ``mm1-moe bench MODE ARGS``; returns the script's exit code."""
    return subprocess.call(command(mode, args))
